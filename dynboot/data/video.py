"""Video files: write (PyAV, H.264) and read in bounded memory (decord, or PyAV packet by packet as fallback).

    src = open_video(path)                              # probes only: no frame decoded yet
    src.info                                            # VideoInfo(frames, fps, height, width, decoder)
    for chunk in src.thumbnails(90, 160, chunk=64): ... # decode-side resize: [n, 90, 160, 3] at a time
    for index, frame in src.frames([12, 40]): ...       # full-size frames, one at a time
    frames, decoder = read_video(path)                  # a whole (small) video in memory: tests, the world

Memory is bounded by design: scoring reads thumbnails that the decoder itself scales down (decord's
`VideoReader(width=, height=)`, PyAV's `VideoFrame.to_ndarray(width=, height=)`, both swscale bilinear, so the two
decoders give the same thumbnails to within a level), and only the chosen key frames are decoded at full size,
one at a time. What a caller holds is thus one chunk of thumbnails or one full frame, never the video.

decord is fast but indexes the whole file when it opens it, so a damaged file yields no frame at all; PyAV
decoding packet by packet, skipping packets the decoder rejects, salvages what is readable. Its two passes
(thumbnails, then key frames) decode the same packets in the same order, so frame indices agree between them.

A video that cannot give key frames raises `VideoFault` with a `reason` the relabel stage maps to a quarantine
reason. Missing files and I/O errors are not faults of the video: they propagate as the OSErrors they are, so
callers can tell a transient storage error (retry later) from a bad video (quarantine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Protocol, Sequence

import av
import numpy as np

__all__ = ["FaultReason", "VideoFault", "Decoder", "VideoInfo", "FrameSource", "open_video", "ArraySource",
           "thumbnail_shape", "read_video", "write_video"]

FaultReason = Literal["empty_file", "unreadable", "too_short", "no_keyframes", "too_large"]
Decoder = Literal["decord", "pyav"]
X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"]


class VideoFault(RuntimeError):
    """A video that cannot give key-frame pairs, and why (`reason`, one of FaultReason; `msg`, the detail)."""

    def __init__(self, reason: FaultReason, msg: str):
        super().__init__(msg)  # the message says it in words ("unreadable video <path>: ..."); reason is the code
        self.reason: FaultReason = reason
        self.msg = msg

    def __reduce__(self):  # picklable with both arguments (Ray ships exceptions between processes)
        return type(self), (self.reason, self.msg)


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # frames in the stream (PyAV: from the container, 0 when it does not say; counted while decoding)
    fps: float  # average frame rate (0.0 when the container does not say)
    height: int
    width: int
    decoder: str  # Decoder, or "memory" for frames already decoded (ArraySource)


class FrameSource(Protocol):
    """A video's frames in bounded memory; `thumbnails` then `frames` is the key-frame access pattern."""

    info: VideoInfo

    def thumbnails(self, height: int, width: int, chunk: int) -> Iterator[np.ndarray]:
        """Every frame in order, scaled to [height, width] by the decoder, at most `chunk` frames per array."""

    def frames(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(index, full-size RGB frame) for the sorted `indices` (None: every frame), one frame at a time."""


def thumbnail_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the aspect ratio of `height` x `width`, the long side at most `long_side`, both even (swscale
    and yuv420 like even sizes) and at least 2; never larger than the frame."""
    scale = min(1.0, long_side / max(height, width))
    return (max(2, int(round(height * scale / 2)) * 2) if scale < 1 else height,
            max(2, int(round(width * scale / 2)) * 2) if scale < 1 else width)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


# ---- decord -------------------------------------------------------------------------------------------------
class DecordSource:
    """decord, one thread. Opening indexes the file (no frame decoded); a damaged file fails here or mid-read.

    One reader at a time: while a full-size reader is alive, a resized reader of the same file holds ~5 MB per
    1080p frame it has decoded (measured: 520 MB for 100 thumbnails vs 30 MB without it), so the probe's
    reader is closed before the thumbnails are read and the full-size one is opened only for the key frames."""

    def __init__(self, path: str):
        import decord

        self.path, self._decord = path, decord
        vr = self._reader()
        n = len(vr)
        height, width = (vr[0].shape[:2] if n else (0, 0))  # decord exposes no size without decoding a frame
        self.info = VideoInfo(n, float(vr.get_avg_fps() or 0.0), int(height), int(width), "decord")
        del vr

    def _reader(self, **size):
        return self._decord.VideoReader(self.path, num_threads=1, ctx=self._decord.cpu(0), **size)

    def thumbnails(self, height: int, width: int, chunk: int) -> Iterator[np.ndarray]:
        vr = self._reader(width=width, height=height)
        for start in range(0, len(vr), chunk):
            yield vr.get_batch(list(range(start, min(len(vr), start + chunk)))).asnumpy()

    def frames(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        vr = self._reader()
        if indices is None:  # every frame (small videos only): sequential batches, no seeking
            for start in range(0, len(vr), 64):
                batch = vr.get_batch(list(range(start, min(len(vr), start + 64)))).asnumpy()
                yield from zip(range(start, start + len(batch)), batch)
            return
        for i in indices:
            yield int(i), vr[int(i)].asnumpy()


# ---- PyAV ---------------------------------------------------------------------------------------------------
class PyAVSource:
    """PyAV packet by packet, one thread, skipping packets the decoder rejects (`bad_packets` counts them)."""

    def __init__(self, path: str):
        self.path = path
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoFault("unreadable", f"unreadable video {path}: no video stream")
            s = container.streams.video[0]
            rate = s.average_rate or s.guessed_rate
            self.info = VideoInfo(int(s.frames or 0), float(rate) if rate else 0.0, int(s.codec_context.height),
                                  int(s.codec_context.width), "pyav")
        self.bad_packets = 0

    def _decoded(self) -> Iterator[av.VideoFrame]:
        bad = 0
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type, stream.codec_context.thread_count = "SLICE", 1
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    bad += 1
                    continue
                yield from frames
        self.bad_packets = bad

    def thumbnails(self, height: int, width: int, chunk: int) -> Iterator[np.ndarray]:
        batch = []
        for frame in self._decoded():  # BILINEAR: decord's scaler, so both decoders score the same thumbnails
            batch.append(frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BILINEAR"))
            if len(batch) == chunk:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    def frames(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        wanted = None if indices is None else set(int(i) for i in indices)
        last = math.inf if wanted is None else max(wanted, default=-1)
        for i, frame in enumerate(self._decoded()):
            if i > last:
                break
            if wanted is None or i in wanted:
                yield i, frame.to_ndarray(format="rgb24")


# ---- frames already in memory -------------------------------------------------------------------------------
class ArraySource:
    """Frames already decoded [T, H, W, 3] uint8, behind the same interface (thumbnails: OpenCV, bilinear)."""

    def __init__(self, frames: np.ndarray, fps: float = 0.0):
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3]; got {frames.dtype} {list(frames.shape)}")
        self._frames = frames
        self.info = VideoInfo(len(frames), float(fps), int(frames.shape[1]), int(frames.shape[2]), "memory")

    def thumbnails(self, height: int, width: int, chunk: int) -> Iterator[np.ndarray]:
        import cv2

        for start in range(0, len(self._frames), chunk):
            part = self._frames[start:start + chunk]
            if part.shape[1:3] == (height, width):
                yield part
            else:
                yield np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in part])

    def frames(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        for i in range(len(self._frames)) if indices is None else indices:
            yield int(i), self._frames[int(i)]


def open_video(path: str | Path, decoder: Literal["auto", "decord", "pyav"] = "auto") -> DecordSource | PyAVSource:
    """A FrameSource for a local file: decord unless it cannot open the file (or `decoder="pyav"`).

    Raises FileNotFoundError for a missing file, VideoFault("empty_file") for a 0-byte one and
    VideoFault("unreadable") naming both decoders' reasons when neither opens it."""
    path = str(path)
    if Path(path).stat().st_size == 0:  # stat: a missing file raises FileNotFoundError, not a fault of the video
        raise VideoFault("empty_file", f"empty file (0 bytes): {path}")
    errors = []
    if decoder in ("auto", "decord"):
        try:
            return DecordSource(path)
        except Exception as err:  # DECORDError is no RuntimeError subclass: any decord failure means "try PyAV"
            if decoder == "decord":
                raise VideoFault("unreadable", f"unreadable video {path}: decord: {_short(err)}") from None
            errors.append(f"decord: {_short(err)}")
    try:
        return PyAVSource(path)
    except VideoFault:
        raise
    except Exception as err:  # av.error.* (InvalidDataError, ...) on a file that is no video
        errors.append(f"pyav: {_short(err)}")
        raise VideoFault("unreadable", f"unreadable video {path}: " + "; ".join(errors)) from None


def read_video(path: str | Path) -> tuple[np.ndarray, str]:
    """All frames [T, H, W, 3] uint8 of a small video and the decoder that produced them ('decord' or 'pyav').

    Holds the whole video: for tests and the embedded world's 40 px clips, never for real footage (use
    dynboot.data.keyframes.video_keyframes, which holds thumbnails and key frames only)."""
    src = open_video(path)
    try:
        frames = [f for _, f in src.frames()]
    except Exception as err:
        if isinstance(src, PyAVSource):
            raise VideoFault("unreadable", f"unreadable video {path}: pyav: {_short(err)}") from None
        src = PyAVSource(str(path))  # decord opened the file but failed mid-read: salvage with PyAV
        frames = [f for _, f in src.frames()]
    if not frames:
        raise VideoFault("unreadable", f"unreadable video {path}: no decodable frame")
    return np.stack(frames), src.info.decoder


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: int = 10, crf: int = 12,
                pix_fmt: Literal["yuv444p", "yuv420p"] = "yuv444p", preset: X264Preset = "veryfast") -> Path:
    """Write RGB uint8 frames (an array [T, H, W, 3] or any iterable of [H, W, 3], H and W even, streamed: the
    video is never held whole) as an H.264 mp4, atomically (temp file + rename); returns the path.

    yuv444p (the default) keeps the world's 8-px cells their exact colours; yuv420p is what real footage uses."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    stream, shape = None, None
    try:
        with av.open(str(tmp), mode="w") as container:
            for frame in frames:
                frame = np.asarray(frame)
                if shape is None:
                    shape = frame.shape
                    if frame.ndim != 3 or shape[-1] != 3 or shape[0] % 2 or shape[1] % 2:
                        raise ValueError(f"frames must be [H, W, 3] with even H, W; got {list(shape)}")
                    stream = container.add_stream("libx264", rate=fps)
                    stream.width, stream.height, stream.pix_fmt = shape[1], shape[0], pix_fmt
                    stream.options = {"crf": str(crf), "preset": preset, "g": "30"}
                    stream.thread_count = 1
                elif frame.shape != shape:
                    raise ValueError(f"every frame must be {list(shape)}; got {list(frame.shape)}")
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, np.uint8),
                                                                       format="rgb24")):
                    container.mux(packet)
            if stream is None:
                raise ValueError("no frames to write")
            for packet in stream.encode():
                container.mux(packet)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path
