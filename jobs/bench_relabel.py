"""Benchmark of the relabel job: is the pipeline the bottleneck, does memory stay flat, how good are the labels?

    python -m jobs.bench_relabel                                  # untrained tiny IDP: throughput and memory
    python -m jobs.bench_relabel tiny_size=m                      # a model that costs more per pair
    python -m jobs.bench_relabel model_path=runs/quickstart/idp/model videos=40 scale=10   # + label accuracy

Measured in one run, on one local Ray cluster (`num_cpus` logical CPUs), with the same model, batch size and
actor resources throughout:
1. IDP-model-only pairs/s: one actor with the relabel job's resources runs caption + action_logprob over the
   pre-decoded pairs of the 10x input, batch_size at a time (measured before and after the end-to-end runs;
   the mean is the reference);
2. end-to-end pairs/s of the relabel job on 1x and 10x input (`videos` and scale*`videos` world videos):
   pairs / wall time of the whole pipeline (actor start-up included), and steady-state pairs/s between the
   first and the last shard published; the ratios to (1) say whether decoding, transfer or writing slow the
   model down (the goal: >= 0.9);
3. peak object-store bytes (raylet store stats) and peak RSS (this process and every Ray process it started)
   sampled while each end-to-end run goes: flat from 1x to 10x means streaming, not materialising;
4. pseudo-label accuracy of the 10x output against the world's videos_truth.jsonl (meaningful with a trained
   IDP; with the untrained one only `coverage` / `unmatched` say something, about the key frames).
Prints the JSON and writes it to `<out>/bench_relabel.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from dynboot.config import Config
from dynboot.rundir import write_json


class BenchConfig(Config):
    """Relabel benchmark (see jobs/bench_relabel.py)."""

    out: str = Field("runs/bench_relabel", description="Working directory: world, model, relabel outputs, JSON.")
    videos: int = Field(40, ge=1, description="1x input: world videos (8 pairs each).")
    scale: int = Field(10, ge=2, description="The large input is scale x videos.")
    model_path: str = Field("", description="IDP checkpoint ('' = an untrained tiny IDP, for throughput only).")
    backend: str = Field("tiny", description="Model backend.")
    tiny_size: str = Field("xs", description="Size of the untrained tiny IDP when model_path is '' (xxs, xs, s, m): "
                           "larger models cost more per pair, as real IDPs do.")
    batch_size: int = Field(32, ge=1, description="Pairs per IDP forward call (both measurements).")
    videos_per_batch: int = Field(4, ge=1, description="Videos per actor call in the relabel job.")
    videos_per_task: int = Field(8, ge=1, description="Videos per decode task in the relabel job.")
    idp_threads: int = Field(1, ge=1, description="torch threads of the IDP actor (both measurements).")
    idp_cpus: float = Field(1.0, ge=0, description="CPUs reserved per IDP actor (both measurements).")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs per decode task in the relabel job.")
    num_cpus: int = Field(2, ge=1, description="Logical CPUs of the local Ray cluster.")
    sample_s: float = Field(0.5, gt=0, description="Seconds between memory samples.")
    seed: int = Field(0, description="World seed.")


class IDPOnly:
    """The model alone, in an actor with the relabel IDP actor's resources: pairs/s of caption + log-prob."""

    def __init__(self, model_path: str, backend: str, threads: int):
        import torch

        from dynboot.models.registry import load_model

        torch.set_num_threads(threads)
        self.model = load_model(model_path, backend or None).eval()

    def run(self, before, after, batch_size: int) -> dict[str, float]:
        t0, n = time.perf_counter(), 0
        for i in range(0, len(before), batch_size):
            b, a = before[i:i + batch_size], after[i:i + batch_size]
            captions = self.model.caption(b, a)
            self.model.action_logprob(b, a, captions)
            n += len(captions)
        wall = time.perf_counter() - t0
        return {"pairs": n, "wall_s": round(wall, 3), "pairs_per_s": round(n / wall, 2)}


class MemorySampler(threading.Thread):
    """Peak object-store bytes and peak summed RSS of this process tree (the local Ray cluster included)."""

    def __init__(self, gcs_address: str, every_s: float):
        super().__init__(daemon=True)
        from ray._private.internal_api import get_state_from_address

        self.state, self.every_s, self.stop_flag = get_state_from_address(gcs_address), every_s, threading.Event()
        self.peak_store = self.peak_rss = self.peak_driver_rss = self.samples = 0

    def _store_bytes(self) -> int:
        from ray._private.internal_api import get_memory_info_reply

        return int(get_memory_info_reply(self.state).store_stats.object_store_bytes_used)

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop_flag.is_set():
            rss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_driver_rss = max(self.peak_driver_rss, me.memory_info().rss)
            self.peak_store = max(self.peak_store, self._store_bytes())
            self.samples += 1
            self.stop_flag.wait(self.every_s)

    def result(self) -> dict[str, Any]:
        self.stop_flag.set()
        self.join()
        mb = lambda x: round(x / 2**20, 1)  # noqa: E731
        return {"peak_object_store_mb": mb(self.peak_store), "peak_rss_mb": mb(self.peak_rss),
                "peak_driver_rss_mb": mb(self.peak_driver_rss), "samples": self.samples}


