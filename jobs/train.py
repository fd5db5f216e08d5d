"""Training job: IDP or FDP on a gold + pseudo mixture, Ray Train (TorchTrainer, V2) + DeepSpeed, LoRA or full.

    dynboot train jobs/configs/train_idp.yaml                  # IDP on runs/world/gold -> runs/idp/model
    dynboot train jobs/configs/train_fdp.yaml                  # FDP on gold + runs/filter/shards -> runs/fdp/model
    dynboot train jobs/configs/train_fdp.yaml out=runs/fdp_gold data=runs/world/gold     # gold only
    dynboot train jobs/configs/train_paper_idp.yaml            # the paper's IDP recipe on AURORA (jobs/configs)
    ray job submit --working-dir . -- python -m jobs.train jobs/configs/train_fdp.yaml \\
        num_workers=8 use_gpu=true model_path=s3://models/liquid-7b backend=liquid out=s3://runs/fdp

Every path is a URI (local, s3://, gs://, file://: dynboot.io.storage): `data`, `eval_data`, `model_path` (fetched
once per node into a local cache) and `out` (Ray Train's storage: checkpoints go there; a cluster shares no disk).

Stages (resources beside each):
  1. data index (driver, once per run): every source resolved into chunks of rows and recorded in `out/data/`
     (dynboot.data.data_index: committed Parquet files and their footers; AURORA records with missing images counted;
     a source with no usable pair is an error naming it, before any cluster work). A rerun reads the recorded index
     and reports files added / removed / changed since (their rows are not used / skipped).
  2. train (num_workers x {CPU: cpus_per_worker[, GPU: 1]}; fractional CPUs because Train workers that
     reserve every CPU starve Ray Data's read tasks: the 2-CPU deadlock in reference/ray_feasibility.md §3):
     each rank streams its windows of the mixture plan (dynboot.data.mixture) through Ray Data read tasks
     ({CPU: ingest_cpus} each, `ingest_tasks` at a time) that read, shuffle in a bounded window, decode and apply
     the model's image policy (dynboot.data.ingest); a rank holds a few decoded batches, never its shard. Every rank
     runs exactly `steps` steps (no epoch edge, no short last batch to hang a collective). A step is the training
     core's (dynboot.training.trainer) through a DeepSpeed engine: ZeRO stage 0 (plain data parallel) / 1 / 2 / 3, fp32 or
     bf16, optional gradient checkpointing; the model loads in its training dtype on its device.
  3. checkpoint every `checkpoint_every` steps and at the end, from every rank (its ZeRO shard, LoRA: trainable
     parameters only; its data position and RNG states; a manifest of digests) into `out/checkpoints/step_NNNNNN`;
     a crashed worker group restarts from the latest (`max_failures`), rerunning the same command continues the
     run, and a restart resumes the data at its recorded position (nothing replayed). A checkpoint is verified
     against its manifests before DeepSpeed unpickles it (dynboot.io.checkpoint_manifest: the trust boundary).
  4. evaluate every `eval_every` steps: held-out loss, and for the embedded world IDP / FDP exact match
     (rank 0; under ZeRO-3 every rank, so that no rank builds a copy of the model).
  5. export (jobs/train_export.py): `out/adapter/` (LoRA), `out/model/` (loadable by `load_model`), written to a
     temporary directory, checked on the training device in the training dtype, then published.
  6. driver: while the workers train, follows metrics.jsonl (jobs/train_progress.py): a progress line every
     `progress_every_s` (step/steps, loss, samples/s, ETA) and every row to the `tracking` tracker (MLflow / W&B,
     dynboot.io.tracking); at the end loss_curve.png, summary.json. Run from the command line, the console shows only
     these lines; Ray's, DeepSpeed's and the workers' output goes to `out/log.txt` (`--verbose`: both; dynboot.io.console).

One job per run directory (dynboot.io.rundir: a lock a crash cannot leave stuck); a rerun whose config differs from
the recorded one stops naming the fields (resume=force continues anyway, resume=off starts over).
"""

from __future__ import annotations

import io
import time
import uuid
from typing import Any


