"""Video files: write (PyAV, H.264) and read (decord, with PyAV packet-by-packet decoding as fallback).

decord is fast on small frames but indexes the whole file when it opens it, so a damaged file yields no
frame at all; PyAV decoding packet by packet, skipping bad packets, salvages what is readable. Both raise
Python exceptions on bad input (never segfault), which callers turn into quarantine rows.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


class VideoError(RuntimeError):
    """A video that neither decoder could read (or that holds no frame)."""


def write_video(path: str | Path, frames: np.ndarray | list[np.ndarray], fps: int = 10, crf: int = 12) -> Path:
    """Write RGB uint8 frames [T, H, W, 3] (H, W even) as an H.264 mp4; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be [T, H, W, 3] with even H, W; got {list(frames.shape)}")
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p"  # no chroma subsampling: 8-px cells keep their colours
        stream.options = {"crf": str(crf), "preset": "veryfast", "g": "30"}
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def _read_decord(path: str, indices: list[int] | None) -> np.ndarray:
    import decord

    vr = decord.VideoReader(path, num_threads=1, ctx=decord.cpu(0))
    idx = list(range(len(vr))) if indices is None else indices
    return vr.get_batch(idx).asnumpy()


def _read_pyav(path: str) -> tuple[np.ndarray, int]:
    """Decode packet by packet, skipping packets the decoder rejects; returns (frames, bad packets)."""
    frames, bad = [], 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        for packet in container.demux(stream):
            try:
                frames.extend(f.to_ndarray(format="rgb24") for f in packet.decode())
            except av.error.InvalidDataError:
                bad += 1
    if not frames:
        raise VideoError(f"{path}: no decodable frame")
    return np.stack(frames), bad


def read_video(path: str | Path) -> tuple[np.ndarray, str]:
    """All frames [T, H, W, 3] uint8 and the decoder that produced them ('decord' or 'pyav').

    Raises VideoError (with both decoders' reasons) when nothing can be read.
    """
    path = str(path)
    try:
        return _read_decord(path, None), "decord"
    except Exception as decord_err:  # DECORDError is not a RuntimeError subclass
        try:
            frames, _ = _read_pyav(path)
            return frames, "pyav"
        except Exception as pyav_err:
            raise VideoError(f"unreadable video {path}: decord: {_short(decord_err)}; pyav: {_short(pyav_err)}") from None


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"
