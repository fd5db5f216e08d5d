"""The data index of a training run: every source resolved once into chunks of rows, recorded in the run directory
so that every rank, every worker restart and every rerun streams the same plan (dynboot.data.mixture).

    index = record_index(build_index(cfg.data), "s3://bucket/run/data")   # the driver, once per run
    index = load_index("s3://bucket/run/data")                 # ranks, read tasks (cached per process)
    table = index.read_chunk(src, chunk)                       # a chunk's rows (pair rows or AURORA records)

- Parquet pair files (dynboot.data.pairs): the committed files under the path (names starting with '.' or '_' are
  temp files or markers: skipped), their footers read in parallel; a chunk is a row group, or a run of up to
  `CHUNK_ROWS` rows of it. A file whose footer cannot be read is a bad file: counted, named, skipped.
- AURORA sources (dynboot.data.aurora): the records are read once, their images' existence checked with one listing
  per set (a record whose image is missing is counted and reported, not fatal), and the usable records written as a
  small Parquet table of image URIs (`source<i>.parquet`, a row group per chunk) beside the index.
- a source with no usable row is an error naming it and why (`EmptySource`); `max_items` keeps a fixed,
  seed-independent subset (the rows whose id hashes lowest).
- each file's size is recorded: a read task that finds a file changed since the index was built skips its rows
  (counted as malformed, with that reason), and a rerun reports added / removed / changed files (`changes`)
  instead of silently training on other rows than the run started with.
"""

from __future__ import annotations

import functools
import io
import json
import posixpath
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from dynboot.io import storage
from dynboot.data.aurora import BenchmarkRefused, aurora_sets, image_root, image_uri, read_aurora
from dynboot.data.mixture import MixturePlan, Source, action_class

__all__ = ["CHUNK_ROWS", "PAIR_COLUMNS", "RECORD_SCHEMA", "SourceIndex", "DataIndex", "EmptySource", "build_index",
           "record_index", "load_index", "changes", "resolve_kind", "BenchmarkRefused", "class_counts"]

CHUNK_ROWS = 64
INDEX_FILE = "index.json"
PAIR_COLUMNS = ["id", "before", "after", "action", "source", "provenance"]  # what training reads of a pair row
RECORD_SCHEMA = pa.schema([("id", pa.string()), ("before_uri", pa.string()), ("after_uri", pa.string()),
                           ("action", pa.string()), ("source", pa.string()), ("provenance", pa.string())])
Kind = Literal["pairs", "records"]


class EmptySource(ValueError):
    """A data source that yields no usable pair."""


@dataclass
class SourceIndex:
    path: str  # as configured
    kind: Kind
    weight: float
    tag: str
    files: list[str]  # pair files, or the one record table
    file_sizes: list[int]
    chunks: list[list[int]]  # [file, row_group, lo, hi]: rows [lo, hi) of that row group
    rows: int
    report: dict[str, Any] = field(default_factory=dict)  # what was skipped and why; sets; capping

    @property
    def chunk_rows(self) -> np.ndarray:
        return np.asarray([hi - lo for _, _, lo, hi in self.chunks], dtype=np.int64)


