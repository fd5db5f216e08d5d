"""`dynboot filter`: keep the best pseudo-labelled pairs — a score threshold, then the paper's stratified top-K
(Algorithm 1) per data set, over the video classes. Input and output are URIs (local, s3://, gs://, file://).

    dynboot filter jobs/configs/filter.yaml shards=runs/relabel out=runs/filter top_k=7000
    python -m jobs.filter jobs/configs/filter.yaml shards=s3://bucket/runs/relabel out=s3://bucket/runs/filter
    ray job submit --working-dir . -- python -m jobs.filter jobs/configs/filter.yaml shards=s3://b/relabel out=s3://b/filter

Modes:
  disable     every row passes unchanged (the summary still says what `enable` would keep)
  score-only  rows whose IDP score is at least `min_score` pass
  enable      the rows passing `min_score`, then stratified top-K (paper Alg. 1) in each data set (the pair's
              `dataset`): the class of a pair is its video's `label` (the paper: the video's class), or, only
              for a pair without one, its caption's first word; every round, each class that has rows left
              gives its best-scoring remaining row (the last, partial round takes the best of those), until
              `top_k` rows of that data set are kept (top_k=0: no cap). The summary says which class each data
              set's rows were stratified by.
In score-only and enable, malformed rows (no class, an empty caption, NaN score) never pass: training skips an
empty caption as malformed, so it would only take a kept pair's place.

It scales with the pair count, not the image bytes, and reads only committed input (dynboot.io.partitions):
  1 scan    Ray tasks, one per input file: the id, action, score, dataset and label columns
  2 decide  driver: the selection, on those small columns (vectorised: 10^7 pairs are a few hundred MB)
  3 write   Ray tasks, one per input file: its kept rows to out/shards/, then the driver commits the output as
            one index segment (written last: a killed filter leaves its previous output as it was), and deletes
            the files of any earlier output.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from dynboot.io import partitions, storage
from dynboot.config import Config
from dynboot.data.mixture import action_class
from dynboot.data.pairs import PAIR_SCHEMA, conform
from dynboot.io.ray_session import ray_session
from dynboot.io.rundir import ResumeMode, RunDir

Mode = Literal["disable", "score-only", "enable"]
_SCAN = ["id", "video_id", "action", "score", "dataset", "label"]


class FilterConfig(Config):
    """dynboot filter: score threshold and stratified top-K over pseudo-labelled pairs (see jobs/filter.py)."""

    rerun_may_change: ClassVar[frozenset[str]] = frozenset({"ray_address", "num_cpus"})

    shards: str = Field("runs/relabel", description="Input: a relabel run directory (its committed files), a shard "
                        "directory or one Parquet file; local or a URI.")
    out: str = Field("runs/filter", description="Output run directory, local or a URI (kept pairs under shards/, committed).")
    mode: Mode = Field("enable", description="disable | score-only | enable.")
    min_score: float = Field(-math.inf, description="Keep rows whose IDP mean log-prob is at least this "
                                                    "(-.inf = no threshold; the paper filters by top-K alone).")
    top_k: int = Field(7000, ge=0, description="enable: rows kept per data set by stratified top-K (the paper: 7000 "
                                               "each for MIT, Kinetics, UCF; 0 = no cap).")
    resume: ResumeMode = Field("auto", description="auto: refilter with the same config; force: despite config "
                               "changes; off: set the old output aside (local directories).")
    ray_address: str = Field("", description="Ray cluster to join ('' = RAY_ADDRESS or a new local cluster).")
    num_cpus: int = Field(0, ge=0, description="Logical CPUs of a new local cluster (0 = all cores).")


def stratified_top_k(ids: list[str], classes: list[str], scores: list[float], k: int,
                     datasets: list[str] | None = None) -> list[int]:
    """Indices of the rows Algorithm 1 chooses, `k` per data set (0 = all), in the order it chooses them within a
    data set: round r takes the r-th best row of every class, best first; ties go to the smaller id."""
    n = len(ids)
    if not n:
        return []
    table = pa.table({"i": np.arange(n), "d": datasets if datasets is not None else [""] * n, "c": classes,
                      "s": pa.array(scores, pa.float64()), "id": ids})
    table = table.sort_by([("d", "ascending"), ("c", "ascending"), ("s", "descending"), ("id", "ascending")])
    d = pc.dictionary_encode(table.column("d")).combine_chunks().indices.to_numpy()
    c = pc.dictionary_encode(table.column("c")).combine_chunks().indices.to_numpy()
    starts = np.flatnonzero(np.r_[True, (d[1:] != d[:-1]) | (c[1:] != c[:-1])])
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))  # position within its (dataset, class)
    table = table.append_column("r", pa.array(rank)).sort_by(
        [("d", "ascending"), ("r", "ascending"), ("s", "descending"), ("id", "ascending")])
    d = pc.dictionary_encode(table.column("d")).combine_chunks().indices.to_numpy()
    starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
    nth = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))  # position within its data set
    keep = nth < k if k else np.ones(n, bool)
    return table.column("i").to_numpy()[keep].tolist()


# ---- 1 scan (Ray tasks) -------------------------------------------------------------------------------------
def _scan(batch: pa.Table) -> pa.Table:
    out = []
    for n, f in zip(batch.column("n").to_pylist(), batch.column("file").to_pylist()):
        fs, inner = storage.resolve(f)
        schema = pa.schema([PAIR_SCHEMA.field(c) for c in _SCAN])
        t = conform(storage.retry(lambda: pq.read_table(inner, filesystem=fs, schema=schema)))
        out.append(t.append_column("file", pa.array(np.full(t.num_rows, n, np.int32))))
    return pa.concat_tables(out)


def _classes(table: pa.Table) -> tuple[list[str], list[str]]:
    """Each row's class and what gave it ('label' or 'caption_word')."""
    classes, source = [], []
    for label, action in zip(table.column("label").to_pylist(), table.column("action").to_pylist()):
        if label:
            classes.append(str(label))
            source.append("label")
        else:
            classes.append(action_class(action))
            source.append("caption_word")
    return classes, source


