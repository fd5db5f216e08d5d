"""Partitioned, committed output: Parquet files of many videos each, every one committed atomically with a small
record that says what it holds, so that readers and reruns never list or open files to know what is done.

    <run>/shards/<part>.parquet        pair rows (dynboot.data.pairs.PAIR_SCHEMA) of the partition's videos
    <run>/quarantine/<part>.jsonl      the partition's quarantined videos, one dynboot.io.rundir.quarantine_row a line
    <run>/commits/<part>.json          the commit record: which videos (status, pairs, reason), which files
    <run>/commits/_index-*.parquet     commit records compacted: one row per committed video (INDEX_SCHEMA)
    <run>/commits/_pending/<part>.json intent: written before a partition's files, removed after its commit
    <run>/commits/_format.json         marks the directory as committed output (readers then trust only commits)

    commit_partition(run, part, table, quarantine_rows, videos)   # files, then the record: atomic per partition
    log = load_index(run)                 # every committed video (segments + loose records), O(commit records)
    files = committed_files("s3://b/run") # the data files a reader may read, nothing else
    compact(run, rows, name)              # a segment for records already read; their loose files are removed

Why this and not Ray Data's `write_parquet`: its files carry no record of which videos they hold, a task killed
mid-write leaves files that nothing marks as incomplete, and a rerun would have to open every file to learn what
is done. Here a partition exists for readers only once its record does; the record is the last thing written.

Exactly once. A partition's name is a hash of its sorted video ids, so a task Ray re-executes (a lost block, a
retried task) rewrites the same files and the same record instead of adding a second copy. A killed job leaves
at most the partitions it was writing: their intents name their files, which the next run deletes
(`recover_pending`, O(partitions in flight)), and their videos were never committed, so they are redone.
Every write is atomic (local: temp file + rename; object storage: one PUT) and retried on transient errors.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import time
from pathlib import PurePosixPath
from typing import Any, Iterable, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynboot.io import storage
from dynboot.io.rundir import quarantine_row

__all__ = ["INDEX_SCHEMA", "Committed", "partition_id", "mark_dataset", "dataset_root",
           "commit_partition", "record_rows", "load_index", "compact", "recover", "committed_files", "done_ids",
           "latest_quarantine", "read_quarantine_rows"]

Committed = Literal["ok", "quarantined"]  # what a commit record says of a video
FORMAT = {"format": "dynboot.io.partitions", "version": 1}
INDEX_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("status", pa.string()), ("pairs", pa.int64()), ("reason", pa.string()),
    ("stage", pa.string()), ("partition", pa.string()), ("data_file", pa.string()),
    ("quarantine_file", pa.string()), ("committed_at", pa.float64()),
])
_IO_THREADS = 16  # small objects on object storage: latency-bound, so read / delete them concurrently


def partition_id(video_ids: Iterable[str]) -> str:
    """The name of the partition holding exactly these videos (deterministic: re-execution rewrites it)."""
    return "p-" + hashlib.sha256("\n".join(sorted(video_ids)).encode()).hexdigest()[:24]


def _write(uri: str, data: bytes) -> None:
    storage.retry(lambda: storage.write_bytes(uri, data), what=f"writing {uri}")


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, default=str) + "\n").encode()


# ---- the directory ------------------------------------------------------------------------------------------
def mark_dataset(run: str) -> None:
    """Mark `run` as committed output (idempotent)."""
    uri = storage.join(run, "commits", "_format.json")
    if not storage.exists(uri):
        _write(uri, _json(FORMAT))


def dataset_root(path: str) -> str | None:
    """The committed-output directory `path` names (itself, or the run above its `shards/`), else None."""
    path = str(path).rstrip("/")
    for root in (path, storage.parent(path)) if storage.name(path) == "shards" else (path,):
        if storage.is_file(storage.join(root, "commits", "_format.json")):
            return root
    return None


# ---- writing one partition ----------------------------------------------------------------------------------
def commit_partition(run: str, part: str, table: pa.Table | None, quarantine: list[dict[str, Any]],
                     videos: list[dict[str, Any]]) -> dict[str, Any]:
    """Write a partition's files, then its commit record; returns the record. `videos`: one dict per video with
    video_id, status (ok | quarantined), pairs, reason, stage. `quarantine`: one dict per quarantined video with
    video_id, path, stage, reason, error_class, error, attempts (written as quarantine rows, the video id their input)."""
    data_file = f"shards/{part}.parquet" if table is not None and table.num_rows else ""
    quarantine_file = f"quarantine/{part}.jsonl" if quarantine else ""
    intent = storage.join(run, "commits", "_pending", f"{part}.json")
    _write(intent, _json({"partition": part, "data_file": data_file, "quarantine_file": quarantine_file}))
    if data_file:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        _write(storage.join(run, data_file), buf.getvalue().to_pybytes())
    if quarantine_file:
        rows = [quarantine_row(q["video_id"], q["stage"], q["reason"], path=q.get("path") or "", error=q.get("error") or "",
                               error_class=q.get("error_class") or "", attempts=q.get("attempts") or 1) for q in quarantine]
        lines = "".join(json.dumps(r, default=str) + "\n" for r in rows)
        _write(storage.join(run, quarantine_file), lines.encode())
    record = {"partition": part, "data_file": data_file, "quarantine_file": quarantine_file,
              "rows": table.num_rows if data_file else 0, "committed_at": time.time(),
              "videos": [{k: v.get(k) for k in ("video_id", "status", "pairs", "reason", "stage")} for v in videos]}
    _write(storage.join(run, "commits", f"{part}.json"), _json(record))  # the commit
    storage.retry(lambda: storage.delete(intent), what=f"removing {intent}")
    return record


def record_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """INDEX_SCHEMA rows of one commit record."""
    return [{"video_id": v["video_id"], "status": v["status"], "pairs": int(v.get("pairs") or 0),
             "reason": v.get("reason") or "", "stage": v.get("stage") or "", "partition": record["partition"],
             "data_file": record["data_file"] if v["status"] == "ok" else "",
             "quarantine_file": record["quarantine_file"] if v["status"] != "ok" else "",
             "committed_at": float(record["committed_at"])} for v in record["videos"]]


# ---- reading what is committed ------------------------------------------------------------------------------
def _names(uri: str, hidden: bool) -> list[str]:
    return [storage.name(p) for p in storage.list_files(uri, recursive=False, hidden=hidden)]


def _read_many(uris: list[str]) -> list[bytes]:
    if len(uris) <= 1:
        return [storage.retry(lambda: storage.read_bytes(u)) for u in uris]
    with cf.ThreadPoolExecutor(_IO_THREADS) as pool:
        return list(pool.map(lambda u: storage.retry(lambda: storage.read_bytes(u)), uris))


def _scan(run: str) -> tuple[pa.Table, list[str]]:
    """(every committed video, loose records that a segment already covers)."""
    commits = storage.join(run, "commits")
    names = _names(commits, hidden=True)
    segments = sorted(n for n in names if n.startswith("_index-") and n.endswith(".parquet"))
    tables = [_read_segment(storage.join(commits, n)) for n in segments]
    covered = set()
    for t in tables:
        covered.update(t.column("partition").unique().to_pylist())
    records = [n for n in names if n.endswith(".json") and not n.startswith(("_", "."))]
    loose = sorted(n for n in records if n[:-5] not in covered)
    rows = [r for data in _read_many([storage.join(commits, n) for n in loose]) for r in record_rows(json.loads(data))]
    tables.append(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
    return pa.concat_tables(tables), [storage.join(commits, n) for n in records if n[:-5] in covered]


def load_index(run: str) -> pa.Table:
    """Every committed video of `run` (INDEX_SCHEMA): the compacted segments plus the loose commit records no
    segment covers. Costs one listing of `commits/` and a read per segment and per loose record."""
    return _scan(run)[0]


def _read_segment(uri: str) -> pa.Table:
    fs, inner = storage.resolve(uri)
    return storage.retry(lambda: pq.read_table(inner, filesystem=fs, schema=INDEX_SCHEMA))


def _delete_many(uris: list[str]) -> None:
    with cf.ThreadPoolExecutor(_IO_THREADS) as pool:
        list(pool.map(lambda u: storage.retry(lambda: storage.delete(u)), uris))


def compact(run: str, rows: list[dict[str, Any]], name: str) -> str | None:
    """Write the INDEX_SCHEMA `rows` (whole commit records only) as the segment `_index-<name>.parquet`, then
    remove the loose records it covers. A crash between the two leaves both: readers skip loose records a
    segment covers, and `recover` removes them."""
    if not rows:
        return None
    uri = storage.join(run, "commits", f"_index-{name}.parquet")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), buf)
    _write(uri, buf.getvalue().to_pybytes())
    _delete_many([storage.join(run, "commits", f"{p}.json") for p in sorted({r["partition"] for r in rows})])
    return uri


def recover(run: str) -> tuple[pa.Table, int]:
    """Before a job writes to `run` again: delete the files of partitions a killed job was writing (an intent
    without a commit) and loose records a segment already covers. Returns (the index, partitions removed).
    Costs O(commit records + partitions that were in flight), never a listing of the data files."""
    index, covered = _scan(run)
    _delete_many(covered)
    pending_dir = storage.join(run, "commits", "_pending")
    committed = set(index.column("partition").unique().to_pylist())
    removed = 0
    for name in _names(pending_dir, hidden=False):
        intent_uri = storage.join(pending_dir, name)
        if name[:-5] not in committed:
            intent = json.loads(storage.read_text(intent_uri))
            for rel in (intent.get("data_file"), intent.get("quarantine_file")):
                if rel:
                    storage.delete(storage.join(run, rel))
            removed += 1
        storage.delete(intent_uri)
    return index, removed


def _ok(index: pa.Table) -> pa.Table:
    return index.filter(pc.equal(index.column("status"), "ok"))


def done_ids(index: pa.Table, retry_quarantined: bool = False) -> pa.Array:
    """Distinct ids a rerun skips: committed ok, plus quarantined unless they are to be retried."""
    table = _ok(index) if retry_quarantined else index
    return table.column("video_id").combine_chunks().unique()


def latest_quarantine(index: pa.Table) -> pa.Table:
    """One row per video whose latest commit quarantined it (a video committed ok later is not quarantined)."""
    ok = _ok(index).column("video_id").combine_chunks().unique()
    q = index.filter(pc.and_(pc.equal(index.column("status"), "quarantined"),
                             pc.invert(pc.is_in(index.column("video_id"), value_set=ok))))
    if not q.num_rows:
        return q
    q = q.sort_by([("committed_at", "ascending")])
    return q.group_by("video_id", use_threads=False).aggregate(
        [(c, "last") for c in ("reason", "stage", "quarantine_file", "committed_at")]).rename_columns(
        ["video_id", "reason", "stage", "quarantine_file", "committed_at"])


def read_quarantine_rows(run: str, index: pa.Table | None = None) -> list[dict[str, Any]]:
    """The quarantine rows of the videos quarantined now (their latest commit), read from the committed files
    (a row's `input` is its video id)."""
    latest = latest_quarantine(load_index(run) if index is None else index)
    wanted = dict(zip(latest.column("video_id").to_pylist(), latest.column("quarantine_file").to_pylist()))
    files = sorted(set(wanted.values()))
    rows = []
    for rel, data in zip(files, _read_many([storage.join(run, f) for f in files])):
        for line in data.decode().splitlines():
            if line.strip():
                row = json.loads(line)
                if wanted.get(row["input"]) == rel:
                    rows.append(row)
    return sorted(rows, key=lambda r: r["input"])


def committed_files(path: str) -> list[str]:
    """The Parquet files a reader may read under `path`: one file as it is; for committed output (a run directory
    or its `shards/`), the data files of its commit records only (an uncommitted or half-written file is never
    among them); for any other directory, every `*.parquet` under it (hand-made shard directories)."""
    path = str(path)
    if storage.is_file(path):
        return [path]
    root = dataset_root(path)
    if root is None:
        base = storage.join(path, "shards") if storage.is_dir(storage.join(path, "shards")) else path
        return [p for p in storage.list_files(base, recursive=True, suffixes=(".parquet",))
                if not PurePosixPath(p).name.startswith((".", "_"))]
    ok = _ok(load_index(root))
    return sorted(storage.join(root, f) for f in set(ok.column("data_file").to_pylist()) if f)
