"""Key frames of a video: a motion score per frame, key-frame selection, consecutive key frames as pairs.

    motion = motion_scores(frames)                  # [T] fraction of pixels that changed since frame t-1
    keys = select_keyframes(motion, cfg)            # sorted frame indices
    pairs = consecutive_pairs(keys)                 # [(a, b), ...]: each a (before, after) pair
    kf = video_keyframes(path, cfg, image_size=40)  # decode (decord, PyAV fallback) + all of the above + PNGs

Two strategies (`KeyframeConfig.strategy`):

- `peaks` — the paper's setting for real videos: the `k` highest-motion frames at least `min_gap` frames
  apart (k=6, min_gap=20 in the paper, where optical flow scores the motion), sorted by time.
- `stills` — the middle frame of every run of at least `min_still` frames with (almost) no motion. The
  embedded world holds each key state for `hold` frames and shows the action in `transition` frames of
  motion between them (dynboot/world/episodes.py), so the still runs are exactly the key states and
  consecutive stills are exactly the true (before, after) pairs; the peaks there would land mid-motion,
  on in-between frames that are no key state. `stills` is therefore the default on the world.

The motion score is frame differencing, not optical flow (cheap enough for a CPU decode task): the
fraction of `pool`×`pool` pixel blocks whose mean colour moved by more than `pixel_delta` in some channel.
Averaging blocks first removes video-codec noise, which is scattered single pixels, while motion changes
coherent regions: on 200 world videos (H.264, crf 12) per-pixel differencing cannot separate the two
(a still frame has up to 4 of 1600 pixels changed by > 32 levels, an action step as few as 4), while 2×2
blocks with a 16-level threshold separate them cleanly (0 of 400 blocks changed in every still frame, at
least 4 in every motion frame). Large frames are first strided down to at most `motion_px` a side.

Decoding streams: decord reads the video in chunks of `chunk` frames for the motion scores and then only
the selected frames, so one task holds a chunk, never the whole video. Damaged files that decord rejects
are decoded by PyAV packet by packet (dynboot.video.read_video), which salvages the readable frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from dynboot.images import encode_png
from dynboot.config import Config
from dynboot.video import VideoError, read_video

__all__ = ["KeyframeConfig", "Keyframes", "motion_scores", "frame_changes", "select_keyframes", "select_peaks",
           "select_stills", "consecutive_pairs", "fit_square", "extract_keyframes", "video_keyframes"]


class KeyframeConfig(Config):
    """How key frames are chosen in a video (see dynboot/keyframes.py)."""

    strategy: Literal["stills", "peaks"] = Field(
        "stills", description="stills: middle frame of each still run (exact on the embedded world); "
                              "peaks: the k highest-motion frames min_gap apart (the paper, for real videos).")
    k: int = Field(6, ge=2, description="peaks: how many key frames per video (the paper: 6).")
    min_gap: int = Field(20, ge=1, description="peaks: fewest frames between two key frames (the paper: 20).")
    min_still: int = Field(3, ge=1, description="stills: fewest frames a still run must last to count as a key state.")
    still_threshold: float = Field(0.002, ge=0, le=1, description="stills: a frame is still when at most this fraction "
                                                                  "of its pixel blocks changed since the previous frame.")
    max_keyframes: int = Field(0, ge=0, description="stills: keep at most this many key frames (0 = all).")
    pixel_delta: int = Field(16, ge=0, le=255, description="A pixel block changed when its mean moved by more than this "
                                                           "in some channel.")
    pool: int = Field(2, ge=1, le=16, description="Average pool x pool pixel blocks before differencing (removes codec noise).")
    motion_px: int = Field(128, ge=8, description="Motion is scored on a strided thumbnail at most this many pixels a side.")
    chunk: int = Field(256, ge=2, description="Frames decoded at a time while scoring motion (bounds task memory).")


@dataclass
class Keyframes:
    """Key frames of one video and the pairs they form; images are PNG bytes at the model's input size."""

    frames: int  # frames decoded
    decoder: str  # "decord" | "pyav"
    indices: list[int]  # selected key frames, sorted
    pairs: list[tuple[int, int]]  # consecutive key frames
    images: dict[int, bytes] = field(default_factory=dict)  # frame index -> PNG
    motion: dict[int, float] = field(default_factory=dict)  # frame index -> motion score (provenance)
    size: tuple[int, int] = (0, 0)  # source frame (height, width)


def _thumbnails(frames: np.ndarray, motion_px: int, pool: int) -> np.ndarray:
    """[T, H, W, 3] -> [T, h, w, 3] float32: strided to at most `motion_px` a side, then pool x pool block means."""
    stride = max(1, math.ceil(max(frames.shape[1], frames.shape[2]) / motion_px))
    small = frames[:, ::stride, ::stride].astype(np.float32)
    t, h, w, c = small.shape
    p = pool if min(h, w) >= pool else 1
    h, w = h // p * p, w // p * p  # drop the edge rows / columns that fill no whole block
    return small[:, :h, :w].reshape(t, h // p, p, w // p, p, c).mean(axis=(2, 4))


def frame_changes(thumbs: np.ndarray, pixel_delta: float, previous: np.ndarray | None = None) -> np.ndarray:
    """Fraction of thumbnail pixels changed between consecutive frames: [T] when `previous` (the frame before
    `thumbs[0]`) is given, else [T-1]."""
    seq = thumbs if previous is None else np.concatenate([previous[None], thumbs])
    if len(seq) < 2:
        return np.zeros(0)
    delta = np.abs(np.diff(seq, axis=0)).max(axis=-1)  # [T-1, h, w]: largest channel change per block
    return (delta > pixel_delta).mean(axis=(1, 2))


def motion_scores(frames: np.ndarray, cfg: KeyframeConfig | None = None) -> np.ndarray:
    """[T] motion of each frame: the fraction of pixel blocks that changed since the previous frame (frame 0: 0)."""
    cfg = cfg or KeyframeConfig()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3]; got {list(frames.shape)}")
    if not len(frames):
        return np.zeros(0)
    return np.concatenate([[0.0], frame_changes(_thumbnails(frames, cfg.motion_px, cfg.pool), cfg.pixel_delta)])


