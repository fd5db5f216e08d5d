"""The one training core for IDP and FDP: `TrainCore.step` computes a step, `TrainCore.run` logs it. The plain
single-process loop and every Ray Train rank (jobs/train_worker.py) run this same core; they differ only in
what steps the optimizer (`PlainStepper`: torch AdamW; the job: a DeepSpeed engine) and where batches come from
(`ExampleSampler`: examples in memory; `dynboot.data.ingest.RankStream`: the streamed mixture).

    model = TinyWorldModel.create(spec)
    loop = TrainLoop(model, LoopConfig(task="idp", steps=1000), examples, augment=world_augmenter(spec))
    loop.run(on_eval=lambda step: {...})                   # the plain loop on in-memory examples

    core = TrainCore(model, cfg, stream, EngineStepper(engine), augment, rank=r, reduce=all_reduce)
    core.run(start, log=run_dir.log, on_eval=..., after_step=checkpoint)   # a Ray Train rank

A step = `grad_accum` micro-batches of `batch_size` pairs; the stepper's `step()` follows DeepSpeed's semantics
(loss scaled by 1/grad_accum, gradients clipped and applied at the accumulation boundary), so the plain loop and a
1-rank DeepSpeed job give the same losses (tests/test_train.py pins it).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Protocol

import numpy as np
import torch
from pydantic import Field

from dynboot.config import Config
from dynboot.data.example import Example
from dynboot.models.base import Task, UnifiedModel
from dynboot.method.weights import Strategy, token_weights

__all__ = ["LoopConfig", "lr_at", "build_optimizer", "make_batch", "Batches", "ExampleSampler", "Stepper",
           "PlainStepper", "TrainCore", "TrainLoop", "SEED_STRIDE"]

Augmenter = Callable[[list[Example], np.random.Generator], list[Example]]
SEED_STRIDE = 1_000_003  # rank r draws augmentations with seed + r * SEED_STRIDE; rank 0 draws the plain loop's


class LoopConfig(Config):
    """Optimisation settings shared by the plain loop and the Ray Train job."""

    task: Task = Field("idp", description="idp: (before, after) -> action; fdp: (before, action) -> after.")
    steps: int = Field(1000, ge=1, description="Optimiser steps.")
    batch_size: int = Field(64, ge=1, description="Pairs per micro-batch (per worker in the Ray job).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches of batch_size per optimizer step (per worker).")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule ends at lr * min_lr_ratio.")
    warmup: int = Field(50, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    beta2: float = Field(0.98, gt=0, lt=1, description="AdamW beta2 (beta1 = 0.9).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    weighting: Strategy = Field("relative", description="FDP recognition-weight strategy (dynboot/method/weights.py): the "
                                "paper's label-dependent relative/floor, relative_spread/relative_annealed, or the "
                                "label-independent causal_spread/predicted_change/entropy.")
    weight_floor: float = Field(0.05, ge=0, description="Floor of the 'floor' weighting strategy.")
    weight_alpha: float = Field(4.0, ge=0, description="Strength of the model-based weightings: w = 1 + alpha * "
                                "(probability that the cell changes | normalised entropy | neighbour change).")
    weight_scale: float = Field(1.0, ge=0, description="Strength of the paper's relative term d / mean(d) in "
                                "relative, relative_spread and relative_annealed (1 = paper-literal).")
    weight_anneal: float = Field(0.5, gt=0, le=1, description="relative_annealed: fraction of the steps over which "
                                 "the relative weights fall linearly to plain CE.")
    augment: bool = Field(True, description="Label-preserving augmentation of gold pairs, IDP and FDP (embedded "
                          "world only: grid symmetries, colour and shape permutations with the action rewritten).")
    seed: int = Field(0, description="Seed of the data order and augmentation.")
    threads: int = Field(2, ge=1, description="torch intra-op threads.")
    eval_every: int = Field(250, ge=0, description="Steps between evaluations (0 = only at the end).")


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build_optimizer(params, cfg: LoopConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, cfg.beta2))


def make_batch(model: UnifiedModel, examples: list[Example], task: Task, cfg: LoopConfig,
               step: int = 0) -> dict[str, torch.Tensor]:
    """Collate a step's examples; FDP targets get recognition weights (dynboot.method.weights; `step` for schedules).
    Images reach here already in the model's input size (dynboot.data.ingest applies the tokenizer's policy)."""
    if task != "fdp":
        return model.collate(examples, task)
    weights = token_weights(model, examples, cfg.weighting, cfg.weight_floor, cfg.weight_alpha, step / cfg.steps,
                            cfg.weight_anneal, cfg.weight_scale)
    return model.collate(examples, task, weights)


# ---- where batches come from --------------------------------------------------------------------------------
class Batches(Protocol):
    def next(self, n: int) -> list[Example]:
        """Exactly n examples."""


class ExampleSampler:
    """Batches drawn with replacement from examples in memory (seeded; optional per-example weights): for tests,
    benchmarks and small in-memory sets. The job streams instead (dynboot.data.ingest.RankStream)."""

    def __init__(self, examples: list[Example], seed: int, weights: np.ndarray | None = None):
        if not examples:
            raise ValueError("no training examples")
        self.examples = examples
        self.rng = np.random.default_rng(seed)
        self.p = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
        self.wait_s = 0.0

    def next(self, n: int) -> list[Example]:
        idx = self.rng.choice(len(self.examples), size=n, replace=True, p=self.p)
        return [self.examples[i] for i in idx]


# ---- what steps the optimizer -----------------------------------------------------------------------------------
class Stepper(Protocol):
    net: torch.nn.Module  # what runs the forward pass

    def set_lr(self, lr: float) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """After every micro-batch; the optimizer steps at the accumulation boundary."""


class PlainStepper:
    """torch AdamW with DeepSpeed's accumulation semantics (loss / grad_accum; clip + step at the boundary)."""

    def __init__(self, net: torch.nn.Module, cfg: LoopConfig):
        self.net, self.accum, self.clip = net, cfg.grad_accum, cfg.grad_clip
        self.optimizer = build_optimizer(net.parameters(), cfg)
        self.micro = 0

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum if self.accum > 1 else loss).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum == 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


