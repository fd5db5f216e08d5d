"""The AURORA layout for labelled pairs: a JSON list of `{input, output, instruction, task}` records whose
image paths are relative to the JSON file's directory (as in the AURORA / Aurora-Bench releases).

    gold/train.json   [{"input": "images/000000_a.png", "output": "images/000000_b.png",
                        "instruction": "move the red circle left", "task": "world"}, ...]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynboot.images import encode_png
from dynboot.rundir import atomic_write_bytes, write_json


@dataclass
class AuroraRecord:
    index: int
    input: str  # path relative to the JSON's directory
    output: str | None  # absent for benchmark subsets without targets
    instruction: str
    task: str


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
    """Records of an AURORA JSON file, optionally only those whose `task` is in `tasks`.

    Raises ValueError naming the record for a malformed entry; image files are not opened here
    (a missing image is the reader's to report, per record).
    """
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("input"), str) or not isinstance(rec.get("instruction"), str):
            raise ValueError(f"{json_path}: record {i} needs string 'input' and 'instruction' fields: {rec!r:.200}")
        task = str(rec.get("task", ""))
        if tasks is not None and task not in tasks:
            continue
        out.append(AuroraRecord(i, rec["input"], rec.get("output"), rec["instruction"], task))
    return out