@dataclass
class DataIndex:
    sources: list[SourceIndex]
    uri: str = ""  # where it is recorded ("" = in memory only)
    # decoded chunks this process keeps (dynboot.data.ingest, small data sets only): never serialised
    decoded: dict = field(default_factory=dict, repr=False, compare=False)

    def plan(self, seed: int, window: int) -> MixturePlan:
        return MixturePlan([s.chunk_rows for s in self.sources], [s.weight for s in self.sources], seed, window)

    def read_chunk(self, src: int, chunk: int, lo: int = 0, hi: int | None = None) -> pa.Table:
        """Rows [lo, hi) of a chunk (pair columns, or the record schema). OSError on I/O (transient errors were
        retried); ValueError when the file is corrupt or changed since the index was built."""
        s = self.sources[src]
        f, rg, clo, chi = s.chunks[chunk]
        hi = chi - clo if hi is None else hi
        uri = s.files[f]

        def read() -> pa.Table:
            fs, inner = storage.resolve(uri)
            with fs.open_input_file(inner) as fh:
                if fh.size() != s.file_sizes[f]:
                    raise ValueError(f"{uri} changed since the run's data index was built ({s.file_sizes[f]} -> "
                                     f"{fh.size()} bytes): its rows are skipped")
                pf = pq.ParquetFile(fh)
                names = set(pf.schema_arrow.names)
                columns = RECORD_SCHEMA.names if s.kind == "records" else [c for c in PAIR_COLUMNS if c in names]
                return pf.read_row_group(rg, columns=columns).slice(clo + lo, hi - lo)

        try:
            return storage.retry(read, what=f"reading {uri}")
        except (pa.ArrowInvalid, OSError) as err:
            if storage.is_transient(err) or isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"{uri}: unreadable Parquet: {err}") from None

    def to_json(self) -> str:
        return json.dumps({"version": 1, "sources": [asdict(s) for s in self.sources]})

    @classmethod
    def from_json(cls, text: str, uri: str = "") -> "DataIndex":
        data = json.loads(text)
        return cls([SourceIndex(**s) for s in data["sources"]], uri)

    def summary(self) -> list[dict]:
        return [{"path": s.path, "kind": s.kind, "rows": s.rows, "files": len(s.files) if s.kind == "pairs" else None,
                 "weight": s.weight, **s.report} for s in self.sources]


# ---- building ---------------------------------------------------------------------------------------------
def _hash(text: str) -> int:
    return zlib.crc32(text.encode())


