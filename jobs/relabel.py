"""`dynboot relabel`: unlabelled videos -> key-frame pairs -> IDP pseudo labels -> Parquet shards, on Ray Data.

    dynboot relabel jobs/configs/relabel.yaml model_path=runs/idp/model
    python -m jobs.relabel jobs/configs/relabel.yaml videos=runs/world/videos out=runs/relabel
    ray job submit --working-dir . -- python -m jobs.relabel jobs/configs/relabel.yaml \
        videos=s3://bucket/videos/ out=/shared/relabel model_path=/shared/idp backend=anole \
        image_size=512 idp_gpus=1 max_actors=8 batch_size=16

Pipeline (one row = one video from stage 2 to stage 4, its pairs held in list columns):
  1 manifest  driver      a directory (its manifest.jsonl, else a recursive glob), a list file, a manifest.jsonl,
                          or URIs through pyarrow filesystems; videos with a shard or a quarantine row are skipped
  2 decode    CPU tasks   decord (PyAV fallback), key frames, resize to the IDP's input size, PNG
  3 label     actor pool  IDP caption + mean action log-prob, `batch_size` pairs per forward call
  4 write     CPU tasks   one Parquet shard per video (PAIR_SCHEMA), or a quarantine row, published atomically

Run directory: config.yaml, shards/<video_id>.parquet, quarantine/<video_id>.json ({video_id, path, error,
stage}), summary.json, metrics.jsonl (progress), stats.txt (Ray Data per-operator stats), attempts/ (in-flight
ledger). One job per run directory at a time.

Resume: a rerun skips every video with a shard or a quarantine row (`retry_quarantined=true` retries the
latter); shards are published whole (temp file + rename) and their rows are deterministic, so a killed and
rerun job writes the same rows as an uninterrupted one, without duplicates.

Faults: every UDF catches its exceptions and turns them into a quarantine row: a bad file never fails the
job. A native crash or out-of-memory kill takes the worker process down instead, and Ray retries such tasks
forever (ray_feasibility.md §2). The attempt ledger bounds that: a stage records `attempts/<video>.<stage>.json`
before working on a video and deletes it after; a file still there when the video comes back means the
worker died on it, and after `max_attempts` deaths the video is quarantined without being touched again.
An actor batch that follows a crash runs one video at a time, so only the culprit is charged.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import Field

from dynboot.config import Config, save_config
from dynboot.keyframes import KeyframeConfig
from dynboot.manifest import build_manifest
from dynboot.rundir import RunDir
from jobs.relabel_stages import IDPLabeler, decode_stage, write_stage


class RelabelConfig(Config):
    """dynboot relabel: pseudo-label unlabelled videos with an IDP on Ray Data (see jobs/relabel.py)."""

    videos: str = Field("runs/world/videos", description="Input: a directory (its manifest.jsonl, else every video "
                        "under it), a list file (a path or URI a line), a manifest.jsonl, or a URI (s3://, gs://, file://).")
    extensions: list[str] = Field([".mp4", ".avi", ".mov", ".mkv", ".webm"], description="Video files a directory glob picks.")
    out: str = Field("runs/relabel", description="Run directory (local or shared filesystem).")
    model_path: str = Field("runs/idp/model", description="IDP checkpoint directory.")
    backend: str = Field("tiny", description="Model backend ('' = read it from the checkpoint).")
    image_size: int = Field(0, ge=0, description="Side of the frames given to the IDP (0 = the model's input size, "
                            "read by loading the model once in the driver; set it for large models).")
    keyframes: KeyframeConfig = Field(default_factory=KeyframeConfig, description="Key-frame selection.")
    batch_size: int = Field(32, ge=1, description="Pairs per IDP forward call.")
    videos_per_batch: int = Field(4, ge=1, description="Videos per actor call; their pairs run batch_size at a time, "
                                  "so make it about batch_size / pairs per video (the world: 8 pairs).")
    min_actors: int = Field(1, ge=1, description="IDP actor pool: fewest actors.")
    max_actors: int = Field(1, ge=1, description="IDP actor pool: most actors (one per GPU on a cluster).")
    idp_cpus: float = Field(1.0, ge=0, description="CPUs reserved per IDP actor.")
    idp_gpus: float = Field(0.0, ge=0, description="GPUs per IDP actor (> 0 runs the model on CUDA).")
    idp_threads: int = Field(1, ge=1, description="torch threads per IDP actor (CPU inference).")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs reserved per decode task (decord decodes on one thread).")
    write_cpus: float = Field(0.25, gt=0, description="CPUs reserved per write task.")
    videos_per_task: int = Field(8, ge=1, description="Videos per decode task: fewer, longer tasks spend less on Ray's "
                                 "per-task overhead; more, shorter ones spread over more CPUs.")
    max_attempts: int = Field(2, ge=1, description="Worker deaths on one video before it is quarantined.")
    max_errored_blocks: int = Field(10, ge=0, description="Ray Data blocks that may fail outright before the job "
                                    "aborts; their videos are reported as lost and retried by a rerun.")
    retry_quarantined: bool = Field(False, description="Retry videos that have a quarantine row.")
    ray_address: str = Field("", description="Ray cluster to join ('' = RAY_ADDRESS or a new local cluster).")
    num_cpus: int = Field(0, ge=0, description="Logical CPUs of a new local cluster (0 = all cores).")
    progress_s: float = Field(5.0, gt=0, description="Seconds between progress lines.")




# ---- driver -------------------------------------------------------------------------------------------------
def finished_ids(out: str | Path, retry_quarantined: bool = False) -> set[str]:
    """Videos a rerun skips: those with a published shard (and a quarantine row, unless retried)."""
    out = Path(out)
    done = {p.stem for p in (out / "shards").glob("*.parquet") if not p.name.startswith(".")}
    if not retry_quarantined:
        done |= {p.stem for p in (out / "quarantine").glob("*.json")}
    return done


def _prepare(cfg: RelabelConfig) -> RelabelConfig:
    """Resolve the IDP's input size (loading the model once also checks model_path before any Ray work)."""
    if cfg.image_size:
        return cfg
    from dynboot.models.registry import load_model

    model = load_model(cfg.model_path, cfg.backend or None)
    return cfg.model_copy(update={"image_size": int(model.tokenizer.image_size)})


