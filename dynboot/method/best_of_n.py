"""Inference-time verification: sample N candidates from the FDP, score each with a verifier score
(dynboot.method.verify: the paper's IDP action log-prob by default), return the best with all scores (paper §3.3).

The N candidates of a request come from one batched `sample` call; their scores from one batched call per
model on the codes (no decode / re-encode round trip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dynboot.models.base import UnifiedModel
from dynboot.method.verify import Verifier, VerifierScore, verification_scores


@dataclass
class BestOfN:
    codes: torch.Tensor  # [B, L] the chosen candidate per request
    index: torch.Tensor  # [B] which of the N was chosen
    candidates: torch.Tensor  # [B, N, L]
    scores: torch.Tensor  # [B, N] verifier scores

    def images(self, fdp: UnifiedModel) -> np.ndarray:
        return fdp.tokenizer.decode(self.codes)


def top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] scores -> [..., n] candidate indices, best first; ties go to the lowest index (deterministic)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n]


def pick_best(candidates: torch.Tensor, scores: torch.Tensor) -> BestOfN:
    """Highest score wins; ties go to the lowest index (deterministic)."""
    index = top_n(scores, 1)[..., 0]
    codes = candidates[torch.arange(len(candidates)), index]
    return BestOfN(codes, index, candidates, scores)


def best_of_n(fdp: UnifiedModel, idp: UnifiedModel | None, before: np.ndarray, actions: list[str], n: int,
              temperature: float = 1.0, top_k: int = 0, seed: int | None = 0,
              verifier: Verifier | VerifierScore = "idp") -> BestOfN:
    """Sample `n` candidates per (before, action) and return the one the verifier score ranks highest."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    candidates = fdp.sample(before, actions, n=n, temperature=temperature, top_k=top_k, seed=seed)
    return pick_best(candidates, verification_scores(verifier, fdp, idp, before, candidates, actions))