from dynboot.io import storage
from dynboot.cli import job_main
from dynboot.data.data_index import BenchmarkRefused, EmptySource, build_index, changes, load_index, record_index, resolve_kind
from dynboot.data.mixture import Source
from dynboot.io.console import duration, say
from dynboot.io.rundir import ConfigChanged, RunDir, RunDirBusy
from dynboot.io.tracking import open_tracker
from jobs.train_config import TrainConfig



def unknown_tags(cfg: TrainConfig) -> list[str]:
    """Provenance tags the model's tokenizer does not know (they would reach the model as <unk>)."""
    tags = sorted({s.tag for s in cfg.data if s.tag})
    if not tags:
        return []
    if cfg.from_scratch:
        from dynboot.models.tiny import word_tokenizer

        tok = word_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_tokenizer_dir(cfg.model_path), local_files_only=True)
    unk = tok.unk_token_id
    return [t for t in tags if unk is not None and unk in tok(t, add_special_tokens=False)["input_ids"]]


TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "config.json")


def _tokenizer_dir(model_path: str) -> str:
    """A local directory with the checkpoint's tokenizer files: the checkpoint itself when local; for a URI, only
    those files fetched (not the weights: the driver checks tags, it does not load the model)."""
    if not storage.is_uri(model_path):
        return model_path
    import tempfile

    tmp = tempfile.mkdtemp(prefix="dynboot-tokenizer-")
    for uri in storage.list_files(model_path, recursive=False):
        if storage.name(uri).startswith(TOKENIZER_FILES):
            storage.write_bytes(storage.join(tmp, storage.name(uri)), storage.read_bytes(uri))
    return tmp


class InputError(ValueError):
    """A data source or setting the job cannot use, found before any cluster work."""


def check_inputs(cfg: TrainConfig) -> None:
    try:
        for src in cfg.data:
            resolve_kind(src)
        if cfg.eval_data:
            resolve_kind(Source(path=cfg.eval_data), allow_test=True)
    except (FileNotFoundError, BenchmarkRefused) as err:
        raise InputError(str(err)) from None
    if bad := unknown_tags(cfg):
        raise InputError(f"data tags {bad} are not in the model's tokenizer vocabulary (they would become <unk>); "
                         "the tiny world's word-level tokenizer knows only action words: leave tag empty")


def _build(cfg: TrainConfig):
    try:
        return build_index(cfg.data)
    except (EmptySource, ValueError) as err:
        raise InputError(str(err)) from None


def data_index(cfg: TrainConfig, rd: RunDir, recorded, fresh) -> tuple[Any, list[str]]:
    """The run's data index: the recorded one (with the changes of its files since), or `fresh` (built now)
    recorded in the run directory."""
    if recorded is not None and [(s.path, s.weight, s.tag) for s in recorded.sources] == \
            [(s.path, s.weight, s.tag) for s in cfg.data]:
        return recorded, changes(recorded)
    notes = ["the sources differ from the recorded data index (resume=force): the plan starts over on the new "
             "sources"] if recorded is not None else []
    return record_index(fresh or _build(cfg), rd.uri("data")), notes


# ---- stage 6: the loss curve ------------------------------------------------------------------------------
def plot_loss(run: RunDir) -> str | None:
    rows = [r for r in run.metrics() if "loss" in r]
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))  # not pyplot: its global state is not thread-safe (the quickstart's FDP runs)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train loss")
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    return storage.write_bytes(run.uri("loss_curve.png"), buf.getvalue())


SET_ASIDE = ("checkpoints", "attempts.jsonl", "workers.json", ".fault_injected", "run.json", "data", "quarantine",
             "model", "adapter", "base", "export_probe.pt", "loss_curve.png")


