"""Back-translation: pairs the FDP generates for prompted actions on unlabelled before-frames, kept when the IDP's
score of the prompt accepts them (the iterated bootstrapping rounds of `dynboot bootstrap`, jobs/bootstrap.py).

    settings = BackTranslation(frames=400, candidates=4, precision=0.95)
    prompts = prompt_actions(spec, befores, rng)                     # one valid action per before-frame (or None)
    gen = generate(fdp, idp, befores, prompts, settings)             # best-of-N per prompt: image, IDP score
    cal = calibrate_threshold(scores, correct, settings.precision)   # the threshold, chosen on a labelled split

The label of a generated pair is known because it was the prompt; what is not known is whether the FDP did it.
The IDP checks: its mean per-token log-prob of the prompted action given (before, generated after), the
paper's verifier score (dynboot.method.verify) and the same scale as the relabel filter's `min_score`. Among N samples
the best-scoring one is the candidate (dynboot.method.predict ranks them); it is kept when its score reaches the
threshold.

How the threshold is chosen: on a labelled held-out split (the bootstrap's validation pairs, never the test
pairs), the same FDP generates for the split's own (before, action) and the IDP scores the result; a generated
after is right when its parsed scene equals the true after. The threshold is the lowest score at which the kept
pairs are at least `precision` right (the most pairs at that precision); when no cut reaches it, nothing is kept.

On the embedded world the prompts come from the world's own action sampler on the before-frame's parsed scene:
the world's parser stands for "knowing which actions are possible here" (a real deployment would draw prompts from
the gold actions' distribution or an LLM). The parser is also how the generated pairs are scored against the
truth for the report (`world_correct`); that score never decides what is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pydantic import Field

from dynboot.config import Config
from dynboot.eval.metrics import group_choices
from dynboot.models.base import UnifiedModel
from dynboot.method.predict import Item, PredictSettings, predict
from dynboot.world.actions import ActionError, apply_action, parse_action, random_action
from dynboot.world.render import parse
from dynboot.world.scene import WorldSpec
from dynboot.eval.world_eval import spec_frame

__all__ = ["BackTranslation", "Generated", "prompt_actions", "generate", "calibrate_threshold", "world_correct"]


class BackTranslation(Config):
    """How a round generates and verifies back-translated pairs."""

    frames: int = Field(400, ge=0, description="Unlabelled before-frames prompted per round (0 = no back-translation).")
    candidates: int = Field(4, ge=1, description="FDP samples per prompt; the IDP's best one is the candidate.")
    temperature: float = Field(1.0, ge=0, description="FDP sampling temperature.")
    precision: float = Field(0.95, gt=0, le=1, description="Threshold calibration: the lowest IDP score at which the "
                             "kept pairs of the labelled validation split are at least this fraction right.")
    threshold: float | None = Field(None, description="A fixed IDP-score threshold instead of the calibrated one "
                                    "(None = calibrate on the validation split; the calibration is still reported).")


@dataclass
class Generated:
    """The chosen candidate of one prompt."""

    image: np.ndarray | None  # [H, W, 3] uint8, None when the prediction failed
    score: float  # the IDP's mean per-token log-prob of the prompt (NaN on error)
    candidate: int  # which of the N samples
    error: str = ""


def prompt_actions(spec: WorldSpec, befores: Sequence[np.ndarray], rng: np.random.Generator) -> list[str | None]:
    """One action per before-frame, drawn by the world's sampler (uniform type, then uniform valid action) on the
    frame's parsed scene; None where the scene admits no action."""
    scenes = parse(spec, np.stack([spec_frame(spec, b) for b in befores])) if len(befores) else []
    out = []
    for scene in scenes:
        action = random_action(spec, scene, rng)
        out.append(None if action is None else action.text(spec))
    return out


def generate(fdp: UnifiedModel, idp: UnifiedModel, befores: Sequence[np.ndarray], actions: Sequence[str],
             settings: BackTranslation, seed: int = 0) -> list[Generated]:
    """For each (before, action): `settings.candidates` FDP samples, ranked by the IDP score of the action; the
    best one decoded. Item i samples with seed + i (dynboot.method.predict), so a rerun generates the same pairs."""
    items = [Item(i, b, a) for i, (b, a) in enumerate(zip(befores, actions))]
    s = PredictSettings(n=settings.candidates, temperature=settings.temperature, seed=seed, greedy=False,
                        captions=False, decode=True)
    out = []
    for p in predict(fdp, idp, items, s):
        if p.error:
            out.append(Generated(None, float("nan"), -1, p.error))
            continue
        best = int(group_choices(p.scores[None], len(p.scores))[0, 0])
        out.append(Generated(p.candidate_images[best], float(p.scores[best]), best))
    return out


def world_correct(spec: WorldSpec, befores: Sequence[np.ndarray], actions: Sequence[str],
                  afters: Sequence[np.ndarray]) -> np.ndarray:
    """[B] bool: the after's parsed scene is the before's parsed scene with the action applied (exact)."""
    if not len(befores):
        return np.zeros(0, dtype=bool)
    b = parse(spec, np.stack([spec_frame(spec, x) for x in befores]))
    a = parse(spec, np.stack([spec_frame(spec, x) for x in afters]))
    out = np.zeros(len(b), dtype=bool)
    for i, (scene, action, got) in enumerate(zip(b, actions, a)):
        try:
            out[i] = np.array_equal(apply_action(spec, scene, parse_action(spec, action)), got)
        except ActionError:
            out[i] = False
    return out


def calibrate_threshold(scores: Sequence[float], correct: Sequence[bool], precision: float) -> dict:
    """The lowest score t such that the pairs scoring >= t are at least `precision` right (keeping the most pairs
    at that precision); +inf when no cut reaches it. Returns the threshold and what it keeps on these pairs."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    ok = ~np.isnan(s)
    s, c = s[ok], c[ok]
    out = {"pairs": int(len(s)), "right": int(c.sum()), "precision_target": precision}
    order = np.argsort(-s, kind="stable")
    hits = np.cumsum(c[order])
    prec = hits / np.arange(1, len(s) + 1)
    # a cut may only fall between distinct scores: pairs with equal scores are kept or dropped together
    last_of_tie = np.r_[s[order][1:] != s[order][:-1], True] if len(s) else np.zeros(0, dtype=bool)
    good = np.flatnonzero((prec >= precision) & last_of_tie)
    if not len(good):
        return out | {"threshold": float("inf"), "kept": 0, "kept_precision": None, "recall": 0.0}
    k = int(good[-1])
    return out | {"threshold": float(s[order][k]), "kept": k + 1, "kept_precision": round(float(prec[k]), 4),
                  "recall": round(float(hits[k] / max(c.sum(), 1)), 4)}
