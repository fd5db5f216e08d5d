"""The attempt ledger of the relabel job: bounds the retries Ray makes after a worker dies.

A worker that dies (native crash, out-of-memory kill, an IDP actor that exits after a device error) never reaches
an `except`; Ray retries its task, or restarts the actor and retries the batch, without limit. So before a stage
works on a unit (the videos of one task or actor batch) it records `attempts/<stage>-<hash of the ids>.json` in
the run directory ({attempts, pid, host, videos}) and deletes it when done. An entry still there when the same
unit comes back means a worker died on it:
- a unit of several videos is then processed one video at a time, each with its own entry, so that the video
  that kills workers is found without charging the others;
- a single video that has killed `max_attempts` workers is given up (`crashed`) without being touched again.
The ledger lives beside the output (a local path or object storage, through dynboot.io.storage), so every node sees
it; it costs two small writes per unit, and a new run starts with an empty ledger (deaths count within a run).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any, Callable

from dynboot.io import storage

Row = dict[str, Any]


class Ledger:
    def __init__(self, run: str, stage: str, max_attempts: int):
        self.root, self.stage, self.max_attempts = run, stage, max_attempts

    def _uri(self, ids: list[str]) -> str:
        digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
        return storage.join(self.root, "attempts", f"{self.stage}-{digest}.json")

    def deaths(self, ids: list[str]) -> dict[str, Any]:
        try:
            return json.loads(storage.read_text(self._uri(ids)))
        except (OSError, ValueError):
            return {"attempts": 0}

    def _claim(self, ids: list[str], died: int) -> None:
        entry = {"attempts": died + 1, "pid": os.getpid(), "host": socket.gethostname(), "videos": ids[:100]}
        storage.retry(lambda: storage.write_text(self._uri(ids), json.dumps(entry)), what="attempt ledger")

    def _release(self, ids: list[str]) -> None:
        storage.retry(lambda: storage.delete(self._uri(ids)), what="attempt ledger")

    def run(self, rows: list[Row], fn: Callable[[list[Row]], list[Row]],
            crashed: Callable[[Row, dict[str, Any]], Row]) -> list[Row]:
        """`fn(rows)` under the ledger (see module doc); `crashed(row, entry)` is what a given-up video becomes."""
        if not rows:
            return []
        ids = [r["video_id"] for r in rows]
        last = self.deaths(ids)
        if last["attempts"] and len(rows) > 1:  # this unit killed a worker: find the culprit one video at a time
            out = [o for r in rows for o in self.run([r], fn, crashed)]
            self._release(ids)
            return out
        if last["attempts"] >= self.max_attempts:
            self._release(ids)
            return [crashed(rows[0], last)]
        self._claim(ids, last["attempts"])
        out = fn(rows)
        self._release(ids)
        return out
