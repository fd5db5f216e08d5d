"""Key frames of a video and the (before, after) pairs they form, at the model's input through its image policy.

    kf = video_keyframes(path, KeyframeConfig(), model.tokenizer.policy)   # decode + score + select + PNGs
    kf.pairs                       # [(a, b), ...]: consecutive key frames of one shot
    kf.images[a]                   # PNG bytes, policy.apply(frame a): the model's S x S input
    kf.pair_provenance(a, b)       # fps, shot, motion scores, decoder, ... for a pair row
    track = motion_track(frames, cfg); keys = select_keyframes(track, cfg, fps)   # the steps, on frames in memory

Two strategies (`KeyframeConfig.strategy`):

- `peaks` (the default: real footage) is the paper's: a motion score per frame from dense optical flow, the top
  K_f = `k` = 6 frames at least I_f = `min_gap` = 20 frames apart (or `min_gap_s` seconds, through the video's
  fps), consecutive key frames paired. The flow is scored with the camera's own motion removed and scene cuts
  detected (dynboot/data/motion.py: FlowMotion), so a pan alone scores ~0 and a cut is never a peak. Key frames are
  chosen within shots and pairs never span a cut: the gap applies within a shot, and every shot chosen from
  gets at least two key frames (one alone would pair with nothing; see select_peaks). Only frames whose motion
  exceeds `min_motion` are candidates, so a still or merely panning clip has none.
- `stills` is the embedded world's: the middle frame of every run of at least `min_still` frames with (almost)
  no motion (dynboot/data/motion.py: BlockChanges). The world holds each key state for `hold` frames and shows the
  action in `transition` frames of motion between them (dynboot/world/episodes.py), so the still runs are exactly
  its key states and consecutive stills exactly the true pairs; peaks there would land mid-motion. The world's
  relabel runs set `keyframes.strategy=stills`.

Every video ends as pairs or as a `VideoFault` (dynboot/data/video.py) naming its reason: `empty_file`, `unreadable`,
`too_short` (fewer frames than two key frames need), `no_keyframes` (frames, but no pair: e.g. no motion above
`min_motion`, or a world clip without two still runs), `too_large` (a frame over `max_pixels`). Never an empty
list in silence.

Memory is bounded by design: pass 1 streams thumbnails that the decoder scales down itself (long side
`motion_px`) through the scorer, `chunk` frames at a time, keeping only the per-frame scores; pass 2 decodes
the chosen key frames at full size one at a time and keeps each only as its PNG at the model's input size. So a
task holds at most `max_pixels` pixels of frames (a chunk of thumbnails, or one full frame) whatever the video's
length; a video whose single frame exceeds it is `too_large`, and the chunk shrinks to fit. decord decodes;
a file it cannot open or read is decoded by PyAV packet by packet, which salvages damaged files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field

from dynboot.io import storage
from dynboot.config import Config
from dynboot.io.images import ImagePolicy, encode_png
from dynboot.data.motion import BlockChanges, FlowMotion, MotionTrack
from dynboot.data.video import ArraySource, FrameSource, PyAVSource, VideoFault, open_video, thumbnail_shape

__all__ = ["KeyframeConfig", "Keyframes", "Strategy", "as_policy", "gap_frames", "motion_track", "select_peaks",
           "select_stills", "select_keyframes", "consecutive_pairs", "keyframes_of", "extract_keyframes",
           "video_keyframes"]

Strategy = Literal["peaks", "stills"]


class KeyframeConfig(Config):
    """How key frames are chosen in a video (see dynboot/data/keyframes.py)."""

    strategy: Strategy = Field("peaks", description="peaks: the k frames of most (camera-compensated optical-flow) "
                               "motion, min_gap apart within a shot (the paper; real footage); stills: the middle "
                               "frame of each still run (exact on the embedded world: its runs set it).")
    k: int = Field(6, ge=2, description="peaks: most key frames per video (the paper's K_f: 6).")
    min_gap: int = Field(20, ge=1, description="peaks: fewest frames between two key frames of a shot (the paper's "
                         "I_f: 20).")
    min_gap_s: float = Field(0.0, ge=0, description="peaks: the gap in seconds instead, converted with the video's "
                             "fps (0 = use min_gap; min_gap also when the video has no fps).")
    min_motion: float = Field(0.02, ge=0, description="peaks: a frame is a candidate only when its motion exceeds "
                              "this (residual flow mass, in pixels per frame at 160 px; a camera pan alone scores "
                              "< 0.015, moving people 0.05-0.6).")
    flow_noise: float = Field(0.3, ge=0, description="peaks: residual flow up to this many pixels (at 160 px) is "
                              "noise and scores 0.")
    cut_histogram: float = Field(0.3, ge=0, le=1, description="peaks: a scene cut where consecutive colour "
                                 "histograms differ by more than this (Bhattacharyya distance).")
    cut_warp: float = Field(25.0, ge=0, description="peaks: ... or where the flow leaves a mean error over this many "
                            "grey levels (the new frame is not the old one moved).")
    min_still: int = Field(3, ge=1, description="stills: fewest frames a still run must last to count as a key state.")
    still_threshold: float = Field(0.002, ge=0, le=1, description="stills: a frame is still when at most this fraction "
                                   "of its pixel blocks changed since the previous frame.")
    max_keyframes: int = Field(0, ge=0, description="stills: keep at most this many key frames (0 = all).")
    pixel_delta: int = Field(16, ge=0, le=255, description="stills: a pixel block changed when its mean moved by more "
                             "than this in some channel.")
    pool: int = Field(2, ge=1, le=16, description="stills: average pool x pool pixel blocks before differencing "
                      "(removes codec noise).")
    motion_px: int = Field(160, ge=16, description="Motion is scored on thumbnails the decoder scales to at most "
                           "this many pixels on the long side.")
    chunk: int = Field(64, ge=1, description="Thumbnails decoded at a time while scoring (max_pixels may lower it).")
    max_pixels: int = Field(40_000_000, ge=1, description="Most pixels of frames a task holds at once (a chunk of "
                            "thumbnails, or one full-size key frame): a video whose frame is larger is too_large "
                            "(40 M: up to 8K).")
    decoder: Literal["auto", "decord", "pyav"] = Field("auto", description="auto: decord, and PyAV packet by packet "
                                                       "for files decord cannot read; or force one.")


@dataclass
class Keyframes:
    """Key frames of one video and the pairs they form; images are PNG bytes at the model's input (its policy)."""

    frames: int  # frames decoded
    decoder: str  # "decord" | "pyav" | "memory"
    indices: list[int]  # selected key frames, sorted
    pairs: list[tuple[int, int]]  # consecutive key frames of one shot
    images: dict[int, bytes] = field(default_factory=dict)  # frame index -> PNG
    motion: dict[int, float] = field(default_factory=dict)  # frame index -> motion score
    size: tuple[int, int] = (0, 0)  # source frame (height, width)
    fps: float = 0.0  # the video's frame rate (0: unknown)
    shots: dict[int, int] = field(default_factory=dict)  # frame index -> shot index
    cuts: list[int] = field(default_factory=list)  # frames that start a new shot
    gap: int = 0  # the minimum gap used, in frames
    strategy: str = ""

    def provenance(self) -> dict[str, Any]:
        """JSON-able facts of the whole video (key frames, their motion and shots, cuts)."""
        return {"decoder": self.decoder, "frames": self.frames, "fps": round(self.fps, 4), "frame_hw": list(self.size),
                "strategy": self.strategy, "min_gap": self.gap, "keyframes": self.indices,
                "motion": {str(k): v for k, v in self.motion.items()},
                "shots": {str(k): v for k, v in self.shots.items()}, "cuts": self.cuts}

    def pair_provenance(self, a: int, b: int) -> dict[str, Any]:
        """JSON-able facts of the pair (a, b), for its row."""
        return {"decoder": self.decoder, "frames": self.frames, "fps": round(self.fps, 4), "frame_hw": list(self.size),
                "strategy": self.strategy, "min_gap": self.gap, "shot": self.shots.get(a, 0),
                "motion": [self.motion.get(a), self.motion.get(b)]}


