"""Pair rows: the one schema of labelled frame pairs in Parquet (pseudo-labelled shards, gold exports).

    id          "video_id:frame_a:frame_b" — deterministic, so reruns and resumes never duplicate
    video_id    source video (or gold data set name)
    frame_a/b   frame indices in the source video (gold: the record index, twice)
    before/after  PNG bytes (lossless: training targets must be bit-exact)
    action      the action in words
    source      "gold" | "pseudo"
    model_id    IDP that wrote the label ("" for gold)
    score       IDP mean per-token log-prob of the action (NaN for gold)
    provenance  JSON string: where the pair came from (path, decoder, key-frame scores, job...)
    dataset     the data set the pair comes from (a manifest's `dataset`, the input root's name, a gold set's name)
    label       the source video's class ("" when it has none): what the filter stratifies by

Files written before `dataset` / `label` existed read with both as "". `read_pairs` reads what
`dynboot.io.partitions.committed_files` lists: the committed files of a relabel / filter run, never a file that
a killed job left half-done.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynboot.io import storage
from dynboot.data.aurora import read_aurora
from dynboot.io.partitions import committed_files
from dynboot.io.images import encode_png, load_image

if TYPE_CHECKING:  # imported where used: torch (via models.base) would slow every Ray worker that writes rows
    from dynboot.data.example import Example

PAIR_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("frame_a", pa.int64(), nullable=False),
    pa.field("frame_b", pa.int64(), nullable=False),
    pa.field("before", pa.binary(), nullable=False),
    pa.field("after", pa.binary(), nullable=False),
    pa.field("action", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("provenance", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
])
COLUMNS = PAIR_SCHEMA.names


def pair_id(video_id: str, frame_a: int, frame_b: int) -> str:
    return f"{video_id}:{int(frame_a)}:{int(frame_b)}"


def make_row(video_id: str, frame_a: int, frame_b: int, before: bytes | np.ndarray, after: bytes | np.ndarray,
             action: str, source: str, model_id: str = "", score: float = math.nan, provenance: dict | None = None,
             dataset: str = "", label: str = "") -> dict[str, Any]:
    if source not in ("gold", "pseudo"):
        raise ValueError(f"source must be 'gold' or 'pseudo', not {source!r}")
    enc = lambda x: x if isinstance(x, (bytes, bytearray)) else encode_png(x)  # noqa: E731
    return {"id": pair_id(video_id, frame_a, frame_b), "video_id": video_id, "frame_a": int(frame_a),
            "frame_b": int(frame_b), "before": bytes(enc(before)), "after": bytes(enc(after)), "action": action,
            "source": source, "model_id": model_id, "score": float(score), "provenance": json.dumps(provenance or {}),
            "dataset": dataset, "label": label}


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def check_row(row: dict[str, Any]) -> str | None:
    """Why a row is malformed (None when it is fine): missing fields, empty action, undecodable images."""
    for name in ("before", "after", "action"):
        if row.get(name) in (None, b"", ""):
            return f"missing {name}"
    if not isinstance(row["action"], str):
        return "action is not a string"
    return None


def conform(table: pa.Table) -> pa.Table:
    """`table` in PAIR_SCHEMA: columns a file predates (`dataset`, `label`) filled with ""."""
    for name in ("dataset", "label"):
        if name in table.column_names and table.column(name).null_count:
            i = table.column_names.index(name)
            table = table.set_column(i, name, pc.fill_null(table.column(name), ""))
    return table


def read_pairs(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All pair rows of a relabel / filter run (its committed files), a shard directory or one file, local or a
    URI (see dynboot.io.partitions.committed_files)."""
    files = committed_files(str(path))
    schema = PAIR_SCHEMA if columns is None else pa.schema([PAIR_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    tables = []
    for f in files:
        fs, inner = storage.resolve(f)
        tables.append(conform(pq.read_table(inner, filesystem=fs, schema=schema)))
    return pa.concat_tables(tables)


def gold_rows(aurora_json: str | Path, name: str | None = None) -> Iterator[dict[str, Any]]:
    """AURORA records as gold pair rows; records with a missing/unreadable image are skipped by the caller's
    choice: this raises ValueError for them, naming the record."""
    aurora_json = Path(aurora_json)
    name = name or aurora_json.parent.name
    for rec in read_aurora(aurora_json):
        if rec.output is None:
            continue
        try:
            before = (aurora_json.parent / rec.input).read_bytes()
            after = (aurora_json.parent / rec.output).read_bytes()
        except OSError as err:
            raise ValueError(f"{aurora_json} record {rec.index}: {err}") from None
        yield make_row(name, rec.index, rec.index, before, after, rec.instruction, "gold",
                       provenance={"file": str(aurora_json), "index": rec.index, "task": rec.task}, dataset=name)


def load_examples(aurora_json: str | Path, limit: int | None = None) -> list[Example]:
    """Gold examples from an AURORA JSON file, images decoded."""
    from dynboot.data.example import Example

    aurora_json = Path(aurora_json)
    out = []
    for rec in read_aurora(aurora_json)[:limit]:
        out.append(Example(load_image(aurora_json.parent / rec.input), load_image(aurora_json.parent / rec.output),
                           rec.instruction, {"id": f"{aurora_json.parent.name}:{rec.index}", "source": "gold"}))
    return out
