"""The training data mixture: gold AURORA sets and pseudo-labelled Parquet shards, each with a weight.

    data:                                   # TrainConfig.data (a plain path or a list of paths also works)
      - {path: runs/world/gold}             # AURORA: a train.json, its directory, or a world dir (gold/train.json)
      - {path: runs/relabel/shards, weight: 0.5, tag: ""}   # Parquet pair shards (dynboot.pairs schema)

Semantics (the same in the plain loop and in every Ray Train worker):
- `weight` is a ratio: a batch draws from source s with probability weight_s / sum(weights), whatever
  the sources' sizes (rows within a source are uniform). With one source the sampler is left unweighted
  (so a single-source run draws exactly the batches of the plain `TrainLoop`). A source with no usable
  row drops out and the others are renormalised.
- `tag` (default empty = off) is a provenance word prepended to the FDP action, i.e. to the FDP prompt
  (DreamGen's `<DREAM>` idea). It is refused for IDP, where the action is the *target*. It must be a
  word the backend's tokenizer knows: the tiny world's word-level tokenizer maps any other word to <unk>
  and pads actions to a fixed length, so tags are for real backends.
- a malformed row (missing field, image that is not decodable) is counted, recorded and skipped: never
  fatal. A gold record whose image file cannot be read becomes such a row (`aurora_rows`), so the Ray job
  reads AURORA sets in parallel read tasks and still loses nothing silently.
- world-data augmentation touches gold rows only (`gold_only`): it re-derives actions from the images.
- the decoded pool is sorted by (source, row id, content checksum), so it does not depend on the order
  in which Ray Data delivers blocks: a resumed worker rebuilds the same pool.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from dynboot.aurora import read_aurora
from dynboot.config import Config
from dynboot.pairs import make_row, read_pairs, row_to_example, to_table

__all__ = ["Source", "Pool", "PoolBuilder", "parse_sources", "resolve_source", "aurora_items", "aurora_rows",
           "source_table", "load_mixture", "gold_only", "ROW_COLUMNS"]

ROW_COLUMNS = ["id", "before", "after", "action", "source", "provenance"]  # what training reads of a pair row


class Source(Config):
    """One data source of the mixture."""

    path: str = Field(..., description="AURORA train.json / its dir / a world dir, or a Parquet shard file/dir.")
    format: Literal["auto", "aurora", "parquet"] = Field("auto", description="auto: a .json or a dir holding "
                                                         "train.json or gold/train.json is AURORA, else Parquet.")
    weight: float = Field(1.0, gt=0, description="Share of each batch drawn from this source (ratio, see module doc).")
    tag: str = Field("", description="Provenance word prepended to the FDP prompt (empty = off).")


def parse_sources(value: Any) -> list[Any]:
    """`"a"`, `["a", {"path": "b", "weight": 2}]` -> a list pydantic validates as `list[Source]`."""
    if isinstance(value, (str, Path, dict, Source)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("data must be a path or a non-empty list of paths / {path, weight, tag, format} mappings")
    return [{"path": str(v)} if isinstance(v, (str, Path)) else v for v in value]


def resolve_source(src: Source) -> tuple[str, str]:
    """("aurora", path to the JSON) or ("parquet", file/dir/URI); a clear error when nothing is there."""
    if "://" in src.path:  # remote shards (s3://...): Ray Data reads them, nothing to check locally
        if src.format == "aurora":
            raise ValueError(f"{src.path}: AURORA sources must be local (images are read beside the JSON)")
        return "parquet", src.path
    p = Path(src.path)
    if not p.exists():
        raise FileNotFoundError(f"data source {src.path!r} does not exist")
    aurora = next((c for c in (p, p / "train.json", p / "test.json", p / "gold" / "train.json") if c.is_file() and c.suffix == ".json"), None)
    if src.format == "aurora" or (src.format == "auto" and aurora is not None):
        if aurora is None:
            raise FileNotFoundError(f"data source {src.path!r}: no AURORA train.json there")
        return "aurora", str(aurora.resolve())
    if p.is_file() or any(q for q in p.rglob("*.parquet") if not q.name.startswith(".")):
        return "parquet", str(p.resolve())
    raise FileNotFoundError(f"data source {src.path!r}: neither an AURORA train.json nor Parquet shards")


def aurora_items(json_path: str | Path) -> list[dict[str, Any]]:
    """Light records of an AURORA file (no image bytes): what a Ray Data read task turns into rows."""
    json_path = Path(json_path)
    return [{"json": str(json_path), "name": json_path.parent.name, "index": r.index, "input": r.input,
             "output": r.output, "instruction": r.instruction, "task": r.task}
            for r in read_aurora(json_path) if r.output is not None]


def aurora_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gold pair rows of `aurora_items`; an unreadable image gives a row with empty bytes and the reason in
    its provenance, which the pool then counts as malformed (never fatal, never silently dropped)."""
    rows = []
    for it in items:
        root = Path(it["json"]).parent
        images, error = [], None
        for rel in (it["input"], it["output"]):
            try:
                images.append((root / rel).read_bytes())
            except OSError as err:
                images.append(b"")
                error = error or f"{it['json']} record {it['index']}: {err}"
        prov = {"file": it["json"], "index": it["index"], "task": it["task"]} | ({"error": error} if error else {})
        rows.append(make_row(it["name"], it["index"], it["index"], images[0], images[1], it["instruction"], "gold",
                             provenance=prov))
    return rows


