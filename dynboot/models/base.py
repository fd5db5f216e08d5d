"""The one interface every model family sits behind; method code never branches on the family.

Images cross this interface as RGB uint8 arrays: a batch is an array [B, H, W, 3] or a list of images of
any sizes and modes (each tokenizer's `policy` turns every image into its square input); image tokens are int64
codes [B, L] in the tokenizer's codebook (no vocabulary offset); actions are strings.

    tok = model.tokenizer
    codes = tok.encode(images)                       # [B, L]; tok.policy says how an image becomes the input
    model.caption(before, after)                     # IDP: list[str]
    model.caption_scored(before, after)              # IDP, one pass: (captions, their mean log p) for relabelling
    model.action_logprob(before, after, actions)     # IDP verifier score: mean per-token log p(action), [B]
    model.sample(before, actions, n=8, seed=0)       # FDP: [B, n, L] codes, one batched call, shared prefix
    batch = model.collate(examples, task="fdp", token_weights=w)   # CPU tensors for one training step
    loss = model.loss(batch)                         # weighted CE on target tokens only
    model.token_cost("score"), model.max_tokens      # what a row costs / the most tokens one forward holds
    model.save(dir); load_model(dir)                 # Hugging Face layout, local files only
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from dynboot.data.example import Example
from dynboot.io.images import ImagePolicy

Task = Literal["idp", "fdp"]
TinySize = Literal["xxs", "xs", "s", "m"]  # the tiny world model's sizes (dynboot.models.tiny.SIZES)
Stage = Literal["score", "caption", "sample", "train_idp", "train_fdp"]  # what `token_cost` prices


class ImageTokenizer(Protocol):
    """Discrete image tokenizer (exact grid tokenizer, VQ-GAN, ...)."""

    codebook_size: int  # number of codes
    tokens_per_image: int  # L
    image_size: int  # side of the square input the tokenizer works at
    policy: ImagePolicy  # how an image of any size / mode becomes the [S, S, 3] input (dynboot.io.images)

    def encode(self, images) -> torch.Tensor:
        """Images ([B, H, W, 3] uint8, or a list of any sizes / modes) -> [B, L] int64 codes."""

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """[B, L] codes -> [B, S, S, 3] uint8 images."""

    def features(self, images) -> torch.Tensor:
        """Images (as for `encode`) -> [B, L, D] pre-quantisation features (for recognition weights)."""


class UnifiedModel(abc.ABC):
    """A unified (early-fusion) VLM used both as IDP and as FDP."""

    backend: str  # registry name, e.g. "tiny", "liquid", "anole", "janus"
    tokenizer: ImageTokenizer
    net: torch.nn.Module  # the trainable module (what DeepSpeed / DDP / PEFT wrap)
    max_tokens: int | None  # the most tokens one forward holds (rows are chunked to fit); None = unbounded

    @property
    def model_id(self) -> str:
        """Stable identity written into pseudo-label rows (backend + checkpoint name)."""
        return f"{self.backend}:{getattr(self, 'source', 'scratch')}"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ---- IDP -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def caption(self, before, after, max_new_tokens: int = 32) -> list[str]:
        """The action turning each `before` into its `after` (greedy, text tokens only)."""

    @abc.abstractmethod
    def caption_scored(self, before, after, max_new_tokens: int = 32) -> tuple[list[str], torch.Tensor]:
        """`caption` and, from the same decoding pass, each caption's mean per-token log-prob: the same number
        as `action_logprob(before, after, captions)` (full-vocabulary log-softmax over the caption + <eos>)."""

    @abc.abstractmethod
    def action_logprob(self, before, after, actions: list[str]) -> torch.Tensor:
        """[B] mean per-token log-prob of each action given (before, after); `after` may be images
        or codes [B, L] (FDP candidates, scored without a decode/encode round trip)."""

    # ---- FDP -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def sample(
        self, before, actions: list[str], n: int = 1, temperature: float = 1.0,
        top_k: int = 0, seed: int | None = None,
    ) -> torch.Tensor:
        """[B, n, L] image codes; exactly L image tokens each. temperature 0 = greedy."""

    @abc.abstractmethod
    def image_logprobs(self, before: np.ndarray, actions: list[str], after: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, L, K] teacher-forced FDP log-probs over the codebook at each cell of `after` (images or codes),
        without gradient: row l is log p(. | before, action, after[<l]). Model-based recognition weights
        (dynboot.method.weights) and the FDP-likelihood verifier (dynboot.method.verify) read it."""

    # ---- training --------------------------------------------------------------------------------
    @abc.abstractmethod
    def collate(self, examples: list[Example], task: Task, token_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tensors for one step. `token_weights` [B, L] weight the FDP target image tokens (None = 1)."""

    @abc.abstractmethod
    def loss(self, batch: dict[str, torch.Tensor], net: torch.nn.Module | None = None) -> torch.Tensor:
        """Σ w·CE / Σ w over target tokens only (IDP: the action + end; FDP: image tokens + end).

        `net` is what runs the forward pass (a DeepSpeed engine or DDP wrapper of `self.net`)."""

    # ---- memory ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def token_cost(self, stage: Stage, n: int = 1, **kw) -> int:
        """Tokens one input of `stage` holds in a forward (KV cache included; `sample`: one prompt with n
        candidates). A server batching by rows keeps Σ token_cost <= max_tokens."""

    def gradient_checkpointing(self, enable: bool | None = None) -> bool:
        """Turn activation checkpointing of the network's layers on or off (None = the backend's default: on for
        models of a billion parameters or more). Returns whether it is on. Call it before wrapping the net."""
        base = self.net.get_base_model() if hasattr(self.net, "get_base_model") else self.net
        if enable is None:
            enable = sum(p.numel() for p in base.parameters()) >= 1e9
        if enable:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif base.is_activation_checkpointing:
            base.activation_checkpointing_disable()
        return bool(enable)

    # ---- persistence -----------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, path: str | Path) -> Path:
        """Hugging Face layout: config + safetensors (+ PEFT adapter), tokenizer files, dynboot.json."""

    def lora_target_modules(self) -> list[str]:
        """Module names LoRA may wrap: language-model projections only (never VQ / vision towers)."""
        return ["q_proj", "k_proj", "v_proj", "o_proj"]

    def lora_modules_to_save(self) -> list[str]:
        """Modules trained in full next to the LoRA layers (saved in the adapter), e.g. Janus's generation head."""
        return []

    def lora_config(self, rank: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: list[str] | None = None):
        """The PEFT LoraConfig to wrap `net` with (`peft.get_peft_model(model.net, model.lora_config(...))`)."""
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                          target_modules=target_modules or self.lora_target_modules(),
                          modules_to_save=self.lora_modules_to_save() or None)

    def to(self, device: str | torch.device) -> "UnifiedModel":
        self.net.to(device)
        return self

    def train(self, mode: bool = True) -> "UnifiedModel":
        self.net.train(mode)
        return self

    def eval(self) -> "UnifiedModel":
        return self.train(False)
