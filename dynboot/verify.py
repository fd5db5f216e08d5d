"""Verification scores for best-of-N: which of N sampled after-images to keep (higher is better).

    verification_scores(score, fdp, idp, before, candidates, actions)    [B, N], one function for eval and serve

- `idp` (the paper, §3.3): the IDP's mean per-token log-prob of the requested action given (before,
  candidate). It checks that the action explains the change; it does not check that nothing else changed:
  a candidate that performs the swap and also adds an object explains "swap" about as well as the clean one.
- `fdp`: the FDP's own mean per-token log-prob of the candidate's codes given (before, action), teacher-forced.
  A change the action does not call for sits where the FDP expected a copy, so it costs that token's
  log-prob; but alone it prefers the FDP's mode, right or wrong.
- `idp+fdp`: idp + fdp_weight * fdp, the product of the two per-token geometric means (fdp_weight = 1):
  p_IDP(action | before, candidate) * p_FDP(candidate | before, action)^w. The IDP asks "is the action
  done?", the FDP "is anything else done?"; a candidate must pass both.

Serving computes the two parts on their own tiers (the FDP part on the generator, which holds the FDP; the
IDP part on the verifier) and `combine`s them in the ingress; evaluation calls `verification_scores`.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from dynboot.models.base import UnifiedModel

VerifierScore = Literal["idp", "fdp", "idp+fdp"]
VERIFIER_SCORES: tuple[str, ...] = get_args(VerifierScore)
NEEDS_IDP = ("idp", "idp+fdp")
NEEDS_FDP = ("fdp", "idp+fdp")


def _check(score: str) -> None:
    if score not in VERIFIER_SCORES:
        raise ValueError(f"unknown verifier score {score!r}; choose one of {VERIFIER_SCORES}")


def _repeat(before: np.ndarray, candidates: torch.Tensor, actions: list[str]) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    B, N, L = candidates.shape
    if not (len(before) == B == len(actions)):
        raise ValueError(f"batch sizes differ: {len(before)} before, {B} candidate sets, {len(actions)} actions")
    return np.repeat(np.asarray(before), N, axis=0), candidates.reshape(B * N, L), [a for a in actions for _ in range(N)]


def idp_score(idp: UnifiedModel, before: np.ndarray, candidates: torch.Tensor, actions: list[str]) -> torch.Tensor:
    """[B, N] mean action log-prob of each candidate [B, N, L] codes, in one batched IDP call."""
    B, N, _ = candidates.shape
    return idp.action_logprob(*_repeat(before, candidates, actions)).reshape(B, N)


def fdp_score(fdp: UnifiedModel, before: np.ndarray, candidates: torch.Tensor, actions: list[str]) -> torch.Tensor:
    """[B, N] the FDP's mean per-token log-prob of each candidate's codes, in one batched teacher-forced call."""
    B, N, L = candidates.shape
    rep_before, codes, rep_actions = _repeat(before, candidates, actions)
    logprobs = fdp.image_logprobs(rep_before, rep_actions, codes)  # [B*N, L, K]
    return torch.gather(logprobs, 2, codes.long()[..., None])[..., 0].mean(-1).reshape(B, N)


def combine(score: VerifierScore, idp: torch.Tensor | None = None, fdp: torch.Tensor | None = None,
            fdp_weight: float = 1.0) -> torch.Tensor:
    """The verifier score from its parts ([B, N] each; the ones `score` does not use may be None)."""
    _check(score)
    missing = [name for name, part, needs in (("idp", idp, NEEDS_IDP), ("fdp", fdp, NEEDS_FDP)) if score in needs and part is None]
    if missing:
        raise ValueError(f"verifier score {score!r} needs the {' and '.join(missing)} part")
    if score == "idp":
        return idp
    if score == "fdp":
        return fdp
    return idp + fdp_weight * fdp


def verification_scores(score: VerifierScore, fdp: UnifiedModel | None, idp: UnifiedModel | None, before: np.ndarray,
                        candidates: torch.Tensor, actions: list[str], fdp_weight: float = 1.0) -> torch.Tensor:
    """[B, N] scores of `candidates` [B, N, L] (codes) for each (before, action); the model a score does not
    use may be None."""
    _check(score)
    parts = {}
    if score in NEEDS_IDP:
        if idp is None:
            raise ValueError(f"verifier score {score!r} needs the IDP")
        parts["idp"] = idp_score(idp, before, candidates, actions)
    if score in NEEDS_FDP:
        if fdp is None:
            raise ValueError(f"verifier score {score!r} needs the FDP")
        parts["fdp"] = fdp_score(fdp, before, candidates, actions)
    return combine(score, fdp_weight=fdp_weight, **parts)
