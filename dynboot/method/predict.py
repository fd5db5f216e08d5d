"""The one prediction core of every evaluation: `dynboot eval`, the train-time evaluator, the quickstart and the
benchmarks all call `predict`, so the same models, items and seed give the same numbers whichever path runs.

    preds = predict(fdp, idp, items, PredictSettings(n=8, seed=0))
    preds[i].candidates   # [M, L] codes, sampled with seed + item.index (independent of batching and actors)
    preds[i].scores       # [M] verifier scores of those candidates (NaN without a verifier)
    preds[i].greedy       # [L] the temperature-0 sample;  preds[i].caption: the IDP's caption of (before, after)

Decisions made here and nowhere else:
- seeding: item i's candidates are `fdp.sample(before_i, [action_i], n=M, seed=seed + index_i)`, one call per
  item, so results do not depend on how items are batched or spread over actors;
- how candidates are ranked: `settings.verifier` (dynboot.method.verify: the paper's IDP score by default; the IDP reads
  the candidates' codes when it shares the FDP's image tokenizer, else their decoded images);
- the greedy sample and the captions are computed per item too (left padding in a batch could flip a tie).
A failing item becomes a `Prediction` with `error` set; the others are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Sequence

import numpy as np
import torch
from pydantic import AfterValidator, Field

from dynboot.config import Config
from dynboot.models.base import UnifiedModel
from dynboot.method.verify import Verifier, verification_scores

__all__ = ["BestOfNs", "Item", "Prediction", "PredictSettings", "predict"]


def _best_of_ns(v: list[int]) -> list[int]:
    if not v or min(v) < 1:
        raise ValueError("n must be a non-empty list of values >= 1")
    return sorted(set(v))


# The N values a config evaluates best-of-N at: non-empty, each >= 1, sorted, without repeats.
BestOfNs = Annotated[list[int], AfterValidator(_best_of_ns)]


class PredictSettings(Config):
    """How candidates are sampled and scored (shared by every evaluation path)."""

    n: int = Field(8, ge=0, description="Candidates sampled per item (the largest best-of-N evaluated; 0 = none, "
                   "e.g. greedy only).")
    temperature: float = Field(1.0, ge=0, description="FDP sampling temperature (the paper: 1).")
    top_k: int = Field(0, ge=0, description="FDP top-k (0 = off).")
    seed: int = Field(0, description="Item i samples with seed + its index.")
    greedy: bool = Field(True, description="Also one greedy (temperature 0) FDP sample per item.")
    captions: bool = Field(True, description="IDP captions of (before, after) for items that have an after image.")
    verifier: Verifier = Field(default_factory=Verifier, description="How candidates are ranked (dynboot.method.verify).")
    decode: bool = Field(False, description="Also decode the candidates and the greedy sample to images (for a judge, "
                         "a report, or a caller without the FDP's tokenizer).")


@dataclass
class Item:
    """One evaluation item: a before image, the action, and the target after image when there is one."""

    index: int
    before: np.ndarray  # [H, W, 3] uint8, any size (the models apply their own image policy)
    action: str
    after: np.ndarray | None = None


@dataclass
class Prediction:
    index: int
    candidates: np.ndarray | None = None  # [M, L] int64 codes
    scores: np.ndarray | None = None  # [M] float64
    greedy: np.ndarray | None = None  # [L] int64 codes
    caption: str | None = None
    error: str = ""
    candidate_images: np.ndarray | None = None  # [M, H, W, 3] uint8 when decoded
    greedy_image: np.ndarray | None = None  # [H, W, 3] uint8 when decoded
    correct: np.ndarray | None = None  # [M] bool, set by a scorer that knows the truth (world_scores)


def _one(fdp: UnifiedModel | None, idp: UnifiedModel | None, item: Item, s: PredictSettings) -> Prediction:
    out = Prediction(item.index)
    before = np.asarray(item.before)[None]
    if fdp is not None:
        ranks = idp is not None or s.verifier.score == "fdp"
        m = s.n if ranks else min(s.n, 1)  # without a verifier there is nothing to choose with
        if m:
            cand = fdp.sample(before, [item.action], n=m, temperature=s.temperature, top_k=s.top_k,
                              seed=s.seed + int(item.index))
            out.candidates = cand[0].cpu().numpy().astype(np.int64)
            out.scores = (verification_scores(s.verifier, fdp, idp, before, cand, [item.action])[0].double().numpy()
                          if ranks else np.full(m, np.nan))
        if s.greedy:
            out.greedy = fdp.sample(before, [item.action], n=1, temperature=0.0)[0, 0].cpu().numpy().astype(np.int64)
        if s.decode:
            codes = [c for c in (out.candidates, None if out.greedy is None else out.greedy[None]) if c is not None]
            images = fdp.tokenizer.decode(torch.as_tensor(np.concatenate(codes))) if codes else None
            if out.candidates is not None:
                out.candidate_images = images[: len(out.candidates)]
            if out.greedy is not None:
                out.greedy_image = images[-1]
    if idp is not None and s.captions and item.after is not None:
        out.caption = idp.caption(before, np.asarray(item.after)[None])[0]
    return out


def predict(fdp: UnifiedModel | None, idp: UnifiedModel | None, items: Sequence[Item],
            settings: PredictSettings | None = None) -> list[Prediction]:
    """Predictions for `items` in their order; an item that fails carries its error, the rest go on."""
    s = settings or PredictSettings()
    out = []
    with torch.inference_mode():
        for item in items:
            try:
                out.append(_one(fdp, idp, item, s))
            except Exception as err:  # noqa: BLE001 - one bad item (odd image, model error) is that item's
                out.append(Prediction(item.index, error=f"{type(err).__name__}: {err}"[:500]))
    return out
