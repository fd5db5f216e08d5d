"""Exact metrics on the embedded world, and the best-of-N bookkeeping every evaluation shares.

FDP (scenes are flat int arrays [B, L], one code per cell, as `dynboot.world.parse` returns them):
- exact: the predicted scene equals the target scene;
- changed_cell_acc: over all cells where before != target (pooled over samples), the fraction the
  prediction gets right: the part of the edit that copying the input can never score;
- copy_rate: the prediction equals the before scene (the failure mode plain CE pushes towards).
IDP (captions against gold actions):
- exact: caption equals the gold text (lower-cased, whitespace collapsed);
- structured: the parsed caption's fields (`Action.fields`) all equal the gold's;
- field_acc: mean fraction of the gold's defined fields (type, obj, direction, ref, other) matched;
- parse_rate; an unparsable caption scores 0 everywhere and never raises.
Both give a per-action-type breakdown under "by_type".

Best-of-N over disjoint groups (`group_choices`): sample max(N) candidates once and score them once;
the N curve then uses the floor(max(N)/N) disjoint groups of N consecutive candidates, so every N reuses
the same samples (cheap, and the curve's points differ only by selection, not by sampling noise).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from dynboot.eval.textmetrics import normalise
from dynboot.world.actions import ActionError, parse_action
from dynboot.world.scene import WorldSpec

__all__ = ["fdp_world_metrics", "idp_world_metrics", "group_choices", "best_of_n_world", "best_of_n_judged", "mean_by",
           "FIELDS"]

FIELDS = ("type", "obj", "direction", "ref", "other")


def _scenes(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.int64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected scenes [B, L], got shape {list(a.shape)}")
    return a


def _fdp_block(pred: np.ndarray, before: np.ndarray, target: np.ndarray) -> dict[str, float]:
    changed = before != target
    n_changed = int(changed.sum())
    return {
        "n": int(len(pred)),
        "exact": float((pred == target).all(1).mean()) if len(pred) else 0.0,
        "changed_cell_acc": float(((pred == target) & changed).sum() / n_changed) if n_changed else 0.0,
        "copy_rate": float((pred == before).all(1).mean()) if len(pred) else 0.0,
        "changed_cells": n_changed,
    }


def fdp_world_metrics(pred, before, target, types: Sequence[str] | None = None) -> dict:
    """Exact / changed-cell / copy metrics of predicted scenes, overall and per action type."""
    pred, before, target = _scenes(pred, "pred"), _scenes(before, "before"), _scenes(target, "target")
    if not (pred.shape == before.shape == target.shape):
        raise ValueError(f"shapes differ: pred {list(pred.shape)}, before {list(before.shape)}, target {list(target.shape)}")
    out = _fdp_block(pred, before, target)
    if types is not None:
        if len(types) != len(pred):
            raise ValueError(f"{len(types)} action types for {len(pred)} predictions")
        t = np.asarray(types)
        out["by_type"] = {k: _fdp_block(pred[t == k], before[t == k], target[t == k]) for k in sorted(set(types))}
    return out


def _fields(spec: WorldSpec, text: str) -> dict[str, str | None] | None:
    try:
        return parse_action(spec, text).fields(spec)
    except ActionError:
        return None


def _idp_block(rows: list[tuple[bool, dict | None, dict]]) -> dict[str, float]:
    n = len(rows)
    if not n:
        return {"n": 0, "exact": 0.0, "structured": 0.0, "field_acc": 0.0, "parse_rate": 0.0}
    field_scores, per_field = [], defaultdict(list)
    for _, pred, gold in rows:
        defined = [f for f in FIELDS if gold[f] is not None]
        hits = {f: pred is not None and pred[f] == gold[f] for f in defined}
        field_scores.append(sum(hits.values()) / len(defined))
        for f, hit in hits.items():
            per_field[f].append(hit)
    out = {
        "n": n,
        "exact": sum(r[0] for r in rows) / n,
        "structured": sum(pred == gold for _, pred, gold in rows) / n,
        "field_acc": float(np.mean(field_scores)),
        "parse_rate": sum(pred is not None for _, pred, _ in rows) / n,
    }
    out.update({f"{f}_acc": float(np.mean(per_field[f])) for f in FIELDS if per_field[f]})
    return out


def idp_world_metrics(spec: WorldSpec, captions: Sequence[str], gold: Sequence[str]) -> dict:
    """Exact and structured match of IDP captions against gold action texts, overall and per type.

    A gold text that is not an action of `spec` is a data error and raises ValueError naming it.
    """
    if len(captions) != len(gold):
        raise ValueError(f"{len(captions)} captions but {len(gold)} gold actions")
    rows, types = [], []
    for i, (cap, ref) in enumerate(zip(captions, gold)):
        g = _fields(spec, ref)
        if g is None:
            raise ValueError(f"gold action {i} ({ref!r}) is not an action of this world")
        cap = cap if isinstance(cap, str) else ""
        rows.append((normalise(cap) == normalise(ref), _fields(spec, cap), g))
        types.append(g["type"])
    out = _idp_block(rows)
    out["by_type"] = {t: _idp_block([r for r, k in zip(rows, types) if k == t]) for t in sorted(set(types))}
    return out


def group_choices(scores, n: int) -> np.ndarray:
    """[B, max_n] verifier scores -> [B, G] index of the best candidate in each of the G = max_n // n
    disjoint groups of `n` consecutive candidates (ties go to the lowest index, as `pick_best`)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [B, N], got shape {list(s.shape)}")
    if not 1 <= n <= s.shape[1]:
        raise ValueError(f"n={n} needs 1 <= n <= {s.shape[1]} sampled candidates")
    g = s.shape[1] // n
    grouped = s[:, : g * n].reshape(len(s), g, n)
    # NaN scores (a failed verifier call) never win over a real score
    grouped = np.where(np.isnan(grouped), -np.inf, grouped)
    return grouped.argmax(-1) + np.arange(g)[None] * n


