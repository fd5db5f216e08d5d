"""Verification scores for best-of-N: which of N sampled after-images to keep (higher is better).

    verifier = Verifier(score="idp+fdp", fdp_weight=1.0)       # a config block of eval and serve
    verification_scores(verifier, fdp, idp, before, candidates, actions)    # [B, N], the one function

- `idp` (the paper, §3.3): the IDP's mean per-token log-prob of the requested action given (before,
  candidate). It checks that the action explains the change; it does not check that nothing else changed:
  a candidate that performs the swap and also adds an object explains "swap" about as well as the clean one.
- `fdp`: the FDP's own mean per-token log-prob of the candidate's codes given (before, action), teacher-forced.
  A change the action does not call for sits where the FDP expected a copy, so it costs that token's
  log-prob; but alone it prefers the FDP's mode, right or wrong.
- `idp+fdp`: idp + fdp_weight * fdp, the product of the two per-token geometric means (fdp_weight = 1):
  p_IDP(action | before, candidate) * p_FDP(candidate | before, action)^w. The IDP asks "is the action
  done?", the FDP "is anything else done?"; a candidate must pass both.
- `idp+edit`: idp - edit_weight * (fraction of the candidate's codes that differ from the before image's),
  a minimal-edit prior that needs no second model: of two candidates the action explains equally well,
  the one that changes less wins.

Serving computes the parts on their own tiers (`fdp_score` on the generator, which holds the FDP;
`idp_score` on the verifier; `edit_fraction` anywhere) and `combine`s them in the ingress; evaluation calls
`verification_scores`. The FDP part could also be recorded while sampling (the log-prob of each sampled code
under the temperature-1 logits) at no extra forward; here it is a teacher-forced forward of the candidates.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
from pydantic import Field

from dynboot.config import Config
from dynboot.models.base import UnifiedModel

VerifierScore = Literal["idp", "fdp", "idp+fdp", "idp+edit"]
VERIFIER_SCORES: tuple[str, ...] = get_args(VerifierScore)
NEEDS_IDP = ("idp", "idp+fdp", "idp+edit")
NEEDS_FDP = ("fdp", "idp+fdp")


class Verifier(Config):
    """How best-of-N ranks candidates (dynboot.method.verify)."""

    score: VerifierScore = Field("idp", description="idp: the paper's IDP action log-prob; fdp: the FDP's own "
                                 "log-prob of the candidate; idp+fdp: their sum (also penalises changes the action "
                                 "does not explain); idp+edit: the IDP score minus a minimal-edit prior.")
    fdp_weight: float = Field(1.0, ge=0, description="idp+fdp: weight of the FDP's mean per-token log-prob.")
    edit_weight: float = Field(1.0, ge=0, description="idp+edit: weight of the fraction of codes changed.")


def _repeat(before: np.ndarray, candidates: torch.Tensor, actions: list[str]) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    B, N, L = candidates.shape
    if not (len(before) == B == len(actions)):
        raise ValueError(f"batch sizes differ: {len(before)} before, {B} candidate sets, {len(actions)} actions")
    return np.repeat(np.asarray(before), N, axis=0), candidates.reshape(B * N, L), [a for a in actions for _ in range(N)]


def verifier_sees_codes(fdp: UnifiedModel | None, idp: UnifiedModel) -> bool:
    """Whether the IDP can score the FDP's codes directly: the same image tokenizer (same type, codebook, codes
    per image and image policy), so decoding and re-encoding would give the same codes back."""
    if fdp is None or fdp is idp or fdp.tokenizer is idp.tokenizer:
        return True
    a, b = fdp.tokenizer, idp.tokenizer
    same = type(a) is type(b) and (a.codebook_size, a.tokens_per_image, a.image_size) == \
        (b.codebook_size, b.tokens_per_image, b.image_size)
    return same and a.policy == b.policy


def idp_score(idp: UnifiedModel, before: np.ndarray, candidates: torch.Tensor, actions: list[str],
              fdp: UnifiedModel | None = None) -> torch.Tensor:
    """[B, N] mean action log-prob of each candidate [B, N, L] (the FDP's codes), in one batched IDP call; the
    IDP reads the codes, or the images `fdp` decodes them to when the two tokenizers differ."""
    B, N, _ = candidates.shape
    rep_before, codes, rep_actions = _repeat(before, candidates, actions)
    after = codes if verifier_sees_codes(fdp, idp) else fdp.tokenizer.decode(codes)
    return idp.action_logprob(rep_before, after, rep_actions).reshape(B, N)


def fdp_score(fdp: UnifiedModel, before: np.ndarray, candidates: torch.Tensor, actions: list[str]) -> torch.Tensor:
    """[B, N] the FDP's mean per-token log-prob of each candidate's codes, in one batched teacher-forced call."""
    B, N, L = candidates.shape
    rep_before, codes, rep_actions = _repeat(before, candidates, actions)
    logprobs = fdp.image_logprobs(rep_before, rep_actions, codes)  # [B*N, L, K]
    return torch.gather(logprobs, 2, codes.long()[..., None])[..., 0].mean(-1).reshape(B, N)


def edit_fraction(tokenizer, before: np.ndarray, candidates: torch.Tensor) -> torch.Tensor:
    """[B, N] fraction of each candidate's codes that differ from the before image's codes."""
    codes = tokenizer.encode(np.asarray(before)).to(candidates.device)
    return (candidates != codes[:, None]).float().mean(-1)


def combine(verifier: Verifier, idp: torch.Tensor | None = None, fdp: torch.Tensor | None = None,
            edit: torch.Tensor | None = None) -> torch.Tensor:
    """The verifier score from its parts ([B, N] each; the ones `verifier.score` does not use may be None)."""
    score = verifier.score
    parts = (("idp", idp, NEEDS_IDP), ("fdp", fdp, NEEDS_FDP), ("edit", edit, ("idp+edit",)))
    missing = [name for name, part, needs in parts if score in needs and part is None]
    if missing:
        raise ValueError(f"verifier score {score!r} needs the {' and '.join(missing)} part")
    if score == "idp":
        return idp
    if score == "fdp":
        return fdp
    if score == "idp+edit":
        return idp - verifier.edit_weight * edit
    return idp + verifier.fdp_weight * fdp


def verification_scores(verifier: Verifier | VerifierScore, fdp: UnifiedModel | None, idp: UnifiedModel | None,
                        before: np.ndarray, candidates: torch.Tensor, actions: list[str]) -> torch.Tensor:
    """[B, N] scores of `candidates` [B, N, L] (codes) for each (before, action); a score name stands for
    `Verifier(score=name)`; the model a score does not use may be None."""
    verifier = verifier if isinstance(verifier, Verifier) else Verifier(score=verifier)
    score, parts = verifier.score, {}
    for name, model, needs in (("IDP", idp, NEEDS_IDP), ("FDP", fdp, NEEDS_FDP)):
        if score in needs and model is None:
            raise ValueError(f"verifier score {score!r} needs the {name}")
    if score in NEEDS_IDP:
        parts["idp"] = idp_score(idp, before, candidates, actions, fdp)
    if score in NEEDS_FDP:
        parts["fdp"] = fdp_score(fdp, before, candidates, actions)
    if score == "idp+edit":
        parts["edit"] = edit_fraction((fdp or idp).tokenizer, before, candidates)
    return combine(verifier, **parts)