def as_policy(policy: ImagePolicy | int) -> ImagePolicy:
    """The image policy; an int S is the transitional spelling of the old behaviour (centre crop to S, bicubic)
    for callers that do not have the model's policy yet."""
    if isinstance(policy, ImagePolicy):
        return policy
    return ImagePolicy(kind="center_crop", size=int(policy), resample="bicubic")


def gap_frames(cfg: KeyframeConfig, fps: float) -> int:
    """The minimum gap in frames: min_gap_s x fps when both are known, else min_gap."""
    if cfg.min_gap_s > 0 and fps > 0:
        return max(1, round(cfg.min_gap_s * fps))
    return cfg.min_gap


# ---- selection ----------------------------------------------------------------------------------------------
def select_peaks(motion: np.ndarray, k: int, min_gap: int, shots: np.ndarray | None = None,
                 min_motion: float = 0.0) -> list[int]:
    """Up to `k` frames of highest motion (> `min_motion`), each at least `min_gap` from every other chosen in its
    shot, such that every shot chosen from gets at least two (a key frame alone in its shot pairs with nothing).
    Sorted by time; ties go to the earlier frame, so the choice is deterministic.

    Greedy by motion, as the paper's top-K with a minimum interval, with two guards that make every pick pairable:
    a frame no other candidate of its shot is `min_gap` away from is never taken (it would block the shot), and
    a pick that opens a shot is taken only while the budget can still give each open shot its second key frame."""
    motion = np.asarray(motion, np.float64)
    shots = np.zeros(len(motion), np.int64) if shots is None else np.asarray(shots)
    candidates = np.flatnonzero(motion > min_motion)
    first, last = {}, {}
    for t in candidates.tolist():
        first.setdefault(shots[t], t)
        last[shots[t]] = t
    pairable = [t for t in candidates.tolist() if t - first[shots[t]] >= min_gap or last[shots[t]] - t >= min_gap]
    chosen: list[int] = []
    per_shot: Counter = Counter()
    for t in sorted(pairable, key=lambda t: (-motion[t], t)):
        s = shots[t]
        if any(abs(t - c) < min_gap for c in chosen if shots[c] == s):
            continue
        lone = sum(1 for n in per_shot.values() if n == 1) + {0: 1, 1: -1}.get(per_shot[s], 0)  # after taking t
        if len(chosen) + 1 + lone > k:  # no room left to complete every open shot
            continue
        chosen.append(t)
        per_shot[s] += 1
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