def best_of_n_world(cand, scores, before, target, types: Sequence[str], ns: Sequence[int]) -> dict:
    """World FDP metrics of verifier-chosen candidates for each N (disjoint groups, see module doc).

    cand [B, M, L] candidate scenes, scores [B, M] verifier scores, before/target [B, L].
    Per N: the `fdp_world_metrics` of the chosen candidates over the B x G (item, group) pairs, plus
    "oracle" (fraction of groups holding an exact candidate) and "groups" (G). "oracle_all": any of the M.
    """
    cand = np.asarray(cand, dtype=np.int64)
    before, target = _scenes(before, "before"), _scenes(target, "target")
    B, M, _ = cand.shape
    correct = (cand == target[:, None]).all(-1)  # [B, M]
    out: dict = {"by_n": {}, "candidates": M, "oracle_all": float(correct.any(1).mean()) if B else 0.0}
    for n in ns:
        ch = group_choices(scores, n)  # [B, G]
        G = ch.shape[1]
        pred = cand[np.arange(B)[:, None], ch].reshape(B * G, -1)
        m = fdp_world_metrics(pred, np.repeat(before, G, 0), np.repeat(target, G, 0), [t for t in types for _ in range(G)])
        m["groups"] = G
        m["oracle"] = float(correct[:, : G * n].reshape(B, G, n).any(-1).mean()) if B else 0.0
        out["by_n"][str(n)] = m
    return out


def best_of_n_judged(judged, scores, tasks: Sequence[str], ns: Sequence[int]) -> dict:
    """Mean judge value of verifier-chosen candidates for each N, per task and overall.

    judged [B, M]: a judge value per candidate (NaN where not judged or the call failed); scores [B, M].
    An item's value for N is the mean over its G groups' chosen candidates (NaN ones left out); "oracle"
    is the best judged candidate of each item (only meaningful when every candidate was judged).
    """
    judged = np.asarray(judged, dtype=np.float64)
    out: dict = {"by_n": {}}
    for n in ns:
        ch = group_choices(scores, n)
        vals = judged[np.arange(len(judged))[:, None], ch]  # [B, G]
        per_item = [float(np.nanmean(v)) if np.isfinite(v).any() else None for v in vals]
        out["by_n"][str(n)] = mean_by(per_item, tasks)
    best = [float(np.nanmax(v)) if np.isfinite(v).any() else None for v in judged]
    out["oracle"] = mean_by(best, tasks)
    return out


def mean_by(values: Iterable[float | None], keys: Iterable[str]) -> dict[str, dict[str, float]]:
    """{key: {"mean", "n", "missing"}} plus "overall": the mean of the key means (as the paper's Aurora-Bench
    "Avg" column) and "pooled", the mean over every item. None/NaN values (failed items) are left out and
    counted under "missing"."""
    groups: dict[str, list[float]] = defaultdict(list)
    missing: dict[str, int] = defaultdict(int)
    for v, k in zip(values, keys):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            missing[k] += 1
        else:
            groups[k].append(float(v))
    out = {}
    for k in sorted(set(groups) | set(missing)):
        vals = groups.get(k, [])
        out[k] = {"mean": float(np.mean(vals)) if vals else float("nan"), "n": len(vals), "missing": missing.get(k, 0)}
    every = [v for vals in groups.values() for v in vals]
    means = [o["mean"] for o in out.values() if o["n"]]
    out["overall"] = {"mean": float(np.mean(means)) if means else float("nan"),
                      "pooled": float(np.mean(every)) if every else float("nan"),
                      "n": len(every), "missing": sum(missing.values())}
    return out
