"""Streaming training ingest: the mixture plan's windows read, shuffled and decoded in Ray Data tasks (or in this
process for the plain loop), handed to a rank as examples, with a position that a checkpoint records.

    stream = RankStream(index, rank, world, policy, seed=0, window=256, reader="ray", rows_hint=steps * batch)
    examples = stream.next(64)                  # exactly 64 decoded examples (malformed rows skipped, counted)
    stream.position                             # (t, pos): resume with RankStream(..., start=position)

A read task takes one window of the plan (dynboot.data.mixture): it reads the window's pieces (row runs of Parquet row
groups, or AURORA records whose images it fetches), permutes them (the window is the bounded shuffle buffer), drops
the rows a resumed rank already consumed, decodes every image (any format, mode, orientation) and applies the
model's image policy, so the rank receives [n, S, S, 3] arrays of one size whatever sizes the data has; nothing on
the way stacks raw images. A rank holds a few decoded batches at a time (Ray Data's prefetch), never its shard:
its memory does not grow with the dataset — except that a data set whose decoded images fit in `cache_mb` (256 MiB
by default, the train job's `decode_cache_mb`; the embedded world's 3000 pairs take 18 MB) is decoded once per read
process and kept, instead of once per epoch. Rows that cannot be used (an undecodable image, a missing file, a
Parquet file that changed or broke since the index was built) keep their place in the window as rows carrying an
`error`, so every rank and every restart sees the same positions; the rank counts and skips them. Transient I/O
errors are retried (dynboot.io.storage.retry); if they persist the task fails, Ray Data retries it, and in the end the
worker group restarts from its checkpoint: never a silent loss.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any, Iterator, Literal

import numpy as np

from dynboot.io import storage
from dynboot.data.data_index import DataIndex, load_index
from dynboot.io.images import ImagePolicy, decode_image
from dynboot.data.mixture import MixturePlan, Piece

__all__ = ["RankStream", "read_examples", "decode_pieces", "window_batches"]

DECODE_ROWS = 32  # rows per decoded batch a read task yields (a block of Ray Data)
DECODE_CACHE_MB = 256  # default: a data set whose decoded rows fit in this is decoded once per read process


# ---- reading and decoding (inside Ray Data tasks, or in this process) -------------------------------------------
def _piece_rows(index: DataIndex, piece: Piece) -> list[dict[str, Any]]:
    """The rows of a piece as dicts; a piece that cannot be read gives as many rows carrying the reason."""
    s = index.sources[piece.src]
    try:
        rows = index.read_chunk(piece.src, piece.chunk, piece.lo, piece.hi).to_pylist()
        if len(rows) != piece.hi - piece.lo:
            raise ValueError(f"{s.files[s.chunks[piece.chunk][0]]}: {len(rows)} rows where the index recorded "
                             f"{piece.hi - piece.lo}: the file changed since the run's data index was built")
    except FileNotFoundError as err:
        rows = [{"error": f"file removed since the run's data index was built: {err}"}] * (piece.hi - piece.lo)
    except ValueError as err:
        rows = [{"error": str(err)[:300]}] * (piece.hi - piece.lo)
    out = []
    for k, row in enumerate(rows):
        row = dict(row)
        if "error" in row:
            row["id"] = f"{s.path}#chunk{piece.chunk}+{piece.lo + k}"
        row["src"] = piece.src
        out.append(row)
    return out


def _image(row: dict[str, Any], side: str) -> bytes:
    data = row.get(side)
    if data:
        return bytes(data)
    uri = row.get(f"{side}_uri")
    if not uri:
        raise ValueError(f"missing {side}")
    try:
        return storage.retry(lambda: storage.read_bytes(uri), what=f"reading {uri}")
    except FileNotFoundError:
        raise ValueError(f"missing image {uri}") from None


def _decoded(row: dict[str, Any], policy: ImagePolicy) -> dict[str, Any]:
    """A row as the rank receives it: its policy-applied images, or zero images and its `error`."""
    S = policy.size
    out = {"id": str(row.get("id") or ""), "source": str(row.get("source") or "gold"), "src": row["src"], "action": "",
           "error": "", "before": None, "after": None}
    try:
        if row.get("error"):
            raise ValueError(row["error"])
        action = row.get("action")
        if not isinstance(action, str) or not action.strip():
            raise ValueError("missing action")
        out["before"] = policy.apply(decode_image(_image(row, "before")))
        out["after"] = policy.apply(decode_image(_image(row, "after")))
        out["action"] = action
    except ValueError as err:
        out["error"] = f"row {row.get('id')!r}: {err}"[:300]
    if out["before"] is None or out["after"] is None:
        out["before"] = out["after"] = np.zeros((S, S, 3), np.uint8)
    return out


def _stack(rows: list[dict[str, Any]], window: int, first_pos: int) -> dict[str, np.ndarray]:
    n = len(rows)
    col = lambda key: np.asarray([r[key] for r in rows], dtype=object)  # noqa: E731
    return {"before": np.stack([r["before"] for r in rows]), "after": np.stack([r["after"] for r in rows]),
            "action": col("action"), "id": col("id"), "source": col("source"),
            "src": np.asarray([r["src"] for r in rows], np.int32), "window": np.full(n, window, np.int64),
            "pos": np.arange(first_pos, first_pos + n, dtype=np.int64), "error": col("error")}


def _fits_in_memory(index: DataIndex, policy: ImagePolicy, cache_mb: float) -> bool:
    """Whether every row of the index, decoded, fits in `cache_mb` MiB (both images, uint8)."""
    rows = sum(s.rows for s in index.sources)
    return rows * 2 * policy.size * policy.size * 3 <= cache_mb * (1 << 20)


_CACHING: "weakref.ref[DataIndex] | None" = None  # the index whose decoded chunks this process keeps


def _piece_decoded(index: DataIndex, piece: Piece, policy: ImagePolicy, cache_mb: float) -> list[dict[str, Any]]:
    """The decoded rows of a piece. When the whole data set fits in `cache_mb` (`_fits_in_memory`), a chunk is read and decoded
    once per process and kept on the index: a small data set is trained on for many epochs, and decoding it
    again every epoch cost as much CPU as a tiny model's training step. A chunk that could not be read (its
    rows carry the reason) is not kept: the next epoch reads it again."""
    if not _fits_in_memory(index, policy, cache_mb):
        return [_decoded(r, policy) for r in _piece_rows(index, piece)]
    global _CACHING
    if _CACHING is not None and _CACHING() is not index:  # one index's chunks per process: a new run's replace them
        old = _CACHING()
        if old is not None:
            old.decoded.clear()
    _CACHING = weakref.ref(index)
    key = (piece.src, piece.chunk, policy.model_dump_json())
    rows = index.decoded.get(key)
    if rows is None:
        hi = index.sources[piece.src].chunk_rows[piece.chunk]
        raw = _piece_rows(index, Piece(piece.src, piece.chunk, 0, int(hi)))
        rows = [_decoded(r, policy) for r in raw]
        if not any("error" in r for r in raw):
            index.decoded[key] = rows
    return rows[piece.lo: piece.hi]


def decode_pieces(index: DataIndex, pieces: list[Piece], policy: ImagePolicy, order: np.ndarray | None = None,
                  skip: int = 0, window: int = -1, batch_rows: int = DECODE_ROWS,
                  cache_mb: float = DECODE_CACHE_MB) -> Iterator[dict[str, np.ndarray]]:
    """Rows of `pieces` (permuted by `order`, the first `skip` dropped) as decoded batches of `batch_rows`."""
    rows = [r for p in pieces for r in _piece_decoded(index, p, policy, cache_mb)]
    if order is not None:
        rows = [rows[k] for k in order]
    for start in range(skip, len(rows), batch_rows):
        yield _stack(rows[start: start + batch_rows], window, start)


def window_batches(index: DataIndex, plan: MixturePlan, t: int, rank: int, world: int, policy: ImagePolicy,
                   skip: int = 0, cache_mb: float = DECODE_CACHE_MB) -> Iterator[dict[str, np.ndarray]]:
    """Rank `rank`'s t-th window, decoded (the first `skip` rows of its permuted order dropped)."""
    j = plan.global_window(t, rank, world)
    pieces = plan.window_pieces(j)
    order = plan.window_order(j, sum(p.hi - p.lo for p in pieces))
    yield from decode_pieces(index, pieces, policy, order, skip, window=t, cache_mb=cache_mb)


