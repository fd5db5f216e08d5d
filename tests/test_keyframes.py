"""Key frames and pseudo-label scoring, without Ray (manifests: tests/test_manifest_ids.py). `pytest tests/test_keyframes.py`"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynboot.io.images import decode_image, encode_png
from dynboot.data.keyframes import (KeyframeConfig, consecutive_pairs, extract_keyframes, motion_track, select_peaks,
                               select_stills, video_keyframes)
from dynboot.data.pairs import make_row, to_table
from dynboot.data.pseudo_labels import pseudo_label_accuracy
from dynboot.data.video import VideoFault, read_video, write_video

STILLS = KeyframeConfig(strategy="stills")  # the world's strategy: its relabel runs set it


def _truth(world):
    return [json.loads(line) for line in (world / "videos_truth.jsonl").read_text().splitlines()]


def _segment_of(segments, frame):
    return next((k for k, (s, e) in enumerate(segments) if s <= frame < e), None)


def test_stills_recover_every_key_state_of_the_world(small_world):
    """One key frame inside each held key state, in order: consecutive stills are exactly the true pairs."""
    for t in _truth(small_world):
        kf = video_keyframes(str(small_world / "videos" / f"{t['video_id']}.mp4"), STILLS, 40)
        assert kf.decoder == "decord"
        assert [_segment_of(t["segments"], i) for i in kf.indices] == list(range(len(t["segments"])))
        assert len(kf.pairs) == len(t["actions"])
        frames, _ = read_video(small_world / "videos" / f"{t['video_id']}.mp4")
        for i in kf.indices:  # 40 px frames are not resized: the PNG holds the decoded frame bit for bit
            assert np.array_equal(decode_image(kf.images[i]), frames[i])


def test_streaming_decode_matches_whole_video_decode(small_world):
    """Chunks shorter than the video (chunk=5), either decoder, give the same motion, key frames and images as
    the frames decoded whole (40 px world frames are their own thumbnails)."""
    path = small_world / "videos" / "ep000003.mp4"
    frames, _ = read_video(path)
    for strategy in ("stills", "peaks"):
        whole = extract_keyframes(frames, KeyframeConfig(strategy=strategy, k=4, min_gap=10), 40)
        assert len(whole.pairs) >= 1
        for decoder in ("decord", "pyav"):
            cfg = KeyframeConfig(strategy=strategy, chunk=5, k=4, min_gap=10, decoder=decoder)
            streamed = video_keyframes(str(path), cfg, 40)
            assert streamed.decoder == decoder and streamed.frames == len(frames)
            assert streamed.indices == whole.indices and streamed.images == whole.images
            assert streamed.motion == whole.motion


def test_motion_ignores_scattered_noise_and_sees_a_moving_square():
    rng = np.random.default_rng(0)
    base = np.full((6, 32, 32, 3), 200, np.uint8)
    noisy = base.copy()
    for t in range(6):  # codec-like noise: a few single pixels moved by up to 40 levels
        ys, xs = rng.integers(0, 32, 4), rng.integers(0, 32, 4)
        noisy[t, ys, xs] = 160
    assert motion_track(noisy, STILLS).motion.max() == 0
    moving = base.copy()
    for t in range(6):
        moving[t, 8:16, 4 * t:4 * t + 8] = (220, 40, 40)
    m = motion_track(moving, STILLS).motion
    assert m[0] == 0 and (m[1:] > 0.01).all()


def test_select_peaks_top_k_with_min_gap_sorted_and_deterministic():
    motion = np.zeros(100)
    motion[[10, 12, 50, 51, 90, 30]] = [5, 9, 7, 7, 3, 1]
    assert select_peaks(motion, k=3, min_gap=20) == [12, 50, 90]  # 10 is too close to 12; 51 ties 50, loses
    # then 30 is too close to 12; frames without motion are never key frames
    assert select_peaks(motion, k=6, min_gap=20) == [12, 50, 90]
    assert select_peaks(motion, k=4, min_gap=1) == [10, 12, 50, 51]
    assert select_peaks(motion, k=6, min_gap=20, min_motion=4) == [12, 50]  # 90 (3) and 30 (1) are too still
    # a frame with no other candidate min_gap away would block its shot: passed over (7 here, in a 15-frame clip)
    short = np.array([0, 3, 2, 2, 2, 2, 2, 9, 2, 2, 2, 2, 2, 2, 4.0])
    assert select_peaks(short, k=6, min_gap=8) == [1, 14]


def test_select_peaks_within_shots_and_pairs_never_across_a_cut():
    motion = np.zeros(100)
    motion[[5, 30, 45, 62, 70, 95]] = [8, 6, 9, 7, 5, 4]
    shots = np.repeat([0, 1, 2], [40, 20, 40])  # cuts at 40 and 60
    # shot 1 (40-59) has a single candidate, 45, which can pair with nothing: never taken, though it moves most.
    # In shot 2, 70 is too close to 62; the gap holds within a shot only (30 and 62 need not be 20 apart)
    keys = select_peaks(motion, k=6, min_gap=20, shots=shots)
    assert keys == [5, 30, 62, 95]
    assert consecutive_pairs(keys, shots) == [(5, 30), (62, 95)]
    assert consecutive_pairs([5, 30, 45], shots) == [(5, 30)] and consecutive_pairs([5, 30, 45]) == [(5, 30), (30, 45)]
    # k=2 and 3: once 5 opens shot 0, 62 may not open shot 2, since that would leave no room to complete both
    assert select_peaks(motion, k=2, min_gap=20, shots=shots) == [5, 30]
    assert select_peaks(motion, k=3, min_gap=20, shots=shots) == [5, 30]
    assert select_peaks(motion, k=5, min_gap=5, shots=shots) == [5, 30, 62, 70, 95]  # k=5: shot 2 gets a third
    assert select_peaks(motion, k=6, min_gap=50, shots=shots) == []  # no shot holds two frames 50 apart


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 5), min_size=1, max_size=120), st.lists(st.integers(1, 119), max_size=6),
       st.integers(2, 8), st.integers(1, 30), st.floats(0, 2))
def test_select_peaks_properties(motion, cuts, k, gap, min_motion):
    """Any motion, cuts, k and gap: at most k key frames, sorted, each moving more than min_motion; every shot
    chosen from holds at least two of them min_gap apart, so every key frame is in a pair."""
    motion = np.asarray(motion)
    starts = np.zeros(len(motion), np.int64)
    starts[[c for c in cuts if c < len(motion)]] = 1
    shots = np.cumsum(starts)
    keys = select_peaks(motion, k, gap, shots, min_motion)
    assert keys == sorted(set(keys)) and len(keys) <= k and all(motion[t] > min_motion for t in keys)
    for s in {int(shots[t]) for t in keys}:
        mine = [t for t in keys if shots[t] == s]
        assert len(mine) >= 2 and all(b - a >= gap for a, b in zip(mine, mine[1:]))
    pairs = consecutive_pairs(keys, shots)
    assert {t for p in pairs for t in p} == set(keys)
    if not keys:  # nothing chosen only when no shot has two candidates gap apart (or k allows no pair)
        for s in set(shots.tolist()):
            cand = [t for t in range(len(motion)) if shots[t] == s and motion[t] > min_motion]
            assert not cand or cand[-1] - cand[0] < gap


def test_select_stills_middle_of_long_still_runs():
    motion = np.array([0, 0, 0, 0, .5, .5, 0, 0, .5, 0, 0, 0, 0, 0, .001])
    # frame t's motion is its change since t-1: still runs are [0,4), [5,8) and [8,15) (frame 14's .001 is noise)
    assert select_stills(motion, min_still=3, threshold=0.002) == [1, 6, 11]
    assert select_stills(motion, min_still=4, threshold=0.002) == [1, 11]
    assert select_stills(motion, min_still=3, threshold=0.0) == [1, 6, 10]  # now frame 14 moved: [8,14)
    assert select_stills(motion, min_still=3, threshold=0.002, max_keyframes=1) == [1]


def test_bad_files_raise_typed_faults_and_damaged_ones_are_salvaged(tmp_path, small_world):
    src = (small_world / "videos" / "ep000000.mp4").read_bytes()
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "truncated.mp4").write_bytes(src[: len(src) // 2])
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "image.mp4").write_bytes(encode_png(np.zeros((40, 40, 3), np.uint8)))
    write_video(tmp_path / "one.mp4", np.zeros((1, 40, 40, 3), np.uint8))
    write_video(tmp_path / "still.mp4", np.full((30, 40, 40, 3), 128, np.uint8))
    expected = {"zero": "empty_file", "truncated": "unreadable", "garbage": "unreadable", "image": "too_short",
                "one": "too_short", "still": "no_keyframes"}
    for name, reason in expected.items():
        with pytest.raises(VideoFault) as fault:
            video_keyframes(str(tmp_path / f"{name}.mp4"), STILLS, 40)
        assert fault.value.reason == reason, (name, str(fault.value))
        assert str(tmp_path / f"{name}.mp4") in fault.value.msg  # the message names the file
    with pytest.raises(FileNotFoundError):  # a storage error, not the video's fault: callers retry it
        video_keyframes(str(tmp_path / "missing.mp4"), STILLS, 40)
    damaged = bytearray(src)
    damaged[len(src) // 2: len(src) // 2 + 1000] = bytes(1000)
    (tmp_path / "zeroed.mp4").write_bytes(bytes(damaged))
    kf = video_keyframes(str(tmp_path / "zeroed.mp4"), STILLS, 40)
    assert kf.decoder == "pyav" and len(kf.pairs) >= 1


def test_pseudo_label_accuracy_counts_matches_types_and_unmatched(tmp_path, small_world):
    truth = _truth(small_world)
    img = np.zeros((40, 40, 3), np.uint8)
    rows = []
    t0, t1 = truth[0], truth[1]
    mid = lambda t, k: (t["segments"][k][0] + t["segments"][k][1]) // 2  # noqa: E731
    rows.append(make_row(t0["video_id"], mid(t0, 0), mid(t0, 1), img, img, t0["actions"][0], "pseudo"))  # right
    rows.append(make_row(t0["video_id"], mid(t0, 1), mid(t0, 2), img, img, "  " + t0["actions"][1].upper(), "pseudo"))
    rows.append(make_row(t0["video_id"], mid(t0, 2), mid(t0, 3), img, img, "remove the red square", "pseudo"))
    rows.append(make_row(t1["video_id"], mid(t1, 0), mid(t1, 2), img, img, t1["actions"][0], "pseudo"))  # 2 apart
    rows.append(make_row(t1["video_id"], t1["segments"][0][1], mid(t1, 1), img, img, t1["actions"][0], "pseudo"))
    rows.append(make_row("ep999999", 1, 9, img, img, "move the red square up", "pseudo"))  # unknown video
    (tmp_path / "shards").mkdir()
    pq.write_table(to_table(rows), tmp_path / "shards" / "x.parquet")
    acc = pseudo_label_accuracy(tmp_path, small_world / "videos_truth.jsonl")
    wrong_type = t0["actions"][2].split()[0] != "remove"
    assert (acc["pairs"], acc["matched"], acc["unmatched"], acc["unknown_video"]) == (6, 3, 3, 1)
    assert acc["correct"] == 2 + (t0["actions"][2] == "remove the red square")
    assert acc["accuracy"] == round(acc["correct"] / 3, 4)
    assert acc["type_accuracy"] == round((2 + (not wrong_type)) / 3, 4)
    assert acc["coverage"] == round(3 / sum(len(t["actions"]) for t in truth), 4)
    kinds = [t0["actions"][k].split()[0] for k in range(3)]
    assert sum(v["matched"] for v in acc["per_type"].values()) == 3 and set(acc["per_type"]) == set(kinds)
