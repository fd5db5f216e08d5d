"""The model a `dynboot train` rank trains: built in its dtype on its device, gradient checkpointing, PEFT LoRA
(shared by the workers, jobs/train_worker.py, and the export, jobs/train_export.py)."""

from __future__ import annotations

from typing import Literal

import torch

from dynboot.io import storage
from dynboot.models.base import UnifiedModel
from jobs.train_config import TrainConfig

__all__ = ["world_spec", "world_of", "train_dtype", "set_gradient_checkpointing", "build_model"]


def world_spec(cfg: TrainConfig):
    """The embedded world's spec when training on world data (a local data source's or eval set's world.json)."""
    from dynboot.world.generate import load_spec

    for p in [s.path for s in cfg.data] + [cfg.eval_data]:
        if p and not storage.is_uri(p):
            try:
                return load_spec(p)
            except FileNotFoundError:
                continue
    return None


def world_of(model: UnifiedModel):
    """The model's embedded world (its WorldSpec) when it reads world frames: the capability behind the world's
    augmentation and exact metrics (a model without one gets neither)."""
    from dynboot.world.scene import WorldSpec

    spec = getattr(model, "spec", None)
    return spec if isinstance(spec, WorldSpec) else None


def train_dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


def set_gradient_checkpointing(model: UnifiedModel, setting: bool | Literal["auto"]) -> bool:
    """Activation checkpointing on (True), off (False), or the backend's default ("auto": on for 7B-size models)."""
    return bool(model.gradient_checkpointing(None if setting == "auto" else bool(setting)))


def build_model(cfg: TrainConfig, lora: bool, device: str = "cpu", dtype: torch.dtype = torch.float32) -> UnifiedModel:
    """The model to train (in train mode), loaded in `dtype` on `device`; with `lora`, `model.net` is PEFT-wrapped."""
    if cfg.from_scratch:
        from dynboot.models.tiny import TinyWorldModel

        spec = world_spec(cfg)
        if spec is None:
            raise ValueError("model_path is empty (tiny model from scratch) but no data source is a `dynboot world` dir")
        model = TinyWorldModel.create(spec, cfg.size, seed=cfg.seed).to(device)
    else:
        from dynboot.models.registry import load_model

        model = load_model(storage.local_model_dir(cfg.model_path), backend=cfg.backend or None, device=device, dtype=dtype)
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    if lora:
        from peft import get_peft_model

        targets = cfg.lora.target_modules or model.lora_target_modules()
        lora_cfg = model.lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, targets)
        model.net = get_peft_model(model.net, lora_cfg)
    return model.train()