def select_keyframes(track: MotionTrack, cfg: KeyframeConfig, fps: float = 0.0) -> list[int]:
    if cfg.strategy == "peaks":
        return select_peaks(track.motion, cfg.k, gap_frames(cfg, fps), track.shots(), cfg.min_motion)
    return select_stills(track.motion, cfg.min_still, cfg.still_threshold, cfg.max_keyframes)


def consecutive_pairs(indices: list[int], shots: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Consecutive key frames as (before, after) pairs, never across a cut (`shots`: shot index per frame)."""
    return [(a, b) for a, b in zip(indices[:-1], indices[1:]) if shots is None or shots[a] == shots[b]]


# ---- decoding -----------------------------------------------------------------------------------------------
class _DecodeError(Exception):
    """The decoder failed while reading (not our own code): worth another decoder."""


def _decoded(items: Iterator, what: str) -> Iterator:
    """`items`, with the decoder's own exceptions turned into _DecodeError (a VideoFault passes as it is)."""
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except VideoFault:
            raise
        except Exception as err:  # decord's DECORDError, av.error.*: the file, not our code
            raise _DecodeError(f"{what}: {type(err).__name__}: {str(err).strip()[:200]}") from err
        yield item


def _scorer(cfg: KeyframeConfig, thumb_hw: tuple[int, int]) -> FlowMotion | BlockChanges:
    if cfg.strategy == "stills":
        return BlockChanges(cfg.pixel_delta, cfg.pool)
    return FlowMotion(noise_px=cfg.flow_noise, cut_histogram=cfg.cut_histogram, cut_warp=cfg.cut_warp,
                      unit=160 / max(thumb_hw))


def _thumb_plan(src: FrameSource, cfg: KeyframeConfig, path: str) -> tuple[tuple[int, int], int]:
    """(thumbnail shape, chunk) within max_pixels; too_large when one full frame is over it."""
    info = src.info
    if info.height * info.width > cfg.max_pixels:
        raise VideoFault("too_large", f"too large: {path}: frames of {info.width}x{info.height} = "
                         f"{info.height * info.width} pixels exceed max_pixels={cfg.max_pixels}")
    hw = thumbnail_shape(info.height, info.width, cfg.motion_px)
    return hw, max(1, min(cfg.chunk, cfg.max_pixels // (hw[0] * hw[1])))


def motion_track(frames: np.ndarray | FrameSource, cfg: KeyframeConfig, name: str = "frames") -> MotionTrack:
    """The strategy's motion scores (and cuts) of frames [T, H, W, 3] in memory, or of a FrameSource."""
    src = frames if hasattr(frames, "thumbnails") else ArraySource(np.asarray(frames))
    hw, chunk = _thumb_plan(src, cfg, name)
    scorer = _scorer(cfg, hw)
    for part in _decoded(iter(src.thumbnails(*hw, chunk)), "thumbnails"):
        scorer.update(part)
    return scorer.result()


def keyframes_of(src: FrameSource, cfg: KeyframeConfig, policy: ImagePolicy | int, name: str = "video") -> Keyframes:
    """Key frames of an opened video (two passes over `src`; module doc). Raises VideoFault, or _DecodeError when
    the decoder fails mid-read."""
    policy, info = as_policy(policy), src.info
    gap = gap_frames(cfg, info.fps)
    need = gap + 1 if cfg.strategy == "peaks" else 2  # two key frames `gap` apart

    def too_short(frames: int) -> VideoFault:
        return VideoFault("too_short", f"too short: {name}: {frames} decodable frame(s); a pair needs at least {need}")

    if info.decoder == "decord" and info.frames < need:  # decord's count is exact: fail before decoding
        raise too_short(info.frames)
    track = motion_track(src, cfg, name)
    if track.frames < need:
        raise too_short(track.frames)
    keys = select_keyframes(track, cfg, info.fps)
    shots = track.shots()
    pairs = consecutive_pairs(keys, shots)
    if not pairs:
        if cfg.strategy == "peaks":
            detail = (f"no shot has two frames with motion > min_motion={cfg.min_motion} at least {gap} frames "
                      f"apart (highest motion {track.motion.max():.4f}, {len(track.cuts) + 1} shot(s))")
        else:
            detail = f"{len(keys)} still run(s) of >= {cfg.min_still} frames; a pair needs 2"
        raise VideoFault("no_keyframes", f"no key frames: {name}: {track.frames} frames, {detail}")
    images = {i: encode_png(policy.apply(frame)) for i, frame in _decoded(iter(src.frames(keys)), "key frames")}
    if sorted(images) != keys:
        raise _DecodeError(f"key frames: decoded {sorted(images)} of {keys}")
    return Keyframes(track.frames, info.decoder, keys, pairs, images,
                     {k: round(float(track.motion[k]), 6) for k in keys}, (info.height, info.width), info.fps,
                     {k: int(shots[k]) for k in keys}, track.cuts, gap if cfg.strategy == "peaks" else 0, cfg.strategy)


def extract_keyframes(frames: np.ndarray, cfg: KeyframeConfig, policy: ImagePolicy | int,
                      fps: float = 0.0) -> Keyframes:
    """Key frames and pairs of an already decoded video [T, H, W, 3] uint8."""
    return keyframes_of(ArraySource(frames, fps), cfg, policy)


def video_keyframes(path: str | Path, cfg: KeyframeConfig, policy: ImagePolicy | int) -> Keyframes:
    """Decode the video at `path` (local, or a URI: copied to a local temp file) and pick its key frames.

    Raises VideoFault (module doc) for a video that gives no pair, FileNotFoundError / OSError for storage errors."""
    path = str(path)
    if storage.is_uri(path):
        with storage.local_copy(path) as local:
            return _local_keyframes(local, cfg, policy, path)
    return _local_keyframes(path, cfg, policy, path)


def _local_keyframes(local: str, cfg: KeyframeConfig, policy: ImagePolicy | int, name: str) -> Keyframes:
    src = open_video(local, cfg.decoder)
    try:
        return keyframes_of(src, cfg, policy, name)
    except _DecodeError as err:
        if cfg.decoder != "auto" or isinstance(src, PyAVSource):
            raise VideoFault("unreadable", f"unreadable video {name}: {src.info.decoder}: {err}") from None
        first = err  # decord opened the file but failed reading it: salvage what PyAV can read
    try:
        return keyframes_of(open_video(local, "pyav"), cfg, policy, name)
    except _DecodeError as err:
        raise VideoFault("unreadable", f"unreadable video {name}: decord: {first}; pyav: {err}") from None
