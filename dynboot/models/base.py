"""The one interface every model family sits behind; method code never branches on the family.

Images cross this interface as RGB uint8 arrays [B, H, W, 3] (any size: each backend resizes to its
tokenizer's input), image tokens as int64 codes [B, L] in the tokenizer's codebook (no vocabulary offset),
actions as strings.

    tok = model.tokenizer
    codes = tok.encode(images)                       # [B, L]
    model.caption(before, after)                     # IDP: list[str]
    model.action_logprob(before, after, actions)     # IDP verifier score: mean per-token log p(action), [B]
    model.sample(before, actions, n=8, seed=0)       # FDP: [B, n, L] codes, one batched call, shared prefix
    batch = model.collate(examples, task="fdp", token_weights=w)   # CPU tensors for one training step
    loss = model.loss(batch)                         # weighted CE on target tokens only
    model.save(dir); load_model(dir)                 # Hugging Face layout, local files only
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

Task = Literal["idp", "fdp"]


class ImageTokenizer(Protocol):
    """Discrete image tokenizer (exact grid tokenizer, VQ-GAN, ...)."""

    codebook_size: int  # number of codes
    tokens_per_image: int  # L
    image_size: int  # side of the square input the tokenizer works at

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> [B, L] int64 codes."""

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """[B, L] codes -> [B, H, W, 3] uint8 images."""

    def features(self, images: np.ndarray) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> [B, L, D] pre-quantisation features (for recognition weights)."""


@dataclass
class Example:
    """One training pair, as the data loaders hand it to `collate`."""

    before: np.ndarray  # [H, W, 3] uint8
    after: np.ndarray  # [H, W, 3] uint8
    action: str
    meta: dict[str, Any] = field(default_factory=dict)  # source, id, provenance tag...


class UnifiedModel(abc.ABC):
    """A unified (early-fusion) VLM used both as IDP and as FDP."""

    backend: str  # registry name, e.g. "tiny", "liquid", "anole", "janus"
    tokenizer: ImageTokenizer
    net: torch.nn.Module  # the trainable module (what DeepSpeed / DDP / PEFT wrap)

    @property
    def model_id(self) -> str:
        """Stable identity written into pseudo-label rows (backend + checkpoint name)."""
        return f"{self.backend}:{getattr(self, 'source', 'scratch')}"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ---- IDP -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def caption(self, before: np.ndarray, after: np.ndarray, max_new_tokens: int = 32) -> list[str]:
        """The action turning each `before` into its `after` (greedy, text tokens only)."""

    @abc.abstractmethod
    def action_logprob(self, before: np.ndarray, after: np.ndarray | torch.Tensor, actions: list[str]) -> torch.Tensor:
        """[B] mean per-token log-prob of each action given (before, after); `after` may be images
        [B, H, W, 3] or codes [B, L] (FDP candidates, scored without a decode/encode round trip)."""

    # ---- FDP -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def sample(
        self, before: np.ndarray, actions: list[str], n: int = 1, temperature: float = 1.0,
        top_k: int = 0, seed: int | None = None,
    ) -> torch.Tensor:
        """[B, n, L] image codes; exactly L image tokens each. temperature 0 = greedy."""

    def image_logprobs(self, before: np.ndarray, actions: list[str], after: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, L, K] teacher-forced FDP log-probs over the codebook at each cell of `after` (images or codes),
        without gradient: row l is log p(. | before, action, after[<l]). Model-based recognition weights
        (dynboot.weights) and the FDP-likelihood verifier (dynboot.verify) read it."""
        raise NotImplementedError(f"{type(self).__name__} does not provide image_logprobs yet")

    # ---- training --------------------------------------------------------------------------------
    @abc.abstractmethod
    def collate(self, examples: list[Example], task: Task, token_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tensors for one step. `token_weights` [B, L] weight the FDP target image tokens (None = 1)."""

    @abc.abstractmethod
    def loss(self, batch: dict[str, torch.Tensor], net: torch.nn.Module | None = None) -> torch.Tensor:
        """Σ w·CE / Σ w over target tokens only (IDP: the action + end; FDP: image tokens + end).

        `net` is what runs the forward pass (a DeepSpeed engine or DDP wrapper of `self.net`)."""

    def idp_loss(self, examples: list[Example]) -> torch.Tensor:
        return self.loss(self.collate(examples, "idp"))

    def fdp_loss(self, examples: list[Example], token_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss(self.collate(examples, "fdp", token_weights))

    # ---- persistence -----------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, path: str | Path) -> Path:
        """Hugging Face layout: config + safetensors (+ PEFT adapter), tokenizer files, dynboot.json."""

    def lora_target_modules(self) -> list[str]:
        """Module names LoRA may wrap: language-model projections only (never VQ / vision towers)."""
        return ["q_proj", "k_proj", "v_proj", "o_proj"]

    def to(self, device: str | torch.device) -> "UnifiedModel":
        self.net.to(device)
        return self

    def train(self, mode: bool = True) -> "UnifiedModel":
        self.net.train(mode)
        return self

    def eval(self) -> "UnifiedModel":
        return self.train(False)