# ---- the job ------------------------------------------------------------------------------------------------
def run(cfg: TrainConfig) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train_progress import follow
    from jobs.train_worker import train_loop

    t0 = time.time()
    cfg = cfg.resolved()
    check_inputs(cfg)
    recorded = load_index(storage.join(cfg.out, "data")) if cfg.resume != "off" else None
    fresh = _build(cfg) if recorded is None else None  # a bad source stops here, before anything is written
    with RunDir(cfg.out).open(cfg, resume=cfg.resume, set_aside=SET_ASIDE) as rd:
        index, notes = data_index(cfg, rd, recorded, fresh)
        for note in notes:
            say(f"train: {note}")
        meta = rd.read_json("run.json") or {"run_id": uuid.uuid4().hex, "started": time.time()}
        rd.write_json("run.json", meta)
        storage_path, storage_fs = storage.ray_storage(cfg.out)

        name = cfg.name or cfg.task
        try:
            tracker = open_tracker(cfg.tracking, name, cfg.model_dump(mode="json"), cfg.tracking_uri, cfg.tracking_project)
        except ValueError as err:  # the tracker's package is not installed
            raise InputError(str(err)) from None
        follower = follow(rd, name, cfg.steps, tracker, cfg.progress_every_s)
        started = not ray.is_initialized()
        if started:
            ray.init(include_dashboard=False)  # joins the cluster under `ray job submit`, else starts a local one
        fitted = False
        try:
            resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_id": meta["run_id"],
                                   "index_dir": storage.parent(index.uri)},
                torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
                run_config=RunConfig(name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
                                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep),
                                     failure_config=FailureConfig(max_failures=cfg.max_failures)),
            )
            result = trainer.fit()
            fitted = True
        finally:
            follower.stop()
            if started:
                ray.shutdown()
            if not fitted:
                tracker.finish({}, ok=False)
        summary = summarise(cfg, rd, index, notes, result, time.time() - t0)
        tracker.finish(summary)
    evals = "  ".join(f"{k} {v}" for k, v in summary["eval"].items())
    skipped = f"  ({summary['malformed_rows']} malformed rows skipped)" if summary["malformed_rows"] else ""
    say(f"  {name:<12} done: {summary['steps']} steps in {duration(summary['seconds'])}, loss {summary['final_loss']}"
        f"{'  ' + evals if evals else ''}{skipped}  -> {summary['export'].get('model')}")
    return summary


def summarise(cfg: TrainConfig, rd: RunDir, index, notes: list[str], result, seconds: float) -> dict:
    plot_loss(rd)
    workers = rd.read_json("workers.json")
    steps = [r for r in rd.metrics() if "loss" in r]
    last_eval = next((r for r in reversed(steps) if "eval_loss" in r), {})
    malformed = sorted({m for w in workers["ranks"] for m in w["malformed"]})
    rows = sum(s.rows for s in index.sources)
    summary = {
        "task": cfg.task, "steps": cfg.steps, "num_workers": cfg.num_workers, "zero_stage": cfg.zero_stage,
        "lora": cfg.use_lora, "bf16": workers["bf16"], "rows": rows, "examples": rows - len(malformed),
        "malformed_rows": len(malformed), "data": index.summary(), "data_changes": notes,
        "attempts": workers["attempt_starts"], "resumed_from_step": workers["start_step"],
        "final_loss": steps[-1]["loss"] if steps else None,
        "eval": {k: v for k, v in last_eval.items() if k.startswith("eval_")},
        "samples_per_s": steps[-1]["samples_per_s"] if steps else None,
        "tokens_per_s": steps[-1]["tokens_per_s"] if steps else None,
        "data_wait_s_per_worker": [w["data_wait_s"] for w in workers["ranks"]],
        "peak_rss_mb_per_worker": [w["peak_rss_mb"] for w in workers["ranks"]],
        "export": workers["export"],
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": round(seconds, 1),
    }
    if rows < cfg.num_workers * cfg.batch_size:
        summary["data_note"] = (f"{rows} rows for {cfg.num_workers} workers x batch {cfg.batch_size}: rows repeat "
                                "within every step")
    rd.write_summary(summary)
    return summary


def main(cfg: TrainConfig) -> None:
    try:
        run(cfg)
    except (InputError, ConfigChanged, RunDirBusy) as err:
        say(f"error: {err}", error=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(job_main(TrainConfig, main, doc=__doc__, console=True))