def _read_windows(batch: dict[str, np.ndarray], index_dir: str, rank: int, world: int, t0: int, skip: int, seed: int,
                  window: int, policy: dict, cache_mb: float) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: windows t0 + k for the k in `batch["id"]` (a range dataset)."""
    index = load_index(index_dir)
    plan = _plan(index_dir, seed, window)
    pol = ImagePolicy(**policy)
    for k in batch["id"]:
        t = t0 + int(k)
        yield from window_batches(index, plan, t, rank, world, pol, skip if t == t0 else 0, cache_mb)


_PLANS: dict[tuple, tuple[DataIndex, MixturePlan]] = {}


def _plan(index_dir: str, seed: int, window: int) -> MixturePlan:
    """One plan per read-task process and index (its epoch permutations are cached)."""
    index = load_index(index_dir)
    key = (index_dir, seed, window)
    if key not in _PLANS or _PLANS[key][0] is not index:
        _PLANS.clear()
        _PLANS[key] = (index, index.plan(seed, window))
    return _PLANS[key][1]


# ---- a rank's stream ------------------------------------------------------------------------------------------
class RankStream:
    """Decoded examples for one rank, in plan order (module doc). `reader="ray"` reads through Ray Data tasks
    (the index must be recorded: `index.uri`), `"local"` in this process; both give the same rows in the same order."""

    def __init__(self, index: DataIndex, rank: int, world: int, policy: ImagePolicy, seed: int, window: int,
                 start: tuple[int, int] = (0, 0), reader: Literal["local", "ray"] = "local", rows_hint: int = 0,
                 ingest_cpus: float = 0.5, ingest_tasks: int = 2, prefetch: int = 2, cache_mb: float = DECODE_CACHE_MB):
        self.index, self.rank, self.world, self.policy = index, rank, world, policy
        self.cache_mb = cache_mb
        self.seed, self.window, self.reader = seed, window, reader
        self.plan = index.plan(seed, window)
        self._epoch_rows = max(sum(s.rows for s in index.sources), window)
        self.position = (int(start[0]), int(start[1]))
        self.rows_hint, self.ingest_cpus, self.ingest_tasks, self.prefetch = rows_hint, ingest_cpus, ingest_tasks, prefetch
        self.tags = [s.tag for s in index.sources]
        self.malformed: dict[str, str] = {}  # id -> reason (first seen)
        self.skipped = 0  # malformed rows met, repeats included
        self.rows = 0  # good rows handed out
        self.wait_s = 0.0  # time spent waiting for data in `next`
        self._bad_run = 0  # malformed rows in a row: a whole epoch of them means no row is usable
        self._buffer: deque = deque()
        self._batches: Iterator[dict[str, np.ndarray]] | None = None
        self._starting: threading.Thread | None = None
        self._first: list = []  # the first batch read by `start` (or the error it met)

    def start(self) -> None:
        """Begin reading now, in a thread, so that the pipeline's start-up (a Ray dataset's executor and first read
        tasks) overlaps what the caller does before its first `next` (building an engine, loading a checkpoint)."""
        self._batches = self._source()

        def first() -> None:
            try:
                self._first.append(next(self._batches))
            except BaseException as err:  # handed to the caller's first `next`
                self._first.append(err)

        self._starting = threading.Thread(target=first, daemon=True, name="dynboot-ingest-start")
        self._starting.start()

    def _source(self) -> Iterator[dict[str, np.ndarray]]:
        """Decoded batches from the current position onward, forever (a new Ray dataset when one runs out)."""
        while True:
            t0, skip = self.position
            if self.reader == "local":
                t = t0
                while True:
                    yield from window_batches(self.index, self.plan, t, self.rank, self.world, self.policy,
                                              skip if t == t0 else 0, self.cache_mb)
                    t += 1
            yield from self._ray_batches(t0, skip)

    def _ray_batches(self, t0: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        import ray

        if not self.index.uri:
            raise ValueError("reader='ray' needs an index recorded on storage every node can read (dynboot.data.data_index.record_index)")
        n = max(2, -(-max(self.rows_hint - self.rows, 0) // max(1, self.window)) + 2)
        ds = ray.data.range(n, override_num_blocks=n).map_batches(
            _read_windows, batch_size=1, num_cpus=self.ingest_cpus, compute=ray.data.TaskPoolStrategy(size=self.ingest_tasks),
            fn_kwargs={"index_dir": storage.parent(self.index.uri), "rank": self.rank, "world": self.world, "t0": t0,
                       "skip": skip, "seed": self.seed, "window": self.window, "policy": self.policy.model_dump(),
                       "cache_mb": self.cache_mb})
        ds.context.execution_options.preserve_order = True  # the plan's order: resumable, and the plain loop's
        ds.context.enable_progress_bars = False
        got = False
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=self.prefetch):
            got = True
            yield batch
        if not got and t0 == self.position[0] and skip == self.position[1]:
            self.position = (t0 + n, 0)  # a run of windows with nothing left in them (all skipped): move on

    def next(self, n: int) -> list:
        """Exactly `n` decoded examples (Example), skipping and counting malformed rows."""
        from dynboot.data.example import Example

        t_wait = time.perf_counter()
        out = []
        if self._starting is not None:
            self._starting.join()
            self._starting, first = None, self._first.pop()
            if isinstance(first, BaseException):
                raise first
            self._buffer.extend(_rows(first))
        if self._batches is None:
            self._batches = self._source()
        while len(out) < n:
            if not self._buffer:
                self._buffer.extend(_rows(next(self._batches)))
                continue
            row = self._buffer.popleft()
            self.position = (int(row["window"]), int(row["pos"]) + 1)
            if row["error"]:
                self.skipped += 1
                self.malformed.setdefault(row["id"], row["error"])
                self._bad_run += 1
                if self._bad_run > self._epoch_rows:
                    raise RuntimeError(f"no usable row in a whole pass over the data ({self._bad_run} rows in a row "
                                       f"skipped), e.g. {row['error']}")
                continue
            self._bad_run = 0
            tag = self.tags[row["src"]]
            action = f"{tag} {row['action']}" if tag else row["action"]
            out.append(Example(row["before"], row["after"], action,
                               {"id": row["id"], "source": row["source"], "src": int(row["src"])}))
        self.rows += n
        self.wait_s += time.perf_counter() - t_wait
        return out

    def close(self) -> None:
        """Stop reading (the Ray dataset's executor and its prefetch) before Ray goes away."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def state(self) -> dict:
        return {"window": self.position[0], "pos": self.position[1], "rows": self.rows, "skipped": self.skipped}


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [{k: batch[k][i] for k in keys} for i in range(len(batch["id"]))]


def read_examples(index: DataIndex, policy: ImagePolicy, limit: int) -> tuple[list, list[dict]]:
    """The first `limit` usable examples of an index in file order (evaluation sets), and the malformed rows met."""
    from dynboot.data.example import Example

    out, bad = [], []
    for src, s in enumerate(index.sources):
        pieces = [Piece(src, c, 0, hi - lo) for c, (_, _, lo, hi) in enumerate(s.chunks)]
        for batch in decode_pieces(index, pieces, policy):
            for row in _rows(batch):
                if row["error"]:
                    bad.append({"id": row["id"], "error": row["error"]})
                elif len(out) < limit:
                    out.append(Example(row["before"], row["after"], row["action"], {"id": row["id"], "source": row["source"]}))
            if len(out) >= limit:
                return out, bad
    return out, bad

