"""Significance of a gap between two scores: the two-standard-error verdict every report shares.

    verdict(a, b, n)                       binomial: a and b are rates over n independent examples each
    verdict(a, b, n, (per_a, per_b))       paired: the two models' 0/1 scores on the same examples
    paired_comparison(per_a, per_b)        the numbers behind a paired verdict (discordant counts, gap, SE)

The paired standard error is that of the mean per-example difference: examples both models get right or
both get wrong add no noise, so two models compared on the same test pairs need a much smaller gap than an
unpaired test would.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["verdict", "paired_comparison", "binomial_se"]


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def paired_comparison(per_a: Sequence[float], per_b: Sequence[float]) -> dict:
    """Gap mean(a) - mean(b) of two per-example score lists over the same examples, its paired standard
    error, and (0/1 scores) how many examples only a / only b gets right."""
    a, b = np.asarray(per_a, dtype=float), np.asarray(per_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two equal-length lists, got shapes {list(a.shape)} and {list(b.shape)}")
    d = a - b
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("inf")
    return {"n": int(len(d)), "a": float(a.mean()), "b": float(b.mean()), "gap": float(d.mean()), "se": se,
            "only_a": int((d > 0).sum()), "only_b": int((d < 0).sum()),
            "z": float(d.mean() / se) if se > 0 else (0.0 if d.mean() == 0 else math.copysign(math.inf, d.mean()))}


def verdict(a: float, b: float, n: int, paired: tuple[Sequence, Sequence] | None = None) -> str:
    """'yes' when a beats b by more than two standard errors, 'no (reversed)' when it is worse by as much,
    else 'within noise'. `paired`: the two models' scores on the same examples (the paired test)."""
    gap = a - b
    if paired is not None:
        se = paired_comparison(*paired)["se"]
    else:
        se = math.sqrt(binomial_se(a, n) ** 2 + binomial_se(b, n) ** 2)
    return "yes" if gap > 2 * se else ("no (reversed)" if gap < -2 * se else "within noise")
