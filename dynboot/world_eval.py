"""Run models over embedded-world pairs and score them exactly (library code shared by the trainer's
periodic evals, the benchmarks, the evaluation job and the quickstart).

    idp_eval(idp, examples, spec)                    captions -> exact / structured match
    fdp_eval(fdp, examples, spec)                    greedy samples -> exact / changed-cell / copy rate
    best_of_n_eval(fdp, idp, examples, spec, ns)     M = max(ns) samples scored once; N curve over disjoint groups
"""

from __future__ import annotations

import numpy as np
import torch

from dynboot.best_of_n import score_candidates
from dynboot.metrics import best_of_n_world, fdp_world_metrics, idp_world_metrics
from dynboot.models.base import Example, UnifiedModel
from dynboot.world.actions import parse_action
from dynboot.world.render import parse
from dynboot.world.scene import WorldSpec


def _stack(examples: list[Example]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return np.stack([e.before for e in examples]), np.stack([e.after for e in examples]), [e.action for e in examples]


def captions(idp: UnifiedModel, before: np.ndarray, after: np.ndarray, batch_size: int = 128) -> list[str]:
    out: list[str] = []
    for i in range(0, len(before), batch_size):
        out += idp.caption(before[i: i + batch_size], after[i: i + batch_size])
    return out


def idp_eval(idp: UnifiedModel, examples: list[Example], spec: WorldSpec, batch_size: int = 128) -> dict:
    before, after, actions = _stack(examples)
    return idp_world_metrics(spec, captions(idp, before, after, batch_size), actions)


def _types(spec: WorldSpec, actions: list[str]) -> list[str]:
    return [parse_action(spec, a).type for a in actions]


def _scenes(fdp: UnifiedModel, spec: WorldSpec, codes: torch.Tensor) -> np.ndarray:
    """Predicted codes -> world scenes, through the model's own decoder and the exact parser."""
    return parse(spec, fdp.tokenizer.decode(codes))


def fdp_eval(fdp: UnifiedModel, examples: list[Example], spec: WorldSpec, batch_size: int = 128,
             per_pair: bool = False) -> dict:
    """Greedy (temperature 0) FDP predictions, scored on the parsed scenes.

    per_pair: also return "exact_per_pair" (0/1 per example), for paired comparisons of two models on the
    same examples.
    """
    before, after, actions = _stack(examples)
    pred = torch.cat([fdp.sample(before[i: i + batch_size], actions[i: i + batch_size], n=1, temperature=0)[:, 0]
                      for i in range(0, len(before), batch_size)])
    scenes, target = _scenes(fdp, spec, pred), parse(spec, after)
    out = fdp_world_metrics(scenes, parse(spec, before), target, _types(spec, actions))
    if per_pair:
        out["exact_per_pair"] = (np.asarray(scenes) == np.asarray(target)).all(-1).astype(int).tolist()
    return out


def best_of_n_eval(fdp: UnifiedModel, idp: UnifiedModel, examples: list[Example], spec: WorldSpec,
                   ns: tuple[int, ...] = (1, 2, 4, 8), temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                   batch_size: int = 64) -> dict:
    """Best-of-N world metrics for every N in `ns` from one set of max(ns) samples per pair."""
    before, after, actions = _stack(examples)
    m = max(ns)
    cands, scores = [], []
    for i in range(0, len(before), batch_size):
        b, acts = before[i: i + batch_size], actions[i: i + batch_size]
        c = fdp.sample(b, acts, n=m, temperature=temperature, top_k=top_k, seed=seed + i)
        cands.append(c)
        scores.append(score_candidates(idp, b, c, acts))
    cands = torch.cat(cands)
    scenes = _scenes(fdp, spec, cands.reshape(-1, cands.shape[-1])).reshape(len(cands), m, -1)
    return best_of_n_world(scenes, torch.cat(scores).numpy(), parse(spec, before),
                           parse(spec, after), _types(spec, actions), ns)
