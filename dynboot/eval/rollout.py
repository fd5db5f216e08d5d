"""Multi-step rollouts: roll the world model (FDP) forward from a start image through a sequence of actions, each
step's chosen prediction fed back as the next step's "before", best-of-N per step.

    cases = world_cases(spec, episodes=50, steps=4, seed=0)       # held-out episodes of the embedded world
    rolls = rollout(fdp, idp, cases, PredictSettings(n=8, seed=0))  # one Rollout per case
    rollout_world_scores(spec, cases, rolls)                       # exact match at step 1..k

Every step goes through the one prediction core (`dynboot.method.predict`: sampling, verifier scores from
`dynboot.method.verify`) and the one choice rule (`dynboot.method.best_of_n.top_n`: highest score, ties to the lowest index); N=1
is the rollout without verification. Step t of case i samples with `step_seed(seed, t, i)`, so a case's rollout does
not depend on the other cases (the serve endpoint rolls one case with index 0 and gets the same candidates).
A case whose step fails keeps the steps done before it and carries the error; the other cases go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dynboot.method.best_of_n import top_n
from dynboot.models.base import UnifiedModel
from dynboot.data.pairs import load_examples
from dynboot.method.predict import Item, PredictSettings, predict
from dynboot.world.actions import ActionError, apply_action, parse_action
from dynboot.world.episodes import make_episode, pair_key
from dynboot.world.render import parse, render
from dynboot.world.scene import WorldSpec
from dynboot.eval.world_eval import spec_frame

__all__ = ["RolloutCase", "Rollout", "step_seed", "rollout", "world_cases", "training_transitions", "rollout_world_scores", "exact_by_step", "SEED_STRIDE"]

# Seeds of consecutive steps are this far apart, so (step, case) pairs never share a seed below a million cases.
SEED_STRIDE = 1_000_003


@dataclass
class RolloutCase:
    """A start image, the actions to apply in order, and (world cases) the true scene after each action."""

    index: int
    start: np.ndarray  # [H, W, 3] uint8, any size
    actions: list[str]
    truth: list[np.ndarray] | None = None  # [steps] scenes (world cells) after each action


@dataclass
class Rollout:
    index: int
    images: list[np.ndarray] = field(default_factory=list)  # the chosen prediction of each step done, [H, W, 3]
    chosen: list[int] = field(default_factory=list)  # which candidate each step kept
    scores: list[list[float]] = field(default_factory=list)  # every candidate's verifier score, per step
    error: str = ""  # set when a step failed: the steps before it are kept

    @property
    def steps(self) -> int:
        return len(self.images)


def step_seed(seed: int, step: int, index: int = 0) -> int:
    """The sampling seed of step `step` (0-based) of case `index`: `dynboot.method.predict` adds the item index itself."""
    return seed + step * SEED_STRIDE + index


def rollout(fdp: UnifiedModel, idp: UnifiedModel | None, cases: Sequence[RolloutCase],
            settings: PredictSettings | None = None) -> list[Rollout]:
    """Roll every case forward through its actions; `settings.n` candidates per step ranked by `settings.verifier`
    (N=1: one candidate, nothing to choose; without the verifier's model: the first sample, unscored)."""
    s = settings or PredictSettings()
    if s.n < 1:
        raise ValueError(f"a rollout samples at least one candidate per step, got n={s.n}")
    if len({c.index for c in cases}) != len(cases):
        raise ValueError("rollout cases need distinct indices (an index seeds its samples)")
    per_step = s.model_copy(update={"greedy": False, "captions": False, "decode": True})
    out = {c.index: Rollout(c.index) for c in cases}
    current = {c.index: np.asarray(c.start) for c in cases}
    for t in range(max((len(c.actions) for c in cases), default=0)):
        live = [c for c in cases if t < len(c.actions) and not out[c.index].error]
        if not live:
            break
        items = [Item(c.index, current[c.index], c.actions[t]) for c in live]
        for p in predict(fdp, idp, items, per_step.model_copy(update={"seed": step_seed(s.seed, t)})):
            r = out[p.index]
            if p.error:
                r.error = f"step {t + 1}: {p.error}"
                continue
            scores = torch.as_tensor(np.nan_to_num(p.scores, nan=0.0))  # unverified: NaN scores, the first sample
            best = int(top_n(scores, 1)[0])
            r.images.append(p.candidate_images[best])
            r.chosen.append(best)
            r.scores.append([float(x) for x in p.scores])
            current[p.index] = p.candidate_images[best]
    return [out[c.index] for c in cases]


def world_cases(spec: WorldSpec, episodes: int, steps: int, seed: int = 0,
                avoid: set[bytes] | None = None) -> list[RolloutCase]:
    """Held-out episodes of the embedded world (`dynboot.world.episodes`, their own seeded stream): the first
    key frame as the start image, the episode's actions, its later key states as the truth. `avoid`: transitions
    (`pair_key`) no episode may contain, e.g. every pair the models trained on."""
    cases = []
    for i in range(episodes):
        ep = make_episode(spec, np.random.default_rng([seed, 19, i]), steps, hold=1, transition=1, avoid=avoid)
        cases.append(RolloutCase(i, render(spec, ep.scenes[0]), [a.text(spec) for a in ep.actions],
                                 [np.asarray(s) for s in ep.scenes[1:]]))
    return cases


def training_transitions(spec: WorldSpec, world_dir: str | Path) -> set[bytes]:
    """`pair_key`s of every transition a `dynboot world` directory holds (gold and test pairs, the videos'
    episodes), so that rollout episodes can avoid all of them."""
    root, keys = Path(world_dir), set()
    for split in ("gold/train.json", "test/test.json"):
        if (root / split).is_file():
            examples = load_examples(root / split)
            if examples:
                before = parse(spec, np.stack([spec_frame(spec, e.before) for e in examples]))
                after = parse(spec, np.stack([spec_frame(spec, e.after) for e in examples]))
                keys.update(pair_key(a, b) for a, b in zip(before, after))
    truth = root / "videos_truth.jsonl"
    if truth.is_file():
        for line in filter(str.strip, truth.read_text().splitlines()):
            scenes = [np.asarray(s, dtype=np.int64) for s in json.loads(line)["scenes"]]
            keys.update(pair_key(a, b) for a, b in zip(scenes, scenes[1:]))
    return keys


def rollout_world_scores(spec: WorldSpec, cases: Sequence[RolloutCase], rolls: Sequence[Rollout]) -> dict:
    """Per step 1..k, over the cases that have that step (a step a case did not reach counts as wrong):
    - "exact": the step's predicted scene equals the true one (both read by the world's exact parser);
    - "exact_so_far": every step up to it exact;
    - "followed": the step applied its action exactly to the model's own previous prediction, over the steps whose
      action is still possible there (an error before it compounds into "exact", not into this);
    "per_case" / "per_case_followed": the 0/1 (followed: None where the action is impossible) per case and step."""
    by_index = {r.index: r for r in rolls}
    per_case, followed = [], []
    for c in cases:
        if c.truth is None:
            raise ValueError(f"case {c.index} has no true scenes to score against")
        r = by_index[c.index]
        hits, kept = [0] * len(c.actions), [0] * len(c.actions)
        pred = parse(spec, np.stack([spec_frame(spec, im) for im in r.images])) if r.images else []
        previous = parse(spec, spec_frame(spec, np.asarray(c.start))[None])[0]
        for t, (p, truth) in enumerate(zip(pred, c.truth)):
            hits[t] = int((p == np.asarray(truth)).all())
            try:
                kept[t] = int((apply_action(spec, previous, parse_action(spec, c.actions[t])) == p).all())
            except ActionError:  # the model's own state makes the action impossible: not a step it could follow
                kept[t] = None
            previous = p
        per_case.append(hits)
        followed.append(kept)
    return {"cases": len(cases), "errors": sum(1 for r in rolls if r.error),
            "steps": max((len(c.actions) for c in cases), default=0),
            "by_step": exact_by_step(per_case, followed), "per_case": per_case, "per_case_followed": followed}


def exact_by_step(per_case: Sequence[Sequence[int]], followed: Sequence[Sequence[int | None]] | None = None) -> dict:
    """{"1": {"n", "exact", "exact_so_far"[, "followed", "n_followed"]}, ...} from 0/1 hits per case and step (cases
    may have fewer steps); `followed` (0/1/None per case and step) adds the followed rate over its non-None steps."""
    k = max((len(h) for h in per_case), default=0)
    out = {}
    for t in range(k):
        rows = [h for h in per_case if t < len(h)]
        out[str(t + 1)] = {"n": len(rows), "exact": float(np.mean([bool(h[t]) for h in rows])),
                           "exact_so_far": float(np.mean([all(h[: t + 1]) for h in rows]))}
        if followed is not None:
            possible = [f[t] for f in followed if t < len(f) and f[t] is not None]
            out[str(t + 1)] |= {"followed": float(np.mean(possible)) if possible else float("nan"),
                                "n_followed": len(possible)}
    return out
