"""The training data mixture: sources with weights, and the plan that streams them (which rows, in which order,
on which rank), a pure function of the data index and the seed.

    data:                                   # TrainConfig.data (a plain path or a list of paths also works)
      - {path: /data/AURORA}                # an AURORA root: every data/<set>/train.json (never test.json)
      - {path: /data/AURORA/data/kubric/train.json, max_items: 10000}    # a set, capped (the paper: Kubric 10K)
      - {path: s3://bucket/relabel/shards, weight: 0.5}                  # Parquet pair files (dynboot.data.pairs)

Semantics (the same for the plain loop and every Ray Train rank):
- `weight` is a ratio: of every `window` consecutive samples, source s gives weight_s / sum(weights) (to the
  row), whatever the sources' sizes. A source cycles through epochs; each epoch visits its chunks (runs of up to
  ~64 rows: a Parquet row group or part of one, or 64 AURORA records) in a fresh seeded order.
- the plan is a sequence of windows: window j takes, from each source s, the next ~window * p_s rows of that
  source's stream (rows [floor(j*W*p_s), floor((j+1)*W*p_s)), closed form, no state) and permutes them (seeded):
  the window is the bounded shuffle buffer. Rank r of R reads windows r, r+R, r+2R, ...: every row of an epoch
  goes to one rank, every rank gets rows even when a source has fewer rows than there are ranks (they repeat).
- a position in the plan is (rank's window count t, rows of that window consumed): resuming reads window t and
  drops its first rows, without replaying anything before it.
- `max_items` caps a source to that many rows (a fixed, seed-independent choice: the same rows for the IDP and the
  FDP runs); `tag` (default empty = off) is a provenance word prepended to the FDP action, i.e. to the FDP prompt
  (DreamGen's `<DREAM>` idea): refused for IDP, where the action is the *target*, and it must be a word the
  backend's tokenizer knows.
- `classes` (AURORA sources) keeps only the records whose action class — the instruction's first word,
  lower-cased (`action_class`) — is one of them: one data set split into per-class sources.
- `class_balanced` builds such a split so that adding pseudo-labelled sources keeps every class at its share of
  the gold data: a relabelling IDP that is weak on one class (the world's `add`) yields few or no pseudo pairs of
  it, and a plain gold + pseudo mixture then dilutes that class; the balanced mixture draws its gold pairs more
  often instead (against a pseudo pair, every gold pair at least as often as in the plain mixture).
- world-data augmentation touches gold rows only (`gold_only`): it re-derives actions from the images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from dynboot.config import Config

__all__ = ["Source", "parse_sources", "MixturePlan", "Piece", "gold_only", "SourceFormat", "action_class",
           "class_balanced"]

SourceFormat = Literal["auto", "aurora", "parquet"]


class Source(Config):
    """One data source of the mixture."""

    path: str = Field(..., description="AURORA root / data/<set>/train.json / a world dir, or Parquet pair files "
                      "(a file, a directory or a URI prefix).")
    format: SourceFormat = Field("auto", description="auto: a .json, or a dir holding train.json, gold/train.json or "
                                 "data/<set>/train.json, is AURORA; else Parquet.")
    weight: float = Field(1.0, gt=0, description="Share of the samples drawn from this source (ratio, see module doc).")
    max_items: int | None = Field(None, ge=1, description="Use at most this many rows of the source (None = all).")
    tag: str = Field("", description="Provenance word prepended to the FDP prompt (empty = off).")
    classes: list[str] = Field([], description="AURORA sources: keep only the records whose action class (the "
                               "instruction's first word, lower-cased) is one of these (empty = all; see "
                               "`class_balanced`). Parquet pairs are selected by class with `dynboot filter`.")


def action_class(action: str) -> str:
    """An action's class: its first word, lower-cased ('' for an empty action)."""
    words = str(action).split()
    return words[0].lower() if words else ""


