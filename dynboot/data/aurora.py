"""The AURORA layout for labelled pairs: JSON lists of `{input, output, instruction[, task, ...]}` records, as the
AURORA / Aurora-Bench releases (McGill-NLP/AURORA) and `dynboot world` write them. Every path is a URI.

    <root>/data/ag/train.json   [{"instruction": "...", "input": "data/ag/images/X_left.png", "output": "..."}, ...]
    <root>/test.json            Aurora-Bench: the same records + "task" (magicbrush, ag, something, whatsup, ...)
    <world>/gold/train.json     [{"input": "images/000000_a.png", ...}]   (paths relative to the JSON's folder)

What a training source may name (`aurora_sets`), never silently the benchmark:
- a JSON file: that file (a `test.json` too, since it is named);
- a directory holding `train.json` (a set's folder), `gold/train.json` (a world), or `data/<set>/train.json` (an
  AURORA root: every set that has a train.json);
- a directory whose only AURORA file is `test.json` is refused for training ("name the file to train on it"):
  pointing `data=` at the AURORA root used to pick up the benchmark.

Image paths in a record resolve against an image root (`image_root`): the JSON's folder (the world, Aurora-Bench's
test.json at the root) or the AURORA root above `data/<set>/` (AURORA's train.json files name `data/<set>/...`
relative to the repository root). The root is the candidate under which the first records' images exist; absolute
paths and URIs in records are taken as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynboot.io import storage
from dynboot.io.images import encode_png
from dynboot.io.rundir import atomic_write_bytes, write_json

__all__ = ["AuroraRecord", "AuroraSet", "read_aurora", "write_aurora", "aurora_sets", "image_root", "image_uri",
           "BenchmarkRefused"]

PROBE_RECORDS = 16  # records whose images decide the image root


class BenchmarkRefused(ValueError):
    """A directory whose only AURORA file is a benchmark (test.json) was given as training data."""


@dataclass
class AuroraRecord:
    index: int
    input: str  # path relative to the set's image root (or absolute / a URI)
    output: str | None  # absent for benchmark subsets without targets
    instruction: str
    task: str
    extra: dict[str, Any] = field(default_factory=dict)  # the record's other fields (img_id, mask, id, caption...)


@dataclass(frozen=True)
class AuroraSet:
    """One AURORA JSON file and where its relative image paths resolve."""

    json: str  # path or URI of the JSON file
    name: str  # the set: `data/<name>/train.json` -> name, else the JSON's folder name


def write_aurora(json_path: str | Path, pairs: list[tuple[np.ndarray, np.ndarray, str]], task: str) -> Path:
    """Write (before, after, instruction) triples as PNGs under `images/` plus the JSON list."""
    json_path = Path(json_path)
    root = json_path.parent
    records = []
    for i, (before, after, instruction) in enumerate(pairs):
        a, b = f"images/{i:06d}_a.png", f"images/{i:06d}_b.png"
        atomic_write_bytes(root / a, encode_png(before))
        atomic_write_bytes(root / b, encode_png(after))
        records.append({"input": a, "output": b, "instruction": instruction, "task": task})
    return write_json(json_path, records)


def read_aurora(json_path: str | Path, tasks: list[str] | None = None) -> list[AuroraRecord]:
    """Records of an AURORA JSON file (local path or URI), optionally only those whose `task` is in `tasks`.

    Raises ValueError naming the record for a malformed entry; image files are not opened here
    (a missing image is the reader's to report, per record).
    """
    try:
        data = json.loads(storage.read_text(json_path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_path}: not a JSON file: {err}") from None
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("input"), str) or not isinstance(rec.get("instruction"), str):
            raise ValueError(f"{json_path}: record {i} needs string 'input' and 'instruction' fields: {rec!r:.200}")
        task = str(rec.get("task", ""))
        if tasks is not None and task not in tasks:
            continue
        output = rec.get("output")
        extra = {k: v for k, v in rec.items() if k not in ("input", "output", "instruction", "task")}
        out.append(AuroraRecord(i, rec["input"], output if isinstance(output, str) else None, rec["instruction"], task, extra))
    return out


def _set_of(json_uri: str) -> AuroraSet:
    folder = storage.parent(json_uri)
    return AuroraSet(json_uri, storage.name(folder) or "aurora")


def aurora_sets(path: str, allow_test: bool = False) -> list[AuroraSet] | None:
    """The AURORA JSON files `path` names (module doc), or None when `path` is no AURORA source (e.g. Parquet).
    `allow_test`: a directory holding only test.json means that file (evaluation); training refuses it."""
    path = str(path)
    if path.lower().endswith(".json"):
        if not storage.is_file(path):
            raise FileNotFoundError(f"data source {path!r} does not exist")
        return [_set_of(path)]
    if not storage.is_dir(path):
        return None
    for rel in ("train.json", "gold/train.json"):
        if storage.is_file(storage.join(path, rel)):
            return [_set_of(storage.join(path, rel))]
    data_dir = storage.join(path, "data")
    found = [f for f in storage.list_files(data_dir, recursive=True, suffixes=(".json",)) if storage.name(f) == "train.json"
             and storage.parent(storage.parent(f)).rstrip("/") == data_dir.rstrip("/")] if storage.is_dir(data_dir) else []
    if found:
        return [_set_of(f) for f in found]
    test = storage.join(path, "test.json")
    if storage.is_file(test):
        if allow_test:
            return [_set_of(test)]
        raise BenchmarkRefused(f"data source {path!r} holds only test.json, a benchmark: it is not taken as training "
                               f"data unless named (data={test})")
    return None


def image_uri(root: str, rel: str) -> str:
    """A record's image path resolved against its set's image root (absolute paths and URIs as they are)."""
    if storage.is_uri(rel) or rel.startswith("/"):
        return rel
    return storage.join(root, rel)


def image_root(aurora_set: AuroraSet, records: list[AuroraRecord]) -> str:
    """Where `records`' relative image paths resolve: the JSON's folder, or the AURORA root when the JSON sits at
    `<root>/data/<set>/` (AURORA names images `data/<set>/...` from the repository root); whichever holds more of
    the first records' input images (the JSON's folder on a tie, or when none is found: then every image is
    missing, which the caller counts and reports)."""
    folder = storage.parent(aurora_set.json)
    candidates = [folder]
    if storage.name(storage.parent(folder)) == "data":
        candidates.append(storage.parent(storage.parent(folder)))
    probe = [r.input for r in records[:PROBE_RECORDS]]
    hits = [sum(storage.is_file(image_uri(root, rel)) for rel in probe) for root in candidates]
    return candidates[int(np.argmax(hits))] if max(hits, default=0) > 0 else candidates[-1]