# ---- the core -----------------------------------------------------------------------------------------------------
class TrainCore:
    """Steps and logs; see the module doc. `reduce` sums a float64 tensor over ranks (identity in one process)."""

    def __init__(self, model: UnifiedModel, cfg: LoopConfig, batches: Batches, stepper: Stepper,
                 augment: Augmenter | None = None, rank: int = 0, world: int = 1,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model, self.cfg, self.batches, self.stepper = model, cfg, batches, stepper
        self.augment = augment if cfg.augment else None
        self.rng = np.random.default_rng(cfg.seed + SEED_STRIDE * rank)  # augmentation draws
        self.world, self.reduce = world, reduce or (lambda t: t)
        self.t_train = self.cpu_train = 0.0
        self.samples = self.tokens = 0  # all ranks
        self.history: list[dict] = []

    def step(self, s: int) -> dict:
        """Optimizer step s (0-based): its micro-batches, forward, backward, update; the record of it."""
        cfg = self.cfg
        t0, c0, w0 = time.perf_counter(), time.process_time(), getattr(self.batches, "wait_s", 0.0)
        lr = lr_at(s, cfg)
        self.stepper.set_lr(lr)
        loss_sum, tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            examples = self.batches.next(cfg.batch_size)
            if self.augment:
                examples = self.augment(examples, self.rng)
            batch = make_batch(self.model, examples, cfg.task, cfg, s)
            loss = self.model.loss(batch, net=self.stepper.net)
            self.stepper.backward(loss)
            self.stepper.step()
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        stats = self.reduce(torch.tensor([loss_sum / cfg.grad_accum, tokens, cfg.batch_size * cfg.grad_accum],
                                         dtype=torch.float64))
        dt = time.perf_counter() - t0
        self.t_train += dt
        self.cpu_train += time.process_time() - c0
        self.tokens += int(stats[1])
        self.samples += int(stats[2])
        return {"step": s + 1, "loss": round(stats[0].item() / self.world, 6), "lr": lr, "tokens": int(stats[1]),
                "samples_per_s": round(self.samples / self.t_train, 2), "tokens_per_s": round(self.tokens / self.t_train, 1),
                "train_s": round(self.t_train, 3), "cpu_s": round(self.cpu_train, 3),
                "data_wait_s": round(getattr(self.batches, "wait_s", 0.0) - w0, 4)}

    def run(self, start: int = 0, on_eval: Callable[[int], dict] | None = None, log: Callable[..., None] | None = None,
            after_step: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Steps start..cfg.steps-1. `on_eval(step)` every `eval_every` steps and at the end (in eval mode);
        `log(**record)` each step's record; `after_step(step, record)` (checkpoints, fault injection)."""
        cfg = self.cfg
        self.model.train()
        for s in range(start, cfg.steps):
            rec = self.step(s)
            step = rec["step"]
            if on_eval and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                self.model.eval()
                rec |= on_eval(step)
                self.model.train()
            self.history.append(rec)
            if log:
                log(**rec)
            if after_step:
                after_step(step, rec)
        self.model.eval()
        return self.history


class TrainLoop:
    """The plain single-process loop: the core with torch AdamW, on in-memory examples (or any `Batches`)."""

    def __init__(self, model: UnifiedModel, cfg: LoopConfig, examples: list[Example] | None = None,
                 augment: Augmenter | None = None, mixture_weights: np.ndarray | None = None, batches: Batches | None = None):
        torch.set_num_threads(cfg.threads)
        batches = batches or ExampleSampler(examples or [], cfg.seed, mixture_weights)
        self.core = TrainCore(model, cfg, batches, PlainStepper(model.net, cfg), augment)

    @property
    def history(self) -> list[dict]:
        return self.core.history

    def run(self, on_eval: Callable[[int], dict] | None = None, log: Callable[[dict], None] | None = None) -> list[dict]:
        """Train `cfg.steps` steps; `on_eval(step)` every `eval_every` steps and at the end; `log(record)`."""
        return self.core.run(on_eval=on_eval, log=(lambda **rec: log(rec)) if log else None)
