"""Stage 1 of the relabel job: the manifest, streamed. Ray Data tasks read it (a JSONL / Parquet manifest, a list
file, or a directory listing: dynboot/data/manifest.py turns each into MANIFEST_SCHEMA rows) and ask the registry actor
which rows are work: the driver never holds the list.

The registry (one actor, no CPU, on the driver's node) is the run's bookkeeping. It reads the commit records once
(`dynboot.io.partitions.recover`: segments + loose records + intents of partitions a killed run was writing), keeps
the done ids as a sorted array of 64-bit hashes (8 bytes a video: 80 MB at 10^7), and answers claims in batches:
a row is `todo`, `done` (committed by an earlier run), `duplicate` (the same video listed again: dropped, counted)
or `duplicate_id` (another video already has its id: the job records it with that reason). Its memory for this
run's claims grows with the work left, not with everything ever done.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from dynboot.io import partitions, storage
from dynboot.data.manifest import (MANIFEST_SCHEMA, ManifestSource, list_tree, manifest_source, rows_from_lines,
                              rows_from_listing, rows_from_records)

LISTING_BATCH = 10_000  # paths per block out of a directory listing


def _hash64(texts: list[str]) -> np.ndarray:
    """64-bit hashes of strings, the same in every process (pandas' vectorised SipHash with its fixed key)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(texts, dtype=object), categorize=False).astype(np.uint64)


class ManifestRegistry:
    """Ray actor: what is done (from the commit records), what this run has claimed (see module doc)."""

    def __init__(self, run: str, retry_quarantined: bool):
        self.run = run
        t_start = time.perf_counter()
        storage.exists(storage.join(run, "commits"))  # the storage client's one-time set-up, timed apart
        t0 = time.perf_counter()
        index, self.recovered = partitions.recover(run)
        self.done = np.unique(_hash64(partitions.done_ids(index, retry_quarantined).to_pylist()))
        self.totals = _totals(index)
        self.bookkeeping_s = time.perf_counter() - t0  # commit records read, intents recovered, done set built
        self.start_s = time.perf_counter() - t_start
        self.claimed_keys: dict[int, int] = {}  # key hash -> id hash
        self.claimed_ids: dict[int, int] = {}  # id hash -> key hash
        self.counts: Counter = Counter()

    def claim(self, video_ids: list[str], keys: list[str]) -> list[str]:
        ids, ks = _hash64(video_ids), _hash64(keys)
        pos = np.searchsorted(self.done, ids)
        done = (pos < len(self.done)) & (self.done[np.minimum(pos, len(self.done) - 1)] == ids) if len(self.done) else np.zeros(len(ids), bool)
        verdicts = []
        for i, k, is_done in zip(ids.tolist(), ks.tolist(), done.tolist()):
            if k in self.claimed_keys:
                verdict = "duplicate"
            elif is_done:
                verdict = "done"
            elif i in self.claimed_ids:
                verdict = "duplicate_id"
            else:
                verdict = "todo"
                self.claimed_keys[k], self.claimed_ids[i] = i, k
            verdicts.append(verdict)
        self.counts.update(verdicts)
        return verdicts

    def stats(self) -> dict[str, Any]:
        return {"listed": sum(self.counts.values()), **{k: self.counts[k] for k in ("todo", "done", "duplicate",
                "duplicate_id")}, "bookkeeping_s": round(self.bookkeeping_s, 3),
                "registry_start_s": round(self.start_s, 3), "recovered_partitions": self.recovered,
                "done_before": int(len(self.done)), "totals_before": self.totals}


    def totals_now(self) -> dict[str, Any]:
        """What the run directory holds now (read from the commit records again, here rather than in the driver)."""
        return _totals(partitions.load_index(self.run))


def _totals(index: pa.Table) -> dict[str, Any]:
    import pyarrow.compute as pc

    ok = index.filter(pc.equal(index.column("status"), "ok"))
    quarantined = partitions.latest_quarantine(index)
    return {"videos_ok": pc.count_distinct(ok.column("video_id")).as_py() if ok.num_rows else 0,
            "ok_commits": ok.num_rows, "pairs": int(pc.sum(ok.column("pairs")).as_py() or 0) if ok.num_rows else 0,
            "videos_quarantined": quarantined.num_rows,
            "by_reason": dict(Counter(quarantined.column("reason").to_pylist())) if quarantined.num_rows else {}}


# ---- Ray Data tasks -----------------------------------------------------------------------------------------
def _lines_to_rows(batch: pa.Table, src: ManifestSource) -> pa.Table:
    return pa.Table.from_pylist(rows_from_lines(batch.column("text").to_pylist(), src), schema=MANIFEST_SCHEMA)


def _records_to_rows(batch: pa.Table, src: ManifestSource) -> pa.Table:
    return pa.Table.from_pylist(rows_from_records(batch.to_pylist(), src), schema=MANIFEST_SCHEMA)


def _list_directory(batch: pa.Table, src: ManifestSource, extensions: tuple[str, ...]) -> Iterator[pa.Table]:
    paths: list[str] = []
    for path in list_tree(src.uri, extensions):
        paths.append(path)
        if len(paths) == LISTING_BATCH:
            yield pa.Table.from_pylist(rows_from_listing(paths, src), schema=MANIFEST_SCHEMA)
            paths = []
    yield pa.Table.from_pylist(rows_from_listing(paths, src), schema=MANIFEST_SCHEMA)


def _claim(batch: pa.Table, registry) -> pa.Table:
    """Keep the rows that are work; a row whose id another video holds is kept with that reason."""
    import pyarrow.compute as pc
    import ray

    if not batch.num_rows:
        return batch
    verdicts = ray.get(registry.claim.remote(batch.column("video_id").to_pylist(), batch.column("key").to_pylist()))
    verdicts = pa.array(verdicts)
    dup = pc.equal(verdicts, "duplicate_id")
    if pc.any(dup).as_py():  # recorded under an id of their own, so that they never shadow the video they collide with
        ids = [f"duplicate-id~{hashlib.sha256(k.encode()).hexdigest()[:16]}" if d else v for v, k, d in
               zip(batch.column("video_id").to_pylist(), batch.column("key").to_pylist(), dup.to_pylist())]
        errors = [f"duplicate_id: another video of this manifest has the id {v!r}" if d else e for v, e, d in
                  zip(batch.column("video_id").to_pylist(), batch.column("error").to_pylist(), dup.to_pylist())]
        batch = batch.set_column(0, "video_id", pa.array(ids)).set_column(
            batch.column_names.index("error"), "error", pa.array(errors))
    return batch.filter(pc.or_(pc.equal(verdicts, "todo"), dup))


def read_manifest(videos: str, extensions: list[str], registry, videos_per_task: int):
    """The work of this run as a Dataset of MANIFEST_SCHEMA rows, in blocks of `videos_per_task` rows."""
    import ray

    src = manifest_source(videos)
    fs, inner = storage.resolve(src.uri)
    if src.kind == "directory":  # one listing task, streaming its rows out in blocks as it walks
        ds = ray.data.from_items([{"root": src.uri}]).map_batches(
            _list_directory, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"src": src, "extensions": tuple(extensions)})
    elif src.kind == "parquet":
        ds = ray.data.read_parquet(inner, filesystem=fs).map_batches(
            _records_to_rows, batch_format="pyarrow", fn_kwargs={"src": src})
    else:
        ds = ray.data.read_text(inner, filesystem=fs).map_batches(
            _lines_to_rows, batch_format="pyarrow", fn_kwargs={"src": src})
    # num_cpus below decode's keeps the claim out of the decode tasks (fused, one manifest block would become
    # one long serial decode task); the repartition streams: it only cuts blocks into task-sized ones.
    ds = ds.map_batches(_claim, batch_format="pyarrow", fn_kwargs={"registry": registry}, num_cpus=0.1)
    return ds.repartition(target_num_rows_per_block=videos_per_task)


def start_registry(run: str, retry_quarantined: bool):
    """The registry actor, on this (the driver's) node: a local run directory is then read where it lives."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(ManifestRegistry).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote(run, retry_quarantined)
    return actor
