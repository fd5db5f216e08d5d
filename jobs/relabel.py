"""`dynboot relabel`: unlabelled videos -> key-frame pairs -> IDP pseudo labels -> committed Parquet partitions,
on Ray Data. Every path is a URI: videos=, out= and model_path= may be local or s3:// gs:// file://.

    dynboot relabel jobs/configs/relabel.yaml model_path=runs/idp/model
    python -m jobs.relabel jobs/configs/relabel.yaml videos=runs/world/videos out=runs/relabel
    ray job submit --working-dir . -- python -m jobs.relabel jobs/configs/relabel.yaml \
        videos=s3://bucket/ucf101/ out=s3://bucket/runs/relabel model_path=s3://bucket/models/idp backend=anole \
        image_size=512 idp_gpus=1 max_actors=8 batch_size=16 keyframes.strategy=peaks pairs_per_video=5

Pipeline (one row = one video from stage 2 to stage 4, its pairs held in list columns):
  1 manifest  Ray Data tasks  the manifest / list / directory listing, read in parallel; a registry actor on the
                              driver's node drops what the commit records say is done (jobs/relabel_manifest.py)
  2 decode    CPU tasks       fetch (retried on transient I/O errors), decord (PyAV fallback), key frames, PNG
  3 label     actor pool      IDP caption + mean action log-prob, `batch_size` pairs per forward call
  4 commit    CPU tasks       partitions of about `rows_per_file` pairs: Parquet file + quarantine rows + commit
                              record (dynboot/io/partitions.py); one small result row per video to the driver
The driver only counts result rows and compacts their commit records into index segments as they arrive.

Run directory (`out`): config.yaml, shards/<part>.parquet (PAIR_SCHEMA, with `dataset` and `label`),
quarantine/<part>.jsonl (dynboot.io.rundir.quarantine_row: input = the video id), commits/ (records,
index segments, intents), summary.json, metrics.jsonl, stats.txt, attempts/ (the ledger, jobs/relabel_ledger.py).
One job per run directory at a time (`RunDir.open`: a lock, and a rerun's config checked against config.yaml).

Outcomes: a video ends as pair rows (ok), a quarantine row with its reason (its own fault, for good), or
`retry_later` (I/O that stayed down: counted in the summary, committed nowhere, taken again by the next run).
Reruns cost O(work left): the commit records say what is done; a killed job loses only partitions in flight.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Any


from dynboot.io import partitions, storage
from dynboot.io.ray_session import ray_session
from dynboot.io.rundir import RunDir
from jobs.relabel_config import RelabelConfig
from jobs.relabel_manifest import read_manifest, start_registry
from jobs.relabel_stages import DecodeParams, IDPLabeler, LabelParams, WriteParams, decode_stage, write_stage


# ---- driver -------------------------------------------------------------------------------------------------
def _prepare(cfg: RelabelConfig) -> RelabelConfig:
    """Resolve the IDP's input size (loading the model once also checks model_path before any Ray work)."""
    if cfg.image_size:
        return cfg
    from dynboot.models.registry import load_model

    model = load_model(storage.local_model_dir(cfg.model_path), cfg.backend or None)
    return cfg.model_copy(update={"image_size": int(model.tokenizer.image_size)})


def decode_params(cfg: RelabelConfig) -> DecodeParams:
    return DecodeParams(out=cfg.out, keyframes=cfg.keyframes, image_size=cfg.image_size, max_attempts=cfg.max_attempts,
                        io_attempts=cfg.io_attempts, io_backoff_s=cfg.io_backoff_s)


def label_params(cfg: RelabelConfig) -> LabelParams:
    return LabelParams(out=cfg.out, model_path=cfg.model_path, backend=cfg.backend,
                       device="cuda" if cfg.idp_gpus > 0 else "cpu", threads=cfg.idp_threads,
                       batch_size=cfg.batch_size, max_attempts=cfg.max_attempts,
                       cuda_fault_once=cfg.fault_injection == "cuda_once")


def write_params(cfg: RelabelConfig) -> WriteParams:
    return WriteParams(out=cfg.out, rows_per_file=cfg.rows_per_file, image_size=cfg.image_size,
                       stall_after_2_commits=cfg.fault_injection == "stall_after_2_commits")