def _start_ray(cfg: RelabelConfig) -> bool:
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray_address or None)
    else:
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False)
    return True


def build_dataset(todo: list[dict[str, Any]], cfg: RelabelConfig):
    """The numbered pipeline; resources beside each stage."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = cfg.max_errored_blocks  # safety net only: every UDF catches its own errors
    # 1 manifest: videos_per_task videos per block, so per decode task: a task costs Ray a few ms, a world video
    #   takes ~20 ms to decode, so one video per task would spend more CPU on scheduling than on decoding.
    ds = ray.data.from_items(todo, override_num_blocks=math.ceil(len(todo) / cfg.videos_per_task))
    # 2 decode: CPU tasks with a fraction of a CPU each (decord runs one thread), so decoding keeps up with the
    #   IDP and never takes the CPU an actor needs (with whole CPUs, 2-core machines deadlock). Resources unlike
    #   stage 3's keep the two unfused: crashes stay in tasks and decoders scale apart from the model.
    #   max_retries bounds Ray's default of retrying crashed tasks forever (a deprecated ray_remote_arg that
    #   has no named replacement in Ray 2.60); the ledger quarantines each crashing video before it runs out.
    ds = ds.map_batches(decode_stage, batch_size=1, batch_format="pyarrow", fn_kwargs={"cfg": cfg},
                        num_cpus=cfg.decode_cpus, max_retries=cfg.max_attempts * cfg.videos_per_task + 1)
    # 3 label: the IDP in a stateful actor pool (loaded once per actor); idp_cpus / idp_gpus per actor, e.g. one
    #   GPU each on a cluster. Actors restart forever after a crash (Ray's default); the ledger bounds that.
    ds = ds.map_batches(IDPLabeler, batch_size=cfg.videos_per_batch, batch_format="pyarrow",
                        fn_constructor_kwargs={"cfg": cfg},
                        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
                        num_cpus=cfg.idp_cpus, num_gpus=cfg.idp_gpus)
    # 4 write: small CPU tasks; a shard is a few PNGs already encoded, so writing is cheap and stays off the actors.
    return ds.map_batches(write_stage, batch_size=None, batch_format="pyarrow", fn_kwargs={"cfg": cfg},
                          num_cpus=cfg.write_cpus)


def _count_pairs(out: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in (out / "shards").glob("*.parquet") if not p.name.startswith("."))


def _warn_if_starved(cfg: RelabelConfig) -> None:
    import ray

    spare = ray.cluster_resources().get("CPU", 0) - cfg.min_actors * cfg.idp_cpus
    if spare < cfg.decode_cpus + cfg.write_cpus:
        print(f"[relabel] warning: {spare:g} CPU left beside {cfg.min_actors} IDP actor(s) x {cfg.idp_cpus:g} CPU; decode "
              f"({cfg.decode_cpus:g}) and write ({cfg.write_cpus:g}) tasks may wait forever: lower idp_cpus or min_actors",
              flush=True)


class Progress:
    """Counts the result rows as they stream in; a line (and a metrics.jsonl row) every `every_s` seconds."""

    def __init__(self, rd: RunDir, total: int, every_s: float):
        self.rd, self.total, self.every_s = rd, total, every_s
        self.counts, self.by_stage, self.stage_s, self.seen = Counter(), Counter(), Counter(), set()
        self.pairs, self.t0, self.last = 0, time.time(), 0.0

    def add(self, row: dict[str, Any]) -> None:
        self.seen.add(row["video_id"])
        self.counts[row["status"]] += 1
        self.pairs += row["pairs"]
        self.stage_s.update({k: row[k] for k in ("decode_s", "label_s", "write_s")})
        if row["status"] != "ok":
            self.by_stage[row["stage"]] += 1
            print(f"[relabel] {row['status']} {row['video_id']} ({row['stage']}): {row['error'][:300]}", flush=True)
        if time.time() - self.last >= self.every_s or len(self.seen) == self.total:
            self.last, rate = time.time(), self.pairs / max(time.time() - self.t0, 1e-9)
            self.rd.log(videos=len(self.seen), done=self.counts["ok"], quarantined=self.counts["quarantined"],
                        pairs=self.pairs, pairs_per_s=round(rate, 2))
            print(f"[relabel] {len(self.seen)}/{self.total} videos ({self.counts['ok']} done, "
                  f"{self.counts['quarantined']} quarantined) {self.pairs} pairs, {rate:.1f} pairs/s", flush=True)


def run(cfg: RelabelConfig) -> dict[str, Any]:
    t_start = time.time()
    rd = RunDir(cfg.out)
    cfg = _prepare(cfg)
    save_config(cfg, rd.root)
    items = build_manifest(cfg.videos, cfg.extensions)  # stage 1
    done = finished_ids(rd.root, cfg.retry_quarantined)
    todo = [it for it in items if it["video_id"] not in done]
    for stale in [*rd.path("attempts").glob("*.json"), *rd.shards.glob(".*.tmp")]:
        stale.unlink()  # ledgers count deaths within one run; temp files are shards a killed run never published
    t_manifest = time.time() - t_start
    print(f"[relabel] {len(items)} videos, {len(items) - len(todo)} already done, {len(todo)} to do -> {rd.root}", flush=True)
    progress, stats, error = Progress(rd, len(todo), cfg.progress_s), "", None
    if todo:
        import ray

        started = _start_ray(cfg)
        try:
            _warn_if_starved(cfg)
            ds = build_dataset(todo, cfg)
            for row in ds.iter_rows():
                progress.add(row)
            stats = ds.stats()
        except Exception as err:  # e.g. more errored blocks than allowed: the summary still says what was done
            error = err
        finally:
            if started:
                ray.shutdown()
    wall = time.time() - progress.t0
    (rd.root / "stats.txt").write_text(stats or "")
    counts, lost = progress.counts, sorted(it["video_id"] for it in todo if it["video_id"] not in progress.seen)
    summary = {
        "videos_seen": len(items), "skipped_done": len(items) - len(todo), "videos_todo": len(todo),
        "videos_done": counts["ok"], "videos_quarantined": counts["quarantined"], "write_failed": counts["failed"],
        "quarantined_by_stage": dict(progress.by_stage), "videos_lost": len(lost), "lost": lost[:100],
        "pairs_written": progress.pairs, "pairs_per_s": round(progress.pairs / wall, 2) if todo else 0.0,
        "wall_s": round(wall, 2),
        "stage_s": {"manifest_wall": round(t_manifest, 3), **{k: round(v, 3) for k, v in progress.stage_s.items()}},
        "shards_total": len(finished_ids(rd.root, retry_quarantined=True)), "pairs_total": _count_pairs(rd.root),
        "quarantine_total": len(list(rd.quarantine.glob("*.json"))), "image_size": cfg.image_size,
        "model_path": cfg.model_path, "total_s": round(time.time() - t_start, 2),
        "error": f"{type(error).__name__}: {error}" if error else None,
    }
    rd.write_summary(summary)
    keys = ("videos_done", "videos_quarantined", "videos_lost", "pairs_written", "pairs_per_s")
    print(f"[relabel] finished: {json.dumps({k: summary[k] for k in keys})}", flush=True)
    if error:
        raise error
    return summary


if __name__ == "__main__":
    import sys

    from dynboot.cli import job_main
    from jobs import relabel  # the module, not __main__: Ray workers then import the config class by name

    sys.exit(job_main(relabel.RelabelConfig, relabel.run, doc=__doc__))
