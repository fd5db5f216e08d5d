"""The training ingest alone, with and without the decode cache (dynboot.data.ingest, `decode_cache_mb`).

    python -m jobs.bench_ingest data=runs/quickstart/world/gold steps=150

One rank's RankStream through Ray Data read tasks (reader="ray", as a train worker reads), `steps` batches of
`batch_size`, once per setting and `repeats` times in alternation (the box is shared: the ratio of one run is
what counts). Reports seconds to the first batch and for the rest, and the ratio uncached / cached. Prints the JSON
and writes it to `result`.
"""

from __future__ import annotations

import os
import tempfile
import time

from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.data.data_index import build_index, record_index
from dynboot.data.ingest import RankStream
from dynboot.data.mixture import Source
from dynboot.io.images import ImagePolicy
from dynboot.io.ray_session import ray_session
from dynboot.io.rundir import write_json


class BenchIngestConfig(Config):
    """The streaming ingest with and without its decode cache."""

    data: str = Field("runs/quickstart/world/gold", description="A data source (AURORA dir/json or Parquet pairs).")
    steps: int = Field(150, ge=2, description="Batches read per setting.")
    batch_size: int = Field(64, ge=1, description="Rows per batch.")
    image_size: int = Field(32, ge=1, description="Side of the decoded images (the world model reads 32 px).")
    cache_mb: list[float] = Field([0, 256], description="decode_cache_mb settings compared (0 = off).")
    repeats: int = Field(2, ge=1, description="Rounds over the settings, alternated.")
    num_cpus: int = Field(4, ge=1, description="Logical CPUs of the local Ray cluster.")
    result: str = Field("bench/results/bench_ingest.json", description="JSON written here.")


def run(cfg: BenchIngestConfig) -> dict:
    policy = ImagePolicy(kind="squash", size=cfg.image_size)
    rows: list[dict] = []
    with ray_session(num_cpus=cfg.num_cpus), tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        index = record_index(build_index([Source(path=cfg.data)]), tmp)
        for r in range(cfg.repeats):
            for mb in cfg.cache_mb:
                stream = RankStream(index, 0, 1, policy, seed=r, window=256, reader="ray",
                                    rows_hint=cfg.steps * cfg.batch_size, cache_mb=mb)
                t0 = time.perf_counter()
                stream.next(cfg.batch_size)
                t1 = time.perf_counter()
                for _ in range(cfg.steps - 1):
                    stream.next(cfg.batch_size)
                t2 = time.perf_counter()
                stream.close()
                rows.append({"repeat": r, "cache_mb": mb, "first_batch_s": round(t1 - t0, 2), "rest_s": round(t2 - t1, 2),
                             "rows_per_s": round((cfg.steps - 1) * cfg.batch_size / (t2 - t1), 1)})
                print(rows[-1], flush=True)
    rest = {mb: [x["rest_s"] for x in rows if x["cache_mb"] == mb] for mb in cfg.cache_mb}
    off, on = cfg.cache_mb[0], cfg.cache_mb[-1]
    out = {"config": cfg.model_dump(mode="json"), "rows_in_data": sum(s.rows for s in index.sources),
           "epochs_read": round(cfg.steps * cfg.batch_size / sum(s.rows for s in index.sources), 1),
           "load": os.getloadavg(), "runs": rows,
           "uncached_over_cached": [round(a / b, 2) for a, b in zip(rest[off], rest[on])]}
    write_json(cfg.result, out)
    print(out["uncached_over_cached"], flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(job_main(BenchIngestConfig, run, doc=__doc__))
