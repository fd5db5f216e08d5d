"""`dynboot filter`: keep the best pseudo-labelled pairs — a score threshold, then the paper's stratified top-K.

    dynboot filter jobs/configs/filter.yaml shards=runs/relabel out=runs/filter top_k=2000
    python -m jobs.filter jobs/configs/filter.yaml shards=runs/relabel out=runs/filter mode=score-only min_score=-1
    ray job submit --working-dir . -- python -m jobs.filter jobs/configs/filter.yaml shards=/shared/relabel out=/shared/filter

Modes:
  disable     every row passes unchanged (the summary still says what `enable` would keep)
  score-only  rows whose IDP score is at least `min_score` pass
  enable      the rows passing `min_score`, then stratified top-K (paper Alg. 1): the class of a pair is its
              action's first word (the verb: move / remove / add / swap on the world); every round, each class
              that has rows left gives its best-scoring remaining row (classes in the order of those rows'
              scores, ties by pair id), until `top_k` rows are kept (top_k=0: no cap).
In score-only and enable, malformed rows (empty action, NaN score) never pass.

It scales with the pair count, not the image bytes: pass 1 reads only the id, action and score columns of
every shard and decides; pass 2 streams the shards again and writes each one's kept rows to
`out/shards/<same name>` (temp file + rename), so a rerun rewrites the same files and a stale shard from an
earlier run with other settings is removed. It is a driver-only job (pyarrow); it needs no Ray cluster.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from dynboot.config import Config, save_config
from dynboot.pairs import PAIR_SCHEMA
from dynboot.pseudo_labels import shard_files
from dynboot.rundir import RunDir, atomic_write_bytes


class FilterConfig(Config):
    """dynboot filter: score threshold and stratified top-K over pseudo-labelled shards (see jobs/filter.py)."""

    shards: str = Field("runs/relabel", description="Input: a relabel run directory, a shard directory or one shard.")
    out: str = Field("runs/filter", description="Output run directory (filtered shards under shards/).")
    mode: Literal["disable", "score-only", "enable"] = Field("enable", description="disable | score-only | enable.")
    min_score: float = Field(-math.inf, description="Keep rows whose IDP mean log-prob is at least this "
                                                    "(-.inf = no threshold; the paper filters by top-K alone).")
    top_k: int = Field(7000, ge=0, description="enable: rows kept by stratified top-K (the paper: 7000 per data set; 0 = no cap).")


def action_class(action: str) -> str:
    """The class a pair is stratified by: its action's first word, lower-cased ('' for an empty action)."""
    words = str(action).split()
    return words[0].lower() if words else ""


def stratified_top_k(ids: list[str], classes: list[str], scores: list[float], k: int) -> list[int]:
    """Indices of the rows chosen by round-robin over classes by descending score, until `k` (0 = all)."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(classes):
        by_class[c].append(i)
    for rows in by_class.values():
        rows.sort(key=lambda i: (-scores[i], ids[i]))
    limit = k or len(ids)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        heads = [rows[depth] for rows in by_class.values() if depth < len(rows)]
        if not heads:
            break
        heads.sort(key=lambda i: (-scores[i], ids[i]))  # the last, partial round takes the best heads
        chosen.extend(heads[: limit - len(chosen)])
        depth += 1
    return chosen


def _select(cfg: FilterConfig, files: list[Path]) -> tuple[set[str], dict[str, Any]]:
    ids: list[str] = []
    classes: list[str] = []
    scores: list[float] = []
    malformed = below = 0
    per_class_in: Counter = Counter()
    for f in files:
        t = pq.read_table(f, columns=["id", "action", "score"])
        for i, a, s in zip(t.column("id").to_pylist(), t.column("action").to_pylist(), t.column("score").to_pylist()):
            c = action_class(a)
            per_class_in[c] += 1
            if not c or s is None or math.isnan(s):
                malformed += 1
            elif s < cfg.min_score:
                below += 1
            else:
                ids.append(i), classes.append(c), scores.append(float(s))
    chosen = stratified_top_k(ids, classes, scores, cfg.top_k)
    per_class_kept = Counter(classes[i] for i in chosen)
    stats = {"pairs_in": sum(per_class_in.values()), "malformed": malformed, "below_min_score": below,
             "dropped_by_top_k": len(ids) - len(chosen), "enable_would_keep": len(chosen),
             "per_class_in": dict(sorted(per_class_in.items())), "per_class_enable": dict(sorted(per_class_kept.items()))}
    if cfg.mode == "enable":
        return {ids[i] for i in chosen}, stats
    if cfg.mode == "score-only":
        return set(ids), stats
    return set(), stats  # disable: everything passes, no set needed


def run(cfg: FilterConfig) -> dict[str, Any]:
    t0 = time.time()
    rd = RunDir(cfg.out)
    save_config(cfg, rd.root)
    files = shard_files(cfg.shards)
    root = Path(cfg.shards)
    root = root.parent if root.is_file() else root / "shards" if (root / "shards").is_dir() else root
    keep, stats = _select(cfg, files)
    keep_ids = pa.array(sorted(keep), pa.string())
    written, kept = set(), 0
    for f in files:  # pass 2: stream each shard, write its kept rows
        table = pq.read_table(f, schema=PAIR_SCHEMA)
        if cfg.mode != "disable":
            table = table.filter(pc.is_in(table.column("id"), value_set=keep_ids))
        if table.num_rows == 0:
            continue
        rel = f.relative_to(root) if f.is_relative_to(root) else Path(f.name)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        atomic_write_bytes(rd.shards / rel, buf.getvalue().to_pybytes())
        written.add(rel)
        kept += table.num_rows
    for stale in rd.shards.rglob("*.parquet") if rd.shards.is_dir() else []:
        if stale.relative_to(rd.shards) not in written:
            stale.unlink()  # from an earlier run with other settings
    summary = {"mode": cfg.mode, "min_score": cfg.min_score if math.isfinite(cfg.min_score) else None, "top_k": cfg.top_k, "shards_in": len(files),
               "shards_written": len(written), "pairs_kept": kept, **stats, "wall_s": round(time.time() - t0, 2)}
    rd.write_summary(summary)
    print(f"[filter] {cfg.mode}: kept {kept} of {stats['pairs_in']} pairs in {len(written)} shards -> {rd.shards}", flush=True)
    return summary


if __name__ == "__main__":
    import sys

    from dynboot.cli import job_main

    sys.exit(job_main(FilterConfig, run, doc=__doc__))
