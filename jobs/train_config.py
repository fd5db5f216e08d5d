"""The train job's config (jobs/train.py runs it; its workers in jobs/train_worker.py read it)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from dynboot.config import Config
from dynboot.data.mixture import Source, parse_sources
from dynboot.io import storage
from dynboot.io.rundir import ResumeMode
from dynboot.io.tracking import TrackingKind
from dynboot.models.base import TinySize
from dynboot.training.trainer import LoopConfig

__all__ = ["LoraSettings", "TrainConfig", "world_train_config", "gold_plus"]


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

    rerun_may_change: ClassVar[frozenset[str]] = frozenset({
        "cpus_per_worker", "threads", "ingest_cpus", "ingest_tasks", "decode_cache_mb", "max_failures", "checkpoint_every", "keep",
        "eval_every", "eval_limit", "eval_generate", "fault_step", "fault_rank", "progress_every_s", "tracking",
        "tracking_uri", "tracking_project", "name"})

    backend: str = Field("", description="Backend name (dynboot.models.registry); empty = read from model_path's "
                         "dynboot.json ('tiny' from scratch).")
    model_path: str = Field("", description="Checkpoint dir or URI to fine-tune; empty or 'scratch' = the tiny world "
                            "model from scratch.")
    size: TinySize = Field("xs", description="Tiny model size when starting from scratch.")
    data: list[Source] = Field([Source(path="runs/world/gold")],
                               description="Mixture: a path, or a list of paths / {path, weight, max_items, tag, format} "
                               "(dynboot.data.mixture).")
    eval_data: str = Field("runs/world/test", description="Held-out pairs (AURORA json/dir, test.json included, or "
                           "Parquet); empty = no evaluation.")
    eval_limit: int = Field(128, ge=1, description="Held-out pairs used per evaluation.")
    eval_generate: bool = Field(True, description="World data: also greedy IDP captions / FDP samples -> exact match.")
    out: str = Field("runs/train", description="Run directory (a path or URI; also Ray Train's storage).")
    resume: ResumeMode = Field("auto", description="auto: continue the run in `out` if its config matches; force: "
                               "continue even if it differs; off: set the old run aside and start over.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs reserved per worker (fractional: leaves room for Ray Data).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false = CPU over gloo.")
    threads: int = Field(1, ge=1, description="torch intra-op threads per worker.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage; 0 = plain data parallel (DDP semantics).")
    zero3_persist_below: int = Field(0, ge=0, description="ZeRO-3: parameters with fewer elements stay whole on every "
                                     "rank (DeepSpeed stage3_param_persistence_threshold; its default 100000 suits 7B models).")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 mixed precision; auto = on GPUs that support it, off on CPU.")
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description="Activation checkpointing: recompute "
                                                           "activations in the backward pass; auto = on for 7B-size models.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    export_merged: bool = Field(False, description="LoRA runs: out/model holds the base with the adapter merged (in the "
                                "training dtype) instead of the adapter naming its base.")
    shuffle_window: int = Field(256, ge=1, description="Rows per window of the mixture plan: the shuffle buffer, and "
                                "what one read task holds (dynboot.data.mixture).")
    ingest_cpus: float = Field(0.5, gt=0, description="CPUs per Ray Data read task (read + decode + image policy).")
    ingest_tasks: int = Field(2, ge=1, description="Read tasks in flight per rank (bounds what the ingest holds).")
    decode_cache_mb: float = Field(256, ge=0, description="A mixture whose decoded images fit in this many MiB is "
                                   "decoded once per read process and kept, instead of once per epoch "
                                   "(dynboot.data.ingest; 0 = never).")
    checkpoint_every: int = Field(250, ge=0, description="Steps between checkpoints (0 = only at the end).")
    keep: int = Field(2, ge=1, description="Checkpoints kept.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the latest checkpoint before the run fails.")
    name: str = Field("", description="The run's name on the console and in the tracker (empty = the task).")
    progress_every_s: float = Field(5.0, gt=0, description="Seconds between the console's progress lines (step/steps, "
                                    "loss, samples/s, ETA), read by the driver from metrics.jsonl.")
    tracking: TrackingKind = Field("none", description="Experiment tracker for the metrics, as HF Trainer's report_to: "
                                   "none, mlflow (mlflow-skinny: the `tracking` extra) or wandb (credentials from the "
                                   "environment, e.g. WANDB_API_KEY; never logged).")
    tracking_uri: str = Field("", description="MLflow tracking URI (empty = MLFLOW_TRACKING_URI, else MLflow's default).")
    tracking_project: str = Field("dynboot", description="MLflow experiment / W&B project of the run.")
    fault_step: int = Field(0, ge=0, description="Fault injection (tests): rank fault_rank exits hard once after this step (0 = off).")
    fault_rank: int = Field(1, ge=0, description="Rank that fault_step kills.")

    @field_validator("data", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> list[Any]:
        return parse_sources(v)

    @field_validator("resume", mode="before")
    @classmethod
    def _resume(cls, v: Any) -> Any:
        """YAML reads `off` as false (and old configs say true/false): booleans mean auto / off."""
        return {True: "auto", False: "off"}.get(v, v) if isinstance(v, bool) else v

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
        """Local paths made absolute (Ray workers do not run in the driver's working directory); URIs as they are."""
        def absolute(p: str) -> str:
            return p if p == "scratch" else storage.absolute(p)

        data = [s.model_copy(update={"path": absolute(s.path)}) for s in self.data]
        return self.model_copy(update={"out": absolute(self.out), "model_path": absolute(self.model_path),
                                       "eval_data": absolute(self.eval_data), "data": data})


def world_train_config(task: str, data: list[dict], out: str, steps: int, eval_data: str, *, share: int = 1,
                       **fields: Any) -> TrainConfig:
    """A train run on the embedded world as the quickstart and bootstrap jobs run it: one worker, evaluation four
    times and checkpoints twice per run, on the held-out pairs in `eval_data`. `share` runs train at once (the
    quickstart's parallel FDP stage): each reserves 1/share of the CPUs and trains with one thread, so that they
    fill the cores together instead of oversubscribing them. `fields` are any other TrainConfig fields (batch_size,
    size, weighting, zero_stage, eval_limit, tracking...)."""
    return TrainConfig.model_validate({
        "task": task, "data": data, "out": out, "steps": steps, "num_workers": 1, "cpus_per_worker": 1.0 / share,
        "ingest_cpus": 0.5 / share, "threads": 2 if share == 1 else 1, "eval_data": eval_data,
        "eval_every": max(steps // 4, 1), "checkpoint_every": max(steps // 2, 1), **fields})


def gold_plus(gold: dict, extra: list[dict], balance: bool) -> list[dict]:
    """The mixture `gold` + `extra` sources (mappings of Source fields), as the quickstart and bootstrap train on
    it; `balance`: with every action class at its gold share (`dynboot.data.mixture.class_balanced`, the counts
    read from the sources), else as given. Extra sources of weight 0 (a stage that kept no pair) are left out."""
    from dynboot.data.data_index import class_counts
    from dynboot.data.mixture import Source, class_balanced

    extra = [e for e in extra if e.get("weight", 1.0) > 0]
    if not balance or not extra:
        return [gold] + extra
    g = Source.model_validate(gold)
    others = [(Source.model_validate(e), class_counts(Source.model_validate(e))) for e in extra]
    return [s.model_dump(mode="json") for s in class_balanced(g, class_counts(g), others)]