def _footer(uri: str) -> tuple[int, list[int]] | str:
    """(size, rows per row group), or why the file is unusable."""
    def read():
        fs, inner = storage.resolve(uri)
        with fs.open_input_file(inner) as fh:
            meta = pq.ParquetFile(fh).metadata
            return fh.size(), [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    try:
        return storage.retry(read, what=f"reading the footer of {uri}")
    except (pa.ArrowInvalid, OSError) as err:
        if storage.is_transient(err):
            raise
        return f"{type(err).__name__}: {str(err)[:200]}"


def _parquet_files(path: str) -> list[str]:
    """The committed Parquet files of a pair source (hidden names are temp files or commit markers)."""
    if storage.is_file(path):
        return [path]
    return storage.list_files(path, recursive=True, suffixes=(".parquet",))


def _pairs_index(src: Source, path: str) -> SourceIndex:
    if src.classes:
        raise ValueError(f"data source {src.path!r}: `classes` selects AURORA records; Parquet pairs are selected by "
                         "class with `dynboot filter` (its output is the source)")
    files = _parquet_files(path)
    with ThreadPoolExecutor(16) as pool:  # footers are small reads: on object storage latency dominates
        footers = list(pool.map(_footer, files))
    good, sizes, chunks, bad = [], [], [], []
    for uri, footer in zip(files, footers):
        if isinstance(footer, str):
            bad.append({"file": uri, "error": footer})
            continue
        size, groups = footer
        f = len(good)
        good.append(uri)
        sizes.append(size)
        for rg, n in enumerate(groups):
            chunks += [[f, rg, lo, min(n, lo + CHUNK_ROWS)] for lo in range(0, n, CHUNK_ROWS)]
    report: dict[str, Any] = {"bad_files": bad} if bad else {}
    if src.max_items is not None:
        total = sum(hi - lo for *_, lo, hi in chunks)
        keep, taken = [], 0
        for c in sorted(chunks, key=lambda c: (_hash(f"{good[c[0]]}#{c[1]}#{c[2]}"), c)):
            if taken >= src.max_items:
                break
            n = min(c[3] - c[2], src.max_items - taken)
            keep.append([c[0], c[1], c[2], c[2] + n])
            taken += n
        chunks = sorted(keep)
        if total > src.max_items:
            report["capped_from"] = total
    rows = sum(hi - lo for *_, lo, hi in chunks)
    if rows == 0:
        why = (f"{len(bad)} of {len(files)} Parquet files unreadable (e.g. {bad[0]['file']}: {bad[0]['error']})" if bad
               else f"{len(files)} Parquet files, no rows" if files else "no AURORA train.json and no Parquet files under it")
        raise EmptySource(f"data source {src.path!r} yields 0 pairs: {why}")
    return SourceIndex(src.path, "pairs", src.weight, src.tag, good, sizes, chunks, rows, report)


def _existing(uris: list[str]) -> set[str]:
    """Which of `uris` exist: one recursive listing under their common folder (not one request per image)."""
    if not uris:
        return set()
    local = [u for u in uris if not storage.is_uri(u)]
    if local and len(local) == len(uris):
        import os

        return {u for u in uris if os.path.isfile(u)}
    folders = sorted({storage.parent(u) for u in uris})
    common = folders[0]
    while common and not all(f == common or f.startswith(common.rstrip("/") + "/") for f in folders):
        common = storage.parent(common) if storage.parent(common) != common else ""
    return set(storage.list_files(common, recursive=True, hidden=True)) if common else {u for u in uris if storage.is_file(u)}


def _records_index(src: Source, sets) -> tuple[SourceIndex, pa.Table]:
    rows, missing, examples, no_target, set_names, other_class = [], 0, [], 0, [], 0
    for aset in sets:
        records = read_aurora(aset.json)
        if src.classes:
            kept = [r for r in records if action_class(r.instruction) in src.classes]
            other_class += len(records) - len(kept)
            records = kept
        root = image_root(aset, records)
        set_names.append({"name": aset.name, "json": aset.json, "image_root": root, "records": len(records)})
        pairs = []
        for r in records:
            if r.output is None:
                no_target += 1
                continue
            pairs.append((r, image_uri(root, posixpath.normpath(r.input)), image_uri(root, posixpath.normpath(r.output))))
        present = _existing([u for _, a, b in pairs for u in (a, b)])
        for r, a, b in pairs:
            if a not in present or b not in present:
                missing += 1
                if len(examples) < 5:
                    examples.append(f"{aset.json} record {r.index}: {a if a not in present else b}")
                continue
            prov = {"file": aset.json, "index": r.index, "task": r.task}
            rows.append({"id": f"{aset.name}:{r.index}:{r.index}", "before_uri": a, "after_uri": b,
                         "action": r.instruction, "source": "gold", "provenance": json.dumps(prov)})
    report: dict[str, Any] = {"sets": set_names}
    if missing:
        report |= {"missing_images": missing, "missing_examples": examples}
    if no_target:
        report["no_target"] = no_target
    if src.classes:
        report |= {"classes": list(src.classes), "other_classes": other_class}
    if src.max_items is not None and len(rows) > src.max_items:
        report["capped_from"] = len(rows)
        keep = sorted(range(len(rows)), key=lambda k: (_hash(rows[k]["id"]), k))[: src.max_items]
        rows = [rows[k] for k in sorted(keep)]
    if not rows:
        total = sum(s["records"] for s in set_names)
        why = (f"{missing} of {total} records have a missing image (e.g. {examples[0]}; AURORA's training images are "
               "downloaded separately from its repository)" if missing else f"{total} records, none with an output image")
        if src.classes and not total:
            why = f"no record of the classes {src.classes} ({other_class} of other classes)"
        raise EmptySource(f"data source {src.path!r} yields 0 pairs: {why}")
    chunks = [[0, g, 0, min(CHUNK_ROWS, len(rows) - g * CHUNK_ROWS)] for g in range(-(-len(rows) // CHUNK_ROWS))]
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    return SourceIndex(src.path, "records", src.weight, src.tag, [""], [0], chunks, len(rows), report), table


class _MemoryIndex(DataIndex):
    """An index whose record tables stay in this process (the plain loop, evaluation sets)."""

    def __init__(self, sources: list[SourceIndex], tables: dict[int, pa.Table]):
        super().__init__(sources, "")
        self.tables = tables

    def read_chunk(self, src: int, chunk: int, lo: int = 0, hi: int | None = None) -> pa.Table:
        if src not in self.tables:
            return super().read_chunk(src, chunk, lo, hi)
        _, rg, clo, chi = self.sources[src].chunks[chunk]
        hi = chi - clo if hi is None else hi
        return self.tables[src].slice(rg * CHUNK_ROWS + clo + lo, hi - lo)


def resolve_kind(src: Source, allow_test: bool = False):
    """("records", AURORA sets) or ("pairs", path); FileNotFoundError / BenchmarkRefused naming the source."""
    path = storage.absolute(src.path)
    if not storage.exists(path):
        raise FileNotFoundError(f"data source {src.path!r} does not exist")
    if src.format != "parquet":
        sets = aurora_sets(path, allow_test=allow_test)
        if sets:
            return "records", sets
        if src.format == "aurora":
            raise FileNotFoundError(f"data source {src.path!r}: no AURORA train.json there")
    return "pairs", path


def build_index(sources: list[Source], allow_test: bool = False) -> DataIndex:
    """Resolve every source (module doc), in this process; `record_index` writes it into a run directory."""
    built, tables = [], {}
    for i, src in enumerate(sources):
        kind, what = resolve_kind(src, allow_test)
        if kind == "records":
            index, tables[i] = _records_index(src, what)
        else:
            index = _pairs_index(src, what)
        built.append(index)
    return _MemoryIndex(built, tables)


def class_counts(src: Source) -> dict[str, int]:
    """Rows per action class (`mixture.action_class`) of a source, as training reads it: the AURORA records its
    index keeps (`classes` and `max_items` applied, records with a missing image left out), or the `action` column
    of its Parquet pair files."""
    from collections import Counter

    kind, what = resolve_kind(src)
    if kind == "records":
        actions = _records_index(src, what)[1].column("action").to_pylist()
    else:
        def read(uri: str) -> list[str]:
            fs, inner = storage.resolve(uri)
            return storage.retry(lambda: pq.read_table(inner, filesystem=fs, columns=["action"]),
                                 what=f"reading {uri}").column("action").to_pylist()
        with ThreadPoolExecutor(16) as pool:
            actions = [a for part in pool.map(read, _parquet_files(what)) for a in part]
    return dict(sorted(Counter(action_class(a) for a in actions).items()))


def record_index(index: DataIndex, out_dir: str) -> DataIndex:
    """Write `index` (and its AURORA record tables, one row group per chunk) under `out_dir`; the recorded index,
    which read tasks on any node load with `load_index(out_dir)`."""
    sources = []
    for i, s in enumerate(index.sources):
        if s.kind == "records":
            buf = io.BytesIO()
            pq.write_table(index.tables[i], buf, row_group_size=CHUNK_ROWS)
            uri = storage.join(out_dir, f"source{i}.parquet")
            storage.write_bytes(uri, buf.getvalue())
            s = replace(s, files=[uri], file_sizes=[len(buf.getvalue())])
        sources.append(s)
    recorded = DataIndex(sources, storage.join(out_dir, INDEX_FILE))
    storage.write_text(recorded.uri, recorded.to_json())
    return recorded


@functools.lru_cache(maxsize=4)
def _load(uri: str, size: int, mtime_ns: int) -> DataIndex:
    return DataIndex.from_json(storage.read_text(uri), uri)


def load_index(out_dir: str) -> DataIndex | None:
    """The index recorded under `out_dir` (cached per process while the file is unchanged: Ray reuses worker
    processes across runs), or None."""
    uri = storage.join(out_dir, INDEX_FILE)
    fs, inner = storage.resolve(uri)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        return None
    return _load(uri, int(info.size), int(info.mtime_ns or 0))


def changes(index: DataIndex) -> list[str]:
    """How the sources differ now from what the index recorded (files added, removed, resized), one line each."""
    out = []
    for s in index.sources:
        if s.kind != "pairs":
            continue
        try:
            now = {u: storage.size(u) for u in _parquet_files(storage.absolute(s.path))}
        except (FileNotFoundError, OSError) as err:
            out.append(f"{s.path}: cannot be listed now ({err}); its recorded files are read as they are")
            continue
        had = dict(zip(s.files, s.file_sizes))
        bad = {b["file"] for b in s.report.get("bad_files", [])}
        added = sorted(set(now) - set(had) - bad)
        removed = sorted(set(had) - set(now))
        resized = sorted(u for u in set(had) & set(now) if had[u] != now[u])
        if added:
            out.append(f"{s.path}: {len(added)} files added since the run started (e.g. {added[0]}): not used by this run")
        if removed:
            out.append(f"{s.path}: {len(removed)} files removed (e.g. {removed[0]}): their rows are skipped")
        if resized:
            out.append(f"{s.path}: {len(resized)} files changed (e.g. {resized[0]}): their rows are skipped")
    return out
