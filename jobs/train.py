"""Training job: IDP or FDP on a gold + pseudo mixture, Ray Train (TorchTrainer, V2) + DeepSpeed, LoRA or full.

    dynboot train jobs/configs/train_idp.yaml                  # IDP on runs/world/gold -> runs/idp/model
    dynboot train jobs/configs/train_fdp.yaml                  # FDP on gold + runs/filter/shards -> runs/fdp/model
    dynboot train jobs/configs/train_fdp.yaml out=runs/fdp_gold data=runs/world/gold     # gold only
    python -m jobs.train jobs/configs/train_idp.yaml steps=200 zero_stage=3 lora.enabled=true
    ray job submit --working-dir . -- python -m jobs.train jobs/configs/train_fdp.yaml \\
        num_workers=8 use_gpu=true model_path=/models/liquid-7b backend=liquid out=/shared/runs/fdp

Stages (resources beside each; `out` must be on storage every worker can reach: it is Ray Train's
storage_path, and rank 0 writes metrics.jsonl and the export there):
  1. data (driver, Ray Data): AURORA sources -> read tasks that load the PNGs; Parquet shards ->
     read_parquet; one `src` column per source; union. Nothing is decoded on the driver.
  2. train (num_workers x {CPU: cpus_per_worker[, GPU: 1]}; fractional CPUs because Train workers that
     reserve every CPU starve Ray Data's read tasks: the 2-CPU deadlock in reference/ray_feasibility.md §3):
     each rank streams its shard once into a decoded pool (malformed rows counted, skipped, quarantined),
     then draws `steps` batches with replacement from it (the mixture ratios as weights), so every rank
     runs exactly `steps` steps, there is no epoch edge and no short last batch to hang a collective.
     A step is the plain loop's step (`dynboot.trainer`: make_batch, build_optimizer, lr_at) run through a
     DeepSpeed engine: ZeRO stage 0 (plain data parallel, DDP semantics) / 1 / 2 / 3, fp32 or bf16.
  3. checkpoint every `checkpoint_every` steps and at the end, from every rank (its ZeRO shard and its
     sampler state) into `out/checkpoints/step_NNNNNN`; a crashed worker group restarts from the latest
     (`max_failures`), and rerunning the same command continues the same run (same out).
  4. evaluate on rank 0 every `eval_every` steps: held-out loss, and for the embedded world IDP exact
     match (greedy captions) / FDP exact match (greedy samples).
  5. export (rank 0, from weights gathered from every rank, so a ZeRO-3 LoRA adapter holds real values):
     `out/model/` = the full model with LoRA merged, a Hugging Face directory that `load_model` and
     `from_pretrained(local_files_only=True)` load; `out/adapter/` = the PEFT adapter alone (LoRA runs;
     its base is model_path, or `out/base/` when the base was built from scratch). The export is checked
     against the trained engine's logits on a probe batch (summary.json: export.max_abs_logit_diff).
  6. driver: metrics.jsonl -> loss_curve.png, summary.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dynboot.cli import job_main
from dynboot.config import Config, save_config
from dynboot.mixture import ROW_COLUMNS, Source, aurora_items, aurora_rows, parse_sources, resolve_source
from dynboot.pairs import to_table
from dynboot.rundir import RunDir
from dynboot.trainer import LoopConfig


class LoraSettings(Config):
    """PEFT LoRA on the backend's language-model projections (paper: r=16, alpha=32, dropout 0.05)."""

    enabled: bool | Literal["auto"] = Field("auto", description="auto: LoRA when fine-tuning a checkpoint "
                                            "(model_path set), full training when the tiny model starts from scratch.")
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field([], description="Modules to wrap; empty = model.lora_target_modules().")


