"""The run-directory contract shared by every job.

    <run>/config.yaml     resolved config (dynboot.config.save_config)
    <run>/metrics.jsonl   one JSON object per line, appended as the job goes
    <run>/summary.json    counts, errors, throughput, time per stage — written atomically at the end
    <run>/checkpoints/    model checkpoints (Hugging Face layout)
    <run>/shards/         Parquet outputs, one published atomically per unit of work
    <run>/quarantine/     one JSON row per input that failed (path, error, stage)
    <run>/*.png, report.md  what a person looks at
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "append_jsonl", "read_jsonl", "write_json", "RunDir"]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file beside `path`, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | Path, obj: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunDir:
    """Paths of one run directory, and its metrics log."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def checkpoints(self) -> Path:
        return self.path("checkpoints")

    @property
    def shards(self) -> Path:
        return self.path("shards")

    @property
    def quarantine(self) -> Path:
        return self.path("quarantine")

    def log(self, **metrics: Any) -> None:
        append_jsonl(self.path("metrics.jsonl"), {"time_s": round(time.time() - self.t0, 3), **metrics})

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path("metrics.jsonl"))

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return write_json(self.path("summary.json"), summary)
