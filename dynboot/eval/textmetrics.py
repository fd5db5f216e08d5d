"""Text metrics of IDP captions against gold instructions (paper Table 1 reports ROUGE-L and BLEU).

    text_metrics(["move the red circle up"], ["move the red circle left"])
    -> {"n": 1, "exact": 0.0, "bleu": 0.6687..., "rouge_l": 0.8}

- BLEU is sacrebleu's corpus BLEU (default 13a tokenisation, exponential smoothing), divided by 100 so
  every number here is on the paper's 0-1 scale;
- ROUGE-L is the mean sentence F-measure of Google's `rouge-score` (Porter stemming on);
- exact match compares lower-cased, whitespace-collapsed strings.
"""

from __future__ import annotations

from functools import lru_cache

import sacrebleu
from rouge_score import rouge_scorer

__all__ = ["normalise", "exact_match", "bleu", "rouge_l", "text_metrics"]


def normalise(text: str) -> str:
    return " ".join(str(text).lower().split())


def _check(hyps: list[str], refs: list[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")


def exact_match(hyps: list[str], refs: list[str]) -> float:
    """Fraction of hypotheses equal to their reference after `normalise` (0.0 for an empty list)."""
    _check(hyps, refs)
    return sum(normalise(h) == normalise(r) for h, r in zip(hyps, refs)) / len(hyps) if hyps else 0.0


def bleu(hyps: list[str], refs: list[str]) -> float:
    """Corpus BLEU in [0, 1] (sacrebleu score / 100)."""
    _check(hyps, refs)
    if not hyps:
        return 0.0
    return sacrebleu.corpus_bleu([str(h) for h in hyps], [[str(r) for r in refs]]).score / 100.0


@lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(hyps: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F-measure in [0, 1]."""
    _check(hyps, refs)
    if not hyps:
        return 0.0
    scorer = _rouge()
    # rouge-score's signature is score(target, prediction)
    return sum(scorer.score(str(r), str(h))["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)


def text_metrics(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """{"n", "exact", "bleu", "rouge_l"} of hypotheses against one reference each."""
    return {"n": len(hyps), "exact": exact_match(hyps, refs), "bleu": bleu(hyps, refs), "rouge_l": rouge_l(hyps, refs)}