def source_table(src: Source) -> pa.Table:
    """All rows of one source as a pair-schema table, read in this process."""
    fmt, path = resolve_source(src)
    if fmt == "aurora":
        return to_table(aurora_rows(aurora_items(path)))
    return read_pairs(path)


def _provenance(row: dict[str, Any]) -> dict:
    try:
        prov = json.loads(row.get("provenance") or "{}")
        return prov if isinstance(prov, dict) else {}
    except (TypeError, ValueError):
        return {}


def _row_key(src: int, row: dict[str, Any]) -> tuple:
    crc = zlib.crc32(bytes(row.get("before") or b""))
    crc = zlib.crc32(bytes(row.get("after") or b""), crc)
    crc = zlib.crc32(str(row.get("action")).encode(), crc)
    return (src, str(row.get("id")), crc)


@dataclass
class Pool:
    """Decoded training examples of one process (the whole mixture, or one worker's shard)."""

    examples: list = field(default_factory=list)  # list[Example], meta["src"] = source index
    source_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    malformed: list[dict] = field(default_factory=list)  # {"id", "src", "error"}

    def counts(self, n_sources: int) -> list[int]:
        return np.bincount(self.source_of, minlength=n_sources).tolist()

    def sampling_weights(self, sources: list[Source]) -> np.ndarray | None:
        """Per-example weights realising the sources' ratios; None when a single source has examples."""
        counts = np.asarray(self.counts(len(sources)), dtype=float)
        if (counts > 0).sum() <= 1:
            return None
        w = np.asarray([s.weight for s in sources], dtype=float)
        per_source = np.where(counts > 0, w / np.maximum(counts, 1), 0.0)
        return per_source[self.source_of]


class PoolBuilder:
    """Decodes pair rows as they stream in (any batches, any order; only decoded images are kept), then
    sorts the pool once so it does not depend on the arrival order."""

    def __init__(self, sources: list[Source], task: str):
        if task == "idp" and any(s.tag for s in sources):
            raise ValueError("provenance tags go into the FDP prompt; for IDP the action is the target, leave tag empty")
        self.sources, self.task = sources, task
        self.items: list[tuple[tuple, Any, dict | None]] = []  # (key, Example or None, malformed record or None)

    def add_rows(self, rows: Iterable[dict[str, Any]], src: int | None = None) -> None:
        """Rows of source `src`, or rows carrying their own `src` column."""
        for row in rows:
            s = int(row["src"]) if src is None else src
            key = _row_key(s, row)
            try:
                ex = row_to_example(row)
            except (ValueError, TypeError, KeyError) as err:  # malformed: counted and skipped, never fatal
                reason = _provenance(row).get("error") or str(err)
                self.items.append((key, None, {"id": str(row.get("id")), "src": s, "error": str(reason)[:300]}))
                continue
            tag = self.sources[s].tag
            if tag:
                ex.action = f"{tag} {ex.action}"
            ex.meta["src"] = s
            self.items.append((key, ex, None))

    def add_table(self, table: pa.Table, src: int | None = None) -> None:
        self.add_rows(table.to_pylist(), src)

    def finish(self) -> Pool:
        self.items.sort(key=lambda item: item[0])
        examples = [ex for _, ex, _ in self.items if ex is not None]
        pool = Pool(examples, np.asarray([ex.meta["src"] for ex in examples], dtype=np.int64),
                    [bad for _, _, bad in self.items if bad is not None])
        self.items = []
        return pool


def load_mixture(sources: list[Source], task: str) -> Pool:
    """The whole mixture decoded in this process (the plain loop's path; the Ray job streams shards instead)."""
    builder = PoolBuilder(sources, task)
    for i, src in enumerate(sources):
        builder.add_table(source_table(src).select(ROW_COLUMNS), src=i)
    return builder.finish()


def gold_only(augment):
    """Wrap an augmenter so it touches gold rows only: the world augmenter re-derives the action from the
    images, which on a pseudo-labelled pair would swap the IDP's label for the world's truth. A batch of
    gold rows goes through unchanged in one call (same random draws as the plain loop's augmenter)."""
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