def select_peaks(motion: np.ndarray, k: int, min_gap: int) -> list[int]:
    """The `k` highest-motion frames, each at least `min_gap` from every one chosen before; sorted by time.
    Ties go to the earlier frame, so the choice is deterministic."""
    chosen: list[int] = []
    for t in np.argsort(-np.asarray(motion), kind="stable"):
        if all(abs(int(t) - c) >= min_gap for c in chosen):
            chosen.append(int(t))
            if len(chosen) == k:
                break
    return sorted(chosen)


def select_stills(motion: np.ndarray, min_still: int, threshold: float, max_keyframes: int = 0) -> list[int]:
    """The middle frame of each run of at least `min_still` frames, each of which changed by at most
    `threshold` since the frame before it (the run's first frame may follow motion)."""
    keys, start = [], 0
    for t in range(1, len(motion) + 1):
        if t == len(motion) or motion[t] > threshold:  # the run [start, t) ends here
            if t - start >= min_still:
                keys.append(start + (t - start - 1) // 2)
            start = t
    return keys[:max_keyframes] if max_keyframes else keys


def select_keyframes(motion: np.ndarray, cfg: KeyframeConfig) -> list[int]:
    if cfg.strategy == "peaks":
        return select_peaks(motion, cfg.k, cfg.min_gap)
    return select_stills(motion, cfg.min_still, cfg.still_threshold, cfg.max_keyframes)


def consecutive_pairs(indices: list[int]) -> list[tuple[int, int]]:
    return list(zip(indices[:-1], indices[1:]))


def fit_square(frame: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to `size` (bicubic); a frame already `size` square is returned
    unchanged, bit for bit."""
    h, w = frame.shape[:2]
    if h == w == size:
        return frame
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = Image.fromarray(np.ascontiguousarray(frame[top:top + side, left:left + side]))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def _finish(frames_total: int, decoder: str, motion: np.ndarray, keys: list[int], key_frames: np.ndarray,
            image_size: int, size: tuple[int, int]) -> Keyframes:
    images = {k: encode_png(fit_square(f, image_size)) for k, f in zip(keys, key_frames)}
    return Keyframes(frames_total, decoder, keys, consecutive_pairs(keys), images,
                     {k: round(float(motion[k]), 6) for k in keys}, size)


def extract_keyframes(frames: np.ndarray, cfg: KeyframeConfig, image_size: int, decoder: str = "memory") -> Keyframes:
    """Key frames and pairs of an already decoded video [T, H, W, 3] uint8."""
    frames = np.asarray(frames)
    motion = motion_scores(frames, cfg)
    keys = select_keyframes(motion, cfg)
    return _finish(len(frames), decoder, motion, keys, frames[keys], image_size, tuple(frames.shape[1:3]))


def _decord_keyframes(path: str, cfg: KeyframeConfig, image_size: int) -> Keyframes:
    import decord

    vr = decord.VideoReader(path, num_threads=1, ctx=decord.cpu(0))
    n = len(vr)
    motion, previous, size = np.zeros(n), None, (0, 0)
    for start in range(0, n, cfg.chunk):
        chunk = vr.get_batch(list(range(start, min(n, start + cfg.chunk)))).asnumpy()
        size = tuple(chunk.shape[1:3])
        thumbs = _thumbnails(chunk, cfg.motion_px, cfg.pool)
        changes = frame_changes(thumbs, cfg.pixel_delta, previous)
        motion[start + (previous is None):start + len(chunk)] = changes
        previous = thumbs[-1]
    keys = select_keyframes(motion, cfg)
    key_frames = vr.get_batch(keys).asnumpy() if keys else np.zeros((0, *size, 3), np.uint8)
    return _finish(n, "decord", motion, keys, key_frames, image_size, size)


def video_keyframes(path: str, cfg: KeyframeConfig, image_size: int) -> Keyframes:
    """Decode `path` and pick its key frames. Raises VideoError when no decoder can read it or it holds
    fewer than 2 frames (a still image is not a video)."""
    try:
        kf = _decord_keyframes(path, cfg, image_size)
    except Exception:  # DECORDError is no RuntimeError; any decord failure falls back to PyAV
        frames, decoder = read_video(path)  # raises VideoError naming both decoders' reasons
        kf = extract_keyframes(frames, cfg, image_size, decoder=decoder)
    if kf.frames < 2:
        raise VideoError(f"{path}: {kf.frames} decodable frame(s); a video needs at least 2")
    return kf