def class_balanced(gold: Source, gold_counts: dict[str, int], extra: list[tuple[Source, dict[str, int]]]) -> list[Source]:
    """`[gold] + extra sources` as a mixture in which every class of the gold data keeps its gold share of the
    draws: `gold` split into one source per class (`classes=[c]`), weighted so that gold class c's pairs plus the
    extra sources' class-c pairs make up gold_counts[c] / sum(gold_counts) of the gold classes' draws. The extra
    sources keep their weights; against their pairs, a gold pair is drawn at least as often as in `[gold] + extra`
    (the class the extra sources add most to keeps gold's weight per pair, the others are raised), so the extra
    sources' share of the draws shrinks. A class only the extra sources have stays as they give it. `*_counts`
    are rows per action class."""
    total = sum(gold_counts.values())
    if total <= 0:
        raise ValueError("class_balanced: the gold source has no rows")
    # what the extra sources draw of each class, in the units of the source weights
    given: dict[str, float] = {}
    for src, counts in extra:
        n = sum(counts.values())
        for c, k in counts.items():
            given[c] = given.get(c, 0.0) + (src.weight * k / n if n else 0.0)
    share = {c: k / total for c, k in gold_counts.items() if k > 0}
    scale = gold.weight + max(given.get(c, 0.0) / g for c, g in share.items())  # gold classes' weight in all
    split = [gold.model_copy(update={"classes": [c], "weight": g * scale - given.get(c, 0.0)})
             for c, g in sorted(share.items())]
    return split + [src for src, _ in extra]


def parse_sources(value: Any) -> list[Any]:
    """`"a"`, `["a", {"path": "b", "weight": 2}]` -> a list pydantic validates as `list[Source]`."""
    if isinstance(value, (str, Path, dict, Source)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("data must be a path or a non-empty list of paths / {path, weight, max_items, tag, format} mappings")
    return [{"path": str(v)} if isinstance(v, (str, Path)) else v for v in value]


@dataclass(frozen=True)
class Piece:
    """Rows [lo, hi) of chunk `chunk` of source `src` (row offsets inside the chunk)."""

    src: int
    chunk: int
    lo: int
    hi: int


class MixturePlan:
    """Windows of the mixture over sources of `chunk_rows[s]` rows per chunk (module doc)."""

    def __init__(self, chunk_rows: list[np.ndarray], weights: list[float], seed: int, window: int):
        if not chunk_rows or any(int(np.sum(c)) <= 0 for c in chunk_rows):
            raise ValueError("every source of a mixture plan needs at least one row")
        self.chunk_rows = [np.asarray(c, dtype=np.int64) for c in chunk_rows]
        self.sizes = [int(c.sum()) for c in self.chunk_rows]
        w = np.asarray(weights, dtype=float)
        self.p = w / w.sum()
        self.seed, self.window = int(seed), int(window)

    def offset(self, src: int, samples: int) -> int:
        """Rows of source `src` among the first `samples` samples of the mixture."""
        return int(np.floor(samples * self.p[src] + 1e-9))

    @functools.lru_cache(maxsize=8)
    def _epoch(self, src: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk order, cumulative row counts in that order) of one epoch of a source."""
        order = np.random.default_rng([self.seed, src, epoch]).permutation(len(self.chunk_rows[src]))
        return order, np.cumsum(self.chunk_rows[src][order])

    def stream_pieces(self, src: int, k0: int, k1: int) -> list[Piece]:
        """Rows [k0, k1) of source `src`'s endless stream, as pieces of chunks."""
        out, n = [], self.sizes[src]
        k = k0
        while k < k1:
            epoch, q = divmod(k, n)
            order, cum = self._epoch(src, epoch)
            i = int(np.searchsorted(cum, q, side="right"))
            start = int(cum[i] - self.chunk_rows[src][order[i]])
            take = min(k1 - k, int(cum[i]) - q)
            out.append(Piece(src, int(order[i]), q - start, q - start + take))
            k += take
        return out

    def window_pieces(self, j: int) -> list[Piece]:
        """Global window j: every source's rows for it, in source order (permute with `window_order`)."""
        W = self.window
        return [p for s in range(len(self.sizes)) for p in self.stream_pieces(s, self.offset(s, j * W), self.offset(s, (j + 1) * W))]

    def window_order(self, j: int, n: int) -> np.ndarray:
        """The seeded permutation of window j's n rows (the shuffle buffer)."""
        return np.random.default_rng([self.seed, 1 << 30, j]).permutation(n)

    @staticmethod
    def global_window(t: int, rank: int, world: int) -> int:
        """Rank `rank`'s t-th window."""
        return t * world + rank


def gold_only(augment):
    """Wrap an augmenter so it touches gold rows only: the world augmenter re-derives the action from the
    images, which on a pseudo-labelled pair would swap the IDP's label for the world's truth. A batch of
    gold rows goes through unchanged in one call (same random draws as an unwrapped augmenter)."""
    if augment is None:
        return None

    def apply(examples: list, rng: np.random.Generator) -> list:
        gold = [i for i, e in enumerate(examples) if e.meta.get("source", "gold") == "gold"]
        if len(gold) == len(examples):
            return augment(examples, rng)
        out = list(examples)
        if gold:
            for i, e in zip(gold, augment([examples[i] for i in gold], rng)):
                out[i] = e
        return out

    return apply