def _select(cfg: FilterConfig, table: pa.Table) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Which scanned rows pass (a mask; None = all), and the statistics."""
    classes, source = _classes(table)
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    datasets = table.column("dataset").to_pylist()
    captioned = [bool(str(a).strip()) for a in table.column("action").to_pylist()]
    valid = np.array([bool(c) and a for c, a in zip(classes, captioned)], bool) & ~np.isnan(scores)
    passing = valid & (scores >= cfg.min_score)
    idx = np.flatnonzero(passing)
    chosen = np.asarray(stratified_top_k(table.column("id").take(pa.array(idx)).to_pylist(), [classes[i] for i in idx],
                                         scores[idx].tolist(), cfg.top_k, [datasets[i] for i in idx]), np.int64)
    enable = np.zeros(len(classes), bool)
    if len(chosen):
        enable[idx[chosen]] = True
    key = [f"{d}/{c}" for d, c in zip(datasets, classes)]
    by_dataset: dict[str, Counter] = {}
    for d, s in zip(datasets, source):
        by_dataset.setdefault(d, Counter())[s] += 1
    stats = {"pairs_in": len(classes), "malformed": int((~valid).sum()), "below_min_score": int((valid & ~passing).sum()),
             "dropped_by_top_k": int(passing.sum() - enable.sum()), "enable_would_keep": int(enable.sum()),
             "stratified_by": {d: "+".join(sorted(c)) for d, c in by_dataset.items()},
             "class_source_rows": {d: dict(c) for d, c in by_dataset.items()},
             "per_class_in": dict(sorted(Counter(key).items())),
             "per_class_enable": dict(sorted(Counter(k for k, e in zip(key, enable) if e).items()))}
    mask = {"disable": None, "score-only": passing, "enable": enable}[cfg.mode]
    return mask, stats


# ---- 3 write (Ray tasks) ------------------------------------------------------------------------------------
def _write(batch: pa.Table, out: str, stamp: str) -> pa.Table:
    rows = []
    for src, keep, part in zip(*(batch.column(c).to_pylist() for c in ("file", "keep", "part"))):
        fs, inner = storage.resolve(src)
        table = conform(storage.retry(lambda: pq.read_table(inner, filesystem=fs, schema=PAIR_SCHEMA)))
        if keep is not None:
            table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(keep, pa.string())))
        if not table.num_rows:
            continue
        rel = f"shards/{stamp}-{part}.parquet"
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        storage.retry(lambda: storage.write_bytes(storage.join(out, rel), buf.getvalue().to_pybytes()))
        for vid, n in Counter(table.column("video_id").to_pylist()).items():
            rows.append({"video_id": vid, "status": "ok", "pairs": n, "reason": "", "stage": "filter",
                         "partition": f"{stamp}-{part}", "data_file": rel, "quarantine_file": "",
                         "committed_at": time.time()})
    return pa.Table.from_pylist(rows, schema=partitions.INDEX_SCHEMA)


def _tasks(items: list[dict[str, Any]], fn, **kwargs) -> pa.Table | None:
    """`fn` over `items`, one Ray task each; the outputs concatenated (None when there is nothing to do)."""
    import ray

    if not items:
        return None
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn, batch_size=1, batch_format="pyarrow", fn_kwargs=kwargs)
    return pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))


def run(cfg: FilterConfig) -> dict[str, Any]:
    t0 = time.time()
    with RunDir(cfg.out).open(cfg, resume=cfg.resume, set_aside=("shards", "commits")) as rd:
        out, stamp = rd.uri_root, time.strftime("%Y%m%d-%H%M%S")
        files = partitions.committed_files(storage.absolute(cfg.shards))
        with ray_session(cfg.ray_address, cfg.num_cpus):
            scanned = _tasks([{"n": i, "file": f} for i, f in enumerate(files)], _scan)  # 1 scan
            if scanned is None:
                scanned = pa.schema([PAIR_SCHEMA.field(c) for c in _SCAN] + [pa.field("file", pa.int32())]).empty_table()
            mask, stats = _select(cfg, scanned)  # 2 decide
            keep: dict[int, list[str] | None] = {i: None for i in range(len(files))}
            if mask is not None:
                keep = {i: [] for i in range(len(files))}
                kept = scanned.filter(pa.array(mask))
                for n, pair in zip(kept.column("file").to_pylist(), kept.column("id").to_pylist()):
                    keep[n].append(pair)
            todo = [{"file": f, "keep": keep[i], "part": storage.name(f).rsplit(".", 1)[0]}
                    for i, f in enumerate(files) if keep[i] is None or keep[i]]
            index = _tasks(todo, _write, out=out, stamp=stamp)  # 3 write
        index = partitions.INDEX_SCHEMA.empty_table() if index is None else index
        _commit(out, index)
        kept_files = sorted(set(index.column("data_file").to_pylist()))
        summary = {"mode": cfg.mode, "min_score": cfg.min_score if math.isfinite(cfg.min_score) else None,
                   "top_k": cfg.top_k, "files_in": len(files), "files_written": len(kept_files),
                   "pairs_kept": int(pc.sum(index.column("pairs")).as_py() or 0) if index.num_rows else 0,
                   **stats, "wall_s": round(time.time() - t0, 2)}
        rd.log(**{k: summary[k] for k in ("pairs_in", "pairs_kept", "files_in", "files_written", "wall_s")})
        rd.write_summary(summary)
    print(f"[filter] {cfg.mode}: kept {summary['pairs_kept']} of {stats['pairs_in']} pairs in {len(kept_files)} files "
          f"-> {out} (classes: {stats['stratified_by']})", flush=True)
    return summary


def _commit(out: str, index: pa.Table) -> None:
    """Publish the output as one index segment (the commit: readers switch to it at once), then remove the files
    and segments of earlier outputs."""
    partitions.mark_dataset(out)
    buf = pa.BufferOutputStream()
    pq.write_table(index, buf)
    storage.retry(lambda: storage.write_bytes(storage.join(out, "commits", "_index-filter.parquet"), buf.getvalue().to_pybytes()))
    current = {storage.join(out, f) for f in index.column("data_file").to_pylist()}
    for f in storage.list_files(storage.join(out, "shards"), suffixes=(".parquet",), hidden=True):
        if f not in current:
            storage.delete(f)


if __name__ == "__main__":
    import sys

    from dynboot.cli import job_main

    sys.exit(job_main(FilterConfig, run, doc=__doc__))