def build_dataset(cfg: RelabelConfig, registry):
    """The numbered pipeline; resources beside each stage. Each stage gets only its own params (built above from
    `cfg`, whose image_size _prepare has resolved), not the driver's config."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = cfg.max_errored_blocks  # safety net only: every UDF catches its own errors
    # 1 manifest: read by Ray Data tasks, claimed against the commit records, cut into blocks of videos_per_task
    #   videos: a task costs Ray a few ms and a world video ~20 ms to decode, so one per task would waste CPU.
    ds = read_manifest(cfg.videos, cfg.extensions, registry, cfg.videos_per_task)
    # 2 decode: CPU tasks with a fraction of a CPU each (decord runs one thread), so decoding keeps up with the
    #   IDP and never takes the CPU an actor needs (with whole CPUs, 2-core machines deadlock). Resources unlike
    #   stage 3's keep the two unfused: crashes stay in tasks and decoders scale apart from the model.
    #   max_retries bounds Ray's default of retrying crashed tasks forever (a deprecated ray_remote_arg that
    #   has no named replacement in Ray 2.60); the ledger quarantines each crashing video before it runs out.
    ds = ds.map_batches(decode_stage, batch_size=cfg.videos_per_task, batch_format="pyarrow",
                        fn_kwargs={"params": decode_params(cfg)}, num_cpus=cfg.decode_cpus,
                        max_retries=2 * cfg.max_attempts * cfg.videos_per_task + 2)
    # 3 label: the IDP in a stateful actor pool (loaded once per actor); idp_cpus / idp_gpus per actor, e.g. one
    #   GPU each on a cluster. Actors restart after a crash (Ray's default), a device error included.
    ds = ds.map_batches(IDPLabeler, batch_size=cfg.videos_per_batch, batch_format="pyarrow",
                        fn_constructor_kwargs={"params": label_params(cfg)},
                        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
                        num_cpus=cfg.idp_cpus, num_gpus=cfg.idp_gpus)
    # 4 commit: small CPU tasks of about rows_per_file pairs each (PNGs already encoded: writing is cheap and
    #   stays off the actors). We write partitions ourselves rather than with Ray Data's write_parquet: each
    #   needs its commit record (which videos, which files), written last, for exactly-once reruns.
    videos_per_file = max(1, math.ceil(cfg.rows_per_file / cfg.pairs_per_video))
    return ds.map_batches(write_stage, batch_size=videos_per_file, batch_format="pyarrow",
                          fn_kwargs={"params": write_params(cfg)}, num_cpus=cfg.write_cpus)


def _warn_if_starved(cfg: RelabelConfig) -> None:
    import ray

    spare = ray.cluster_resources().get("CPU", 0) - cfg.min_actors * cfg.idp_cpus
    if spare < cfg.decode_cpus + cfg.write_cpus:
        print(f"[relabel] warning: {spare:g} CPU left beside {cfg.min_actors} IDP actor(s) x {cfg.idp_cpus:g} CPU; decode "
              f"({cfg.decode_cpus:g}) and write ({cfg.write_cpus:g}) tasks may wait forever: lower idp_cpus or min_actors",
              flush=True)


_INDEX_KEYS = ("video_id", "status", "pairs", "reason", "stage", "partition", "data_file", "quarantine_file",
               "committed_at")


class Progress:
    """Counts result rows as they stream in (a line and a metrics row every `every_s`), and compacts their commit
    records into index segments every `compact_every` committed videos."""

    def __init__(self, rd: RunDir, every_s: float, compact_every: int):
        self.rd, self.every_s, self.compact_every = rd, every_s, compact_every
        self.counts, self.by_reason, self.by_stage, self.stage_s = Counter(), Counter(), Counter(), Counter()
        self.errors: list[dict[str, Any]] = []
        self.pairs, self.partitions, self.files, self.t0, self.last = 0, set(), 0, time.time(), 0.0
        self.pending: list[dict[str, Any]] = []
        self.segments = 0
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.first_commit_s: float | None = None

    def add(self, batch) -> None:
        for row in batch.to_pylist():
            status = row["status"]
            self.counts[status] += 1
            self.pairs += row["pairs"]
            self.stage_s.update({k: row[k] for k in ("decode_s", "label_s", "write_s")})
            if status == "quarantined":
                self.by_reason[row["reason"]] += 1
            if status != "ok":
                self.by_stage[f"{status}:{row['stage']}"] += 1
                if len(self.errors) < 50:
                    self.errors.append({k: row[k] for k in ("video_id", "status", "stage", "reason", "error")})
                print(f"[relabel] {status} {row['video_id']} ({row['stage']}{', ' + row['reason'] if row['reason'] else ''}): "
                      f"{row['error'][:300]}", flush=True)
            if row["partition"]:
                if row["partition"] not in self.partitions and row["data_file"]:
                    self.files += 1
                self.partitions.add(row["partition"])
                self.pending.append({k: row[k] for k in _INDEX_KEYS})
                if self.first_commit_s is None:
                    self.first_commit_s = time.time() - self.t0
        if len(self.pending) >= self.compact_every:
            self.compact()
        if time.time() - self.last >= self.every_s:
            self.report()

    def compact(self) -> None:
        if self.pending:
            partitions.compact(self.rd.uri_root, self.pending, f"{self.stamp}-{self.segments:05d}")
            self.segments += 1
            self.pending = []

    def report(self) -> None:
        self.last, rate = time.time(), self.pairs / max(time.time() - self.t0, 1e-9)
        self.rd.log(videos=sum(self.counts.values()), done=self.counts["ok"], quarantined=self.counts["quarantined"],
                    retry_later=self.counts["retry_later"], pairs=self.pairs, pairs_per_s=round(rate, 2))
        print(f"[relabel] {sum(self.counts.values())} videos ({self.counts['ok']} done, {self.counts['quarantined']} "
              f"quarantined, {self.counts['retry_later']} to retry later) {self.pairs} pairs, {rate:.1f} pairs/s", flush=True)


def run(cfg: RelabelConfig) -> dict[str, Any]:
    t_start = time.time()
    with RunDir(cfg.out).open(cfg, resume=cfg.resume, set_aside=("shards", "quarantine", "commits", "attempts")) as rd:
        partitions.mark_dataset(rd.uri_root)
        # workers run in other directories (other nodes): every local path made absolute here
        cfg = _prepare(cfg).model_copy(update={"out": rd.uri_root, "videos": storage.absolute(cfg.videos),
                                               "model_path": storage.absolute(cfg.model_path)})
        progress, stats, error, reg = Progress(rd, cfg.progress_s, cfg.compact_every), "", None, {}
        with ray_session(cfg.ray_address, cfg.num_cpus):
            import ray

            storage.delete_dir(rd.uri("attempts"))  # the ledger counts deaths within one run
            registry = start_registry(rd.uri_root, cfg.retry_quarantined)
            try:
                _warn_if_starved(cfg)
                ds = build_dataset(cfg, registry)
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # whole commit-task outputs
                    progress.add(batch)
                stats = ds.stats()
            except Exception as err:  # e.g. more errored blocks than allowed: the summary still says what was done
                error = err
            finally:
                progress.compact()
                reg = ray.get(registry.stats.remote())
                after = ray.get(registry.totals_now.remote())
                ray.kill(registry)
        progress.report()
        storage.write_text(rd.uri("stats.txt"), stats or "")
        summary = _summary(cfg, progress, reg, after, t_start, error)
        rd.write_summary(summary)
    keys = ("videos_done", "videos_quarantined", "videos_retry_later", "videos_lost", "pairs_written", "pairs_per_s")
    print(f"[relabel] finished: {json.dumps({k: summary[k] for k in keys})}", flush=True)
    if summary["videos_retry_later"] or summary["videos_lost"]:
        print(f"[relabel] {summary['videos_retry_later'] + summary['videos_lost']} video(s) to retry: rerun the same "
              "command", flush=True)
    if error:
        raise error
    return summary


def _summary(cfg: RelabelConfig, progress: Progress, reg: dict[str, Any], totals: dict[str, Any], t_start: float,
             error: BaseException | None) -> dict[str, Any]:
    counts, wall = progress.counts, time.time() - progress.t0
    todo = reg.get("todo", 0) + reg.get("duplicate_id", 0)
    return {
        "videos_listed": reg.get("listed", 0), "skipped_done": reg.get("done", 0),
        "duplicates_dropped": reg.get("duplicate", 0), "videos_todo": todo,
        "videos_done": counts["ok"], "videos_quarantined": counts["quarantined"],
        "videos_retry_later": counts["retry_later"], "videos_lost": max(0, todo - sum(counts.values())),
        "by_reason": dict(progress.by_reason), "by_stage": dict(progress.by_stage), "errors": progress.errors,
        "pairs_written": progress.pairs, "partitions_written": len(progress.partitions), "files_written": progress.files,
        "pairs_per_s": round(progress.pairs / wall, 2) if todo else 0.0, "wall_s": round(wall, 2),
        "first_commit_s": round(progress.first_commit_s, 2) if progress.first_commit_s is not None else None,
        "stage_s": {"bookkeeping": reg.get("bookkeeping_s"), "registry_start": reg.get("registry_start_s"), **{k: round(v, 3) for k, v in progress.stage_s.items()}},
        "recovered_partitions": reg.get("recovered_partitions", 0), "index_segments": progress.segments,
        "videos_total": totals.get("videos_ok", 0), "pairs_total": totals.get("pairs", 0),
        "quarantine_total": totals.get("videos_quarantined", 0), "by_reason_total": totals.get("by_reason", {}),
        "duplicate_commits": totals.get("ok_commits", 0) - totals.get("videos_ok", 0),
        "image_size": cfg.image_size, "model_path": cfg.model_path, "total_s": round(time.time() - t_start, 2),
        "error": f"{type(error).__name__}: {error}" if error else None,
    }


if __name__ == "__main__":
    import sys

    from dynboot.cli import job_main

    sys.exit(job_main(RelabelConfig, run, doc=__doc__))
