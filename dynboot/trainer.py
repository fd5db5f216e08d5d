"""The plain single-process training loop for IDP and FDP (no Ray): used by tests, by benchmarks, and as
the reference the Ray Train job is measured against. The Ray Train job reuses `Batcher`, `make_batch`,
`build_optimizer` and `lr_at`, so both paths compute exactly the same step.

    model = TinyWorldModel.create(spec)
    loop = TrainLoop(model, LoopConfig(task="idp", steps=1000), examples, augment=world_augmenter(spec))
    loop.run(on_eval=lambda step: {...})
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from pydantic import Field

from dynboot.config import Config
from dynboot.models.base import Example, Task, UnifiedModel
from dynboot.weights import Strategy, logit_offsets, token_weights

Augmenter = Callable[[list[Example], np.random.Generator], list[Example]]


class LoopConfig(Config):
    """Optimisation settings shared by the plain loop and the Ray Train job."""

    task: str = Field("idp", pattern="^(idp|fdp)$", description="idp: (before, after) -> action; fdp: (before, action) -> after.")
    steps: int = Field(1000, ge=1, description="Optimiser steps.")
    batch_size: int = Field(64, ge=1, description="Pairs per step (per worker in the Ray job).")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule ends at lr * min_lr_ratio.")
    warmup: int = Field(50, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    beta2: float = Field(0.98, gt=0, lt=1, description="AdamW beta2 (beta1 = 0.9).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    weighting: Strategy = Field("relative", description="FDP recognition-weight strategy (dynboot/weights.py): the "
                                "paper's label-dependent relative/floor, relative_annealed, or the label-independent "
                                "predicted_change/entropy read from the model's own stop-gradient prediction.")
    weight_floor: float = Field(0.05, ge=0, description="Floor of the 'floor' weighting strategy.")
    weight_alpha: float = Field(4.0, ge=0, description="Strength of the model-based weightings: w = 1 + alpha * "
                                "(probability that the cell changes | normalised entropy).")
    weight_scale: float = Field(1.0, ge=0, description="Strength of the paper's relative term d / mean(d) in "
                                "relative, relative_spread and relative_annealed (1 = paper-literal).")
    weight_anneal: float = Field(0.5, gt=0, le=1, description="relative_annealed: fraction of the steps over which "
                                 "the relative weights fall linearly to plain CE.")
    augment: bool = Field(True, description="Label-preserving augmentation of gold pairs, IDP and FDP (embedded "
                         "world only: grid symmetries, colour and shape permutations with the action rewritten).")
    seed: int = Field(0, description="Seed of batch sampling and augmentation.")
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


class Batcher:
    """Draws batches with replacement from an example pool (seeded), applying augmentation on the fly."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, augment: Augmenter | None = None,
                 weights: np.ndarray | None = None):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.augment = examples, batch_size, augment
        self.rng = np.random.default_rng(seed)
        self.p = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)

    def next(self) -> list[Example]:
        idx = self.rng.choice(len(self.examples), size=self.batch_size, replace=True, p=self.p)
        batch = [self.examples[i] for i in idx]
        return self.augment(batch, self.rng) if self.augment else batch


def make_batch(model: UnifiedModel, examples: list[Example], task: Task, cfg: LoopConfig,
               step: int = 0) -> dict[str, torch.Tensor]:
    """Collate a step's examples; FDP targets get recognition weights (dynboot.weights; `step` for schedules)."""
    if task != "fdp":
        return model.collate(examples, task)
    weights = token_weights(model, examples, cfg.weighting, cfg.weight_floor, cfg.weight_alpha, step / cfg.steps,
                            cfg.weight_anneal, cfg.weight_scale)
    batch = model.collate(examples, task, weights)
    offsets = logit_offsets(model, examples, cfg.weighting, cfg.weight_alpha)
    if offsets is not None:  # relative_debiased: the loss's correction that keeps the minimiser at q = p
        batch["image_logit_offsets"] = offsets
    return batch


class TrainLoop:
    def __init__(self, model: UnifiedModel, cfg: LoopConfig, examples: list[Example], augment: Augmenter | None = None,
                 mixture_weights: np.ndarray | None = None):
        self.model, self.cfg = model, cfg
        torch.set_num_threads(cfg.threads)
        use_aug = augment if cfg.augment else None
        self.batcher = Batcher(examples, cfg.batch_size, cfg.seed, use_aug, mixture_weights)
        self.opt = build_optimizer(model.net.parameters(), cfg)
        self.history: list[dict] = []

    def step(self, step: int) -> dict:
        cfg = self.cfg
        batch = make_batch(self.model, self.batcher.next(), cfg.task, cfg, step)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = self.model.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.net.parameters(), cfg.grad_clip)
        self.opt.step()
        tokens = int(batch["attention_mask"].sum())
        return {"step": step + 1, "loss": float(loss.detach()), "lr": lr_at(step, cfg), "tokens": tokens}

    def run(self, on_eval: Callable[[int], dict] | None = None, log: Callable[[dict], None] | None = None) -> list[dict]:
        """Train `cfg.steps` steps; `on_eval(step)` runs every `eval_every` steps and at the end."""
        cfg = self.cfg
        self.model.train()
        t_train, cpu0 = 0.0, time.process_time()
        for s in range(cfg.steps):
            t0 = time.perf_counter()
            rec = self.step(s)
            t_train += time.perf_counter() - t0
            rec |= {"train_s": round(t_train, 3), "cpu_s": round(time.process_time() - cpu0, 3),
                    "samples_per_s": round(rec["step"] * cfg.batch_size / t_train, 2)}
            last = rec["step"] == cfg.steps
            if on_eval and ((cfg.eval_every and rec["step"] % cfg.eval_every == 0) or last):
                self.model.eval()
                rec |= on_eval(rec["step"])
                self.model.train()
            self.history.append(rec)
            if log:
                log(rec)
        self.model.eval()
        return self.history