class TrainConfig(LoopConfig):
    """dynboot train: IDP or FDP on a gold + pseudo mixture with Ray Train + DeepSpeed (LoRA or full)."""

    backend: str = Field("", description="Backend name; empty = read from model_path's dynboot.json ('tiny' from scratch).")
    model_path: str = Field("", description="Checkpoint dir to fine-tune; empty or 'scratch' = the tiny world model from scratch.")
    size: str = Field("xs", description="Tiny model size when starting from scratch (xxs, xs, s, m).")
    data: list[Source] = Field([Source(path="runs/world/gold")],
                               description="Mixture: a path, or a list of paths / {path, weight, tag, format} (dynboot.mixture).")
    eval_data: str = Field("runs/world/test", description="Held-out pairs (AURORA json/dir or Parquet); empty = no evaluation.")
    eval_limit: int = Field(128, ge=1, description="Held-out pairs used per evaluation.")
    eval_generate: bool = Field(True, description="World data: also greedy IDP captions / FDP samples -> exact match.")
    out: str = Field("runs/train", description="Run directory (also Ray Train's storage: shared storage on a cluster).")
    resume: bool = Field(True, description="Continue the run found in out/checkpoints; false starts over (old checkpoints kept aside).")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs reserved per worker (fractional: leaves room for Ray Data).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false = CPU over gloo.")
    threads: int = Field(1, ge=1, description="torch intra-op threads per worker.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage; 0 = plain data parallel (DDP semantics).")
    zero3_persist_below: int = Field(0, ge=0, description="ZeRO-3: parameters with fewer elements stay whole on every "
                                     "rank (DeepSpeed stage3_param_persistence_threshold; its default 100000 suits 7B models).")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 mixed precision; auto = on GPUs that support it, off on CPU.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches of batch_size per optimizer step (per worker).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    checkpoint_every: int = Field(250, ge=0, description="Steps between checkpoints (0 = only at the end).")
    keep: int = Field(2, ge=1, description="Checkpoints kept.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the latest checkpoint before the run fails.")
    fault_step: int = Field(0, ge=0, description="Fault injection (tests): rank fault_rank exits hard once after this step (0 = off).")
    fault_rank: int = Field(1, ge=0, description="Rank that fault_step kills.")

    @field_validator("data", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> list[Any]:
        return parse_sources(v)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.task == "idp" and any(s.tag for s in self.data):
            raise ValueError("data tags go into the FDP prompt; for task=idp the action is the target: leave tag empty")
        return self

    @property
    def from_scratch(self) -> bool:
        return self.model_path in ("", "scratch")

    @property
    def use_lora(self) -> bool:
        return (not self.from_scratch) if self.lora.enabled == "auto" else bool(self.lora.enabled)

    def resolved(self) -> "TrainConfig":
        """Paths made absolute: Ray workers do not run in the driver's working directory."""
        def absolute(p: str) -> str:
            return p if (not p or "://" in p or p == "scratch") else str(Path(p).expanduser().resolve())

        data = [s.model_copy(update={"path": absolute(s.path)}) for s in self.data]
        return self.model_copy(update={"out": absolute(self.out), "model_path": absolute(self.model_path),
                                       "eval_data": absolute(self.eval_data), "data": data})


# ---- stage 1: the mixture as a Ray Dataset --------------------------------------------------------------
def _with_source(table, src: int):
    import pyarrow as pa

    return table.append_column("src", pa.array([src] * len(table), pa.int32()))


def _read_gold(batch, src: int):
    items = batch.to_pylist()
    return _with_source(to_table(aurora_rows(items)).select(ROW_COLUMNS), src)


def mixture_dataset(sources: list[Source]):
    """One Dataset of pair rows (ROW_COLUMNS + src) over every source; images stay PNG bytes."""
    import ray

    parts = []
    for i, src in enumerate(sources):
        fmt, path = resolve_source(src)
        if fmt == "aurora":  # small records on the driver; read tasks load the images
            ds = ray.data.from_items(aurora_items(path)).map_batches(
                _read_gold, fn_kwargs={"src": i}, batch_size=256, batch_format="pyarrow")
        else:
            ds = ray.data.read_parquet(path, columns=ROW_COLUMNS, file_extensions=["parquet"]).map_batches(
                _with_source, fn_kwargs={"src": i}, batch_format="pyarrow")
        parts.append(ds)
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


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

        tok = AutoTokenizer.from_pretrained(cfg.model_path, local_files_only=True)
    unk = tok.unk_token_id
    return [t for t in tags if unk is not None and unk in tok(t, add_special_tokens=False)["input_ids"]]


class InputError(ValueError):
    """A data source or setting the job cannot use, found before any cluster work."""


def check_inputs(cfg: TrainConfig) -> None:
    try:
        for src in [*cfg.data, *([Source(path=cfg.eval_data)] if cfg.eval_data else [])]:
            resolve_source(src)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None
    if bad := unknown_tags(cfg):
        raise InputError(f"data tags {bad} are not in the model's tokenizer vocabulary (they would become <unk>); "
                         "the tiny world's word-level tokenizer knows only action words: leave tag empty")


# ---- stage 6: the loss curve ------------------------------------------------------------------------------
def plot_loss(run: RunDir) -> Path | None:
    rows = [r for r in run.metrics() if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
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
    path = run.path("loss_curve.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fresh_start(run: RunDir) -> None:
    """resume=false: set the old Ray run and its logs aside (renamed, not deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("checkpoints", "metrics.jsonl", "attempts.jsonl", ".fault_injected"):
        p = run.path(name)
        if p.exists():
            p.rename(run.path(f"{name}.old-{stamp}"))


# ---- the job ------------------------------------------------------------------------------------------------
def run(cfg: TrainConfig) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train_worker import train_loop

    t0 = time.time()
    cfg = cfg.resolved()
    check_inputs(cfg)
    run_dir = RunDir(cfg.out)
    if not cfg.resume:
        _fresh_start(run_dir)
    save_config(cfg, run_dir.root)

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False)  # joins the cluster under `ray job submit`, else starts a local one
    ray.data.DataContext.get_current().enable_progress_bars = False  # one pass over small rows: bars are noise
    try:
        resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=cfg.model_dump(mode="json"),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name="checkpoints", storage_path=cfg.out,
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep),
                                 failure_config=FailureConfig(max_failures=cfg.max_failures)),
            datasets={"train": mixture_dataset(cfg.data)},
        )
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()

    plot_loss(run_dir)
    workers = json.loads(run_dir.path("workers.json").read_text())
    steps = [r for r in run_dir.metrics() if "loss" in r]
    last_eval = next((r for r in reversed(steps) if "eval_loss" in r), {})
    summary = {
        "task": cfg.task, "steps": cfg.steps, "num_workers": cfg.num_workers, "zero_stage": cfg.zero_stage,
        "lora": cfg.use_lora, "bf16": workers["bf16"],
        "examples": sum(w["examples"] for w in workers["ranks"]),
        "malformed_rows": sum(w["malformed"] for w in workers["ranks"]),
        "attempts": workers["attempt_starts"], "resumed_from_step": workers["start_step"],
        "final_loss": steps[-1]["loss"] if steps else None,
        "eval": {k: v for k, v in last_eval.items() if k.startswith("eval_")},
        "samples_per_s": steps[-1]["samples_per_s"] if steps else None,
        "tokens_per_s": steps[-1]["tokens_per_s"] if steps else None,
        "peak_rss_mb_per_worker": [w["peak_rss_mb"] for w in workers["ranks"]],
        "export": workers["export"],
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": round(time.time() - t0, 1),
    }
    run_dir.write_summary(summary)
    print(f"train {cfg.task}: {summary['steps']} steps, loss {summary['final_loss']}, eval {summary['eval']}, "
          f"{summary['malformed_rows']} malformed rows skipped; model -> {workers['export'].get('model')}")
    return summary


def main(cfg: TrainConfig) -> None:
    try:
        run(cfg)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(job_main(TrainConfig, main, doc=__doc__))