def _prepare(cfg: BenchConfig, out: Path) -> tuple[Path, str]:
    from dynboot.world.generate import WorldConfig, generate_world

    world = out / "world"
    n = cfg.videos * cfg.scale
    if not (world / "videos_truth.jsonl").is_file() or len((world / "videos_truth.jsonl").read_text().splitlines()) != n:
        shutil.rmtree(world, ignore_errors=True)
        generate_world(WorldConfig(out=str(world), gold=0, test=0, videos=n, seed=cfg.seed, workers=2))
    rows = (world / "videos" / "manifest.jsonl").read_text().splitlines()
    (world / "videos_1x.jsonl").write_text("\n".join(rows[: cfg.videos]) + "\n")  # the first 1x videos of the 10x
    model_path = cfg.model_path
    if not model_path:
        from dynboot.models.tiny import TinyWorldModel
        from dynboot.world import WorldSpec

        model_path = str(TinyWorldModel.create(WorldSpec(), size=cfg.tiny_size).save(out / f"idp_untrained_{cfg.tiny_size}"))
    return world, model_path


def _pairs(world: Path, image_size: int):
    """Every key-frame pair of the world's videos, decoded: the model-only input."""
    import numpy as np

    from dynboot.images import decode_image
    from dynboot.keyframes import KeyframeConfig, video_keyframes

    before, after = [], []
    for p in sorted((world / "videos").glob("*.mp4")):
        kf = video_keyframes(str(p), KeyframeConfig(), image_size)
        before += [decode_image(kf.images[a]) for a, _ in kf.pairs]
        after += [decode_image(kf.images[b]) for _, b in kf.pairs]
    return np.stack(before), np.stack(after)


def _steady_pairs_per_s(run_dir: Path) -> float | None:
    """Pairs/s between the first and the last shard published (start-up excluded)."""
    import pyarrow.parquet as pq

    shards = sorted((run_dir / "shards").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(shards) < 2:
        return None
    span = shards[-1].stat().st_mtime - shards[0].stat().st_mtime
    return round(sum(pq.read_metadata(p).num_rows for p in shards[1:]) / span, 2) if span > 0 else None


def run(cfg: BenchConfig) -> dict[str, Any]:
    import ray

    from dynboot.pseudo_labels import pseudo_label_accuracy
    from jobs.relabel import RelabelConfig, run as relabel

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    world, model_path = _prepare(cfg, out)
    load_before = os.getloadavg()
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        from dynboot.models.registry import load_model

        image_size = load_model(model_path, cfg.backend or None).tokenizer.image_size
        before, after = _pairs(world, image_size)

        def model_alone() -> dict[str, float]:
            actor = ray.remote(num_cpus=cfg.idp_cpus)(IDPOnly).remote(model_path, cfg.backend, cfg.idp_threads)
            refs = [ray.put(before), ray.put(after)]  # freed on return: they must not count as the job's store use
            try:
                return ray.get(actor.run.remote(*refs, cfg.batch_size))
            finally:
                ray.kill(actor)  # its CPU goes back: the relabel job needs every CPU the cluster has
                del refs

        model_only = [model_alone()]
        runs = {}
        for name, videos in (("1x", world / "videos_1x.jsonl"), (f"{cfg.scale}x", world / "videos")):
            run_dir = out / f"relabel_{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            sampler = MemorySampler(gcs, cfg.sample_s)
            for _ in range(100):  # objects are freed asynchronously: start from an empty store
                if sampler._store_bytes() < 2**20:
                    break
                time.sleep(0.1)
            sampler.start()
            summary = relabel(RelabelConfig(
                videos=str(videos), out=str(run_dir), model_path=model_path, backend=cfg.backend, image_size=image_size,
                batch_size=cfg.batch_size, videos_per_batch=cfg.videos_per_batch, idp_threads=cfg.idp_threads,
                idp_cpus=cfg.idp_cpus, decode_cpus=cfg.decode_cpus, videos_per_task=cfg.videos_per_task, progress_s=10))
            runs[name] = {"videos": summary["videos_done"], "pairs": summary["pairs_written"],
                          "wall_s": summary["wall_s"], "pairs_per_s": summary["pairs_per_s"],
                          "steady_pairs_per_s": _steady_pairs_per_s(run_dir), "stage_s": summary["stage_s"],
                          **sampler.result()}
        model_only.append(model_alone())
    finally:
        ray.shutdown()
    reference = sum(m["pairs_per_s"] for m in model_only) / len(model_only)
    big, small = runs[f"{cfg.scale}x"], runs["1x"]
    result = {
        "config": cfg.model_dump(mode="json") | {"model_path": model_path},
        "model_only": model_only, "model_only_pairs_per_s": round(reference, 2),
        "end_to_end": runs,
        "ratio_end_to_end": round(big["pairs_per_s"] / reference, 3),
        "ratio_steady": round(big["steady_pairs_per_s"] / reference, 3) if big["steady_pairs_per_s"] else None,
        "memory_ratio_large_to_1x": {k: round(big[k] / small[k], 2) if small[k] else None
                              for k in ("peak_object_store_mb", "peak_rss_mb", "peak_driver_rss_mb")},
        "pseudo_label_accuracy": pseudo_label_accuracy(out / f"relabel_{cfg.scale}x", world / "videos_truth.jsonl"),
        "trained_model": bool(cfg.model_path),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
    }
    write_json(out / "bench_relabel.json", result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys

    from dynboot.cli import job_main

    sys.exit(job_main(BenchConfig, run, doc=__doc__))
