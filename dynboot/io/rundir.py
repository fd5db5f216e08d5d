"""The run-directory contract shared by every job; a run directory is a local path or a URI (dynboot.io.storage).

    <run>/config.yaml     resolved config; a rerun compares its own config with it (`RunDir.open`)
    <run>/metrics.jsonl   one JSON object per line, appended as the job goes
    <run>/summary.json    counts, errors, throughput, time per stage — written atomically at the end
    <run>/checkpoints/    model checkpoints (Hugging Face layout)
    <run>/quarantine/     *.jsonl: one JSON row per input that failed, exactly QUARANTINE_FIELDS (`quarantine_row`)
    <run>/*.png, report.md  what a person looks at

Every job that writes a run directory writes the first three (metrics.jsonl at least one row: progress or the final
figures); `contract_problems(run)` says what a directory lacks of this (the tests run it on every job's output).

    with RunDir(cfg.out).open(cfg, resume=cfg.resume) as rd:   # lock + config check + config.yaml
        rd.log(step=1, loss=0.3); rd.write_summary({...})

One job per run directory at a time: `open` takes a lock that a crashed job cannot leave stuck. On a local (or
NFS) directory it is a `flock` on `<run>/.lock`, which the kernel drops when the process dies. On object storage,
which has no locks, it is a lease object `<run>/_lock.json` whose owner refreshes a heartbeat; a lease not
refreshed for `LEASE_TTL_S` is stale and may be taken over (the window between two owners checking the lease at the
same instant is not closed: object stores without conditional writes offer nothing stronger; the read-back after
writing narrows it to the same second).

A rerun whose config differs from the recorded `config.yaml` stops with a message naming the fields that differ,
unless `resume="force"`; a config class lists the operational fields a rerun may change (`rerun_may_change`:
cluster address, actor counts, progress interval...). `resume="off"` sets the old run's entries aside (renamed
`<name>.old-<stamp>`) and starts over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from dynboot.io import storage

if TYPE_CHECKING:
    from dynboot.config import Config

__all__ = ["atomic_write_bytes", "atomic_write_text", "append_jsonl", "read_jsonl", "write_json", "RunDir",
           "RunDirBusy", "ConfigChanged", "ResumeMode", "config_differences", "LEASE_TTL_S", "QUARANTINE_FIELDS",
           "quarantine_row", "contract_problems"]

ResumeMode = Literal["auto", "force", "off"]
LEASE_TTL_S = 120.0
ALWAYS_MAY_CHANGE = frozenset({"resume"})
QUARANTINE_FIELDS = ("input", "path", "stage", "reason", "error_class", "error", "attempts")
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


class RunDirBusy(RuntimeError):
    """Another job holds the run directory."""


class ConfigChanged(ValueError):
    """A rerun's config differs from the one recorded in its run directory."""


def atomic_write_bytes(path: str | Path, data: bytes) -> str | Path:
    """Readers see the old file or the whole new one (local: temp file + rename; object storage: one PUT)."""
    storage.write_bytes(path, data)
    return path


def atomic_write_text(path: str | Path, text: str) -> str | Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> str | Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | Path, obj: dict[str, Any]) -> None:
    """Append one line to a local JSONL file (object storage has no append: RunDir.log buffers there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def quarantine_row(input_id: str | int, stage: str, reason: str, err: BaseException | None = None, *,
                   path: str = "", error: str = "", error_class: str = "", attempts: int = 1) -> dict[str, Any]:
    """One quarantine line, the same for every job: `input` is the input's id as its job names it (a video id, a
    manifest line, a benchmark item's index), `path` the file it came from ("" when none), `stage` where it failed,
    `reason` why (each job's closed set), `error` the message and `error_class` the exception's class (both from
    `err` unless given), `attempts` how many times it was tried."""
    if err is not None:
        error_class = error_class or type(err).__name__
        error = error or f"{type(err).__name__}: {err}"
    return {"input": input_id, "path": str(path or ""), "stage": stage, "reason": reason, "error_class": error_class,
            "error": (error or reason)[:2000], "attempts": int(attempts)}


def contract_problems(run: str | Path) -> list[str]:
    """What the run directory `run` (local or a URI) lacks of the contract (module doc); empty when it holds:
    config.yaml a YAML mapping, metrics.jsonl one JSON object a line and at least one, summary.json a JSON object,
    every line of quarantine/*.jsonl a JSON object with exactly QUARANTINE_FIELDS and a reason."""
    root, problems = storage.absolute(str(run)), []
    for name in RUN_FILES:
        if not storage.is_file(storage.join(root, name)):
            problems.append(f"no {name}")
            continue
        text = storage.read_text(storage.join(root, name))
        try:
            if name == "metrics.jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                wrong = "has no rows" if not rows else "" if all(isinstance(r, dict) for r in rows) else "has a non-object line"
            else:
                parsed = yaml.safe_load(text) if name == "config.yaml" else json.loads(text)
                wrong = "" if isinstance(parsed, dict) else "is not a mapping"
        except (ValueError, yaml.YAMLError) as err:
            wrong = f"does not parse: {err}"
        if wrong:
            problems.append(f"{name} {wrong}")
    for path in storage.list_files(storage.join(root, "quarantine"), suffixes=(".jsonl",)):
        for n, line in enumerate(storage.read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"quarantine/{storage.name(path)}:{n}"
            try:
                row = json.loads(line)
            except ValueError as err:
                problems.append(f"{where} does not parse: {err}")
                continue
            if not isinstance(row, dict) or set(row) != set(QUARANTINE_FIELDS):
                got = sorted(row) if isinstance(row, dict) else type(row).__name__
                problems.append(f"{where} has fields {got}, not {list(QUARANTINE_FIELDS)}")
            elif not row["reason"]:
                problems.append(f"{where} gives no reason")
    return problems


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_differences(old: dict, new: dict, may_change: frozenset[str] = frozenset()) -> dict[str, tuple]:
    """Dotted field -> (recorded, now) for every field that differs, except those a rerun may change (a name
    covers its nested fields too)."""
    a, b = _flatten(old), _flatten(new)
    allowed = may_change | ALWAYS_MAY_CHANGE
    diff = {}
    for key in sorted(set(a) | set(b)):
        if any(key == m or key.startswith(m + ".") for m in allowed):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diff[key] = (a.get(key, "<absent>"), b.get(key, "<absent>"))
    return diff


class RunDir:
    """Paths and files of one run directory (local path or URI), its metrics log and its lock."""

    def __init__(self, root: str | Path):
        self.uri_root = storage.absolute(str(root))
        self.remote = storage.is_uri(self.uri_root) and not self.uri_root.startswith("file://")
        if not self.remote:
            self.uri_root = storage.resolve(self.uri_root)[1]
            Path(self.uri_root).mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self._lock_file = None
        self._lease: _Lease | None = None
        self._pending: list[dict[str, Any]] = []  # metrics rows not yet flushed to object storage
        self._flushed_at = 0.0

    # ---- paths -----------------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The directory as a local Path (local run directories only)."""
        if self.remote:
            raise ValueError(f"{self.uri_root} is on object storage: use RunDir.uri(...) and dynboot.io.storage")
        return Path(self.uri_root)

    def uri(self, *parts: str) -> str:
        """A path inside the run directory, spelt like its root (URI or local path)."""
        return storage.join(self.uri_root, *parts)

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

    # ---- files -------------------------------------------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> str:
        write_json(self.uri(rel), obj)
        return self.uri(rel)

    def read_json(self, rel: str, default: Any = None) -> Any:
        return json.loads(storage.read_text(self.uri(rel))) if storage.exists(self.uri(rel)) else default

    def log(self, **metrics: Any) -> None:
        """Append a metrics row (object storage: buffered, the object rewritten at most every 10 s and on summary)."""
        row = {"time_s": round(time.time() - self.t0, 3), **metrics}
        if not self.remote:
            append_jsonl(self.uri("metrics.jsonl"), row)
            return
        self._pending.append(row)
        if time.time() - self._flushed_at > 10:
            self.flush()

    def flush(self) -> None:
        if self.remote and self._pending:
            lines = storage.read_text(self.uri("metrics.jsonl")) if storage.exists(self.uri("metrics.jsonl")) else ""
            lines += "".join(json.dumps(r, default=str) + "\n" for r in self._pending)
            storage.write_text(self.uri("metrics.jsonl"), lines)
            self._pending.clear()
        self._flushed_at = time.time()

    def metrics(self) -> list[dict[str, Any]]:
        self.flush()
        return read_jsonl(self.uri("metrics.jsonl"))

    def write_summary(self, summary: dict[str, Any]) -> str:
        self.flush()
        return self.write_json("summary.json", summary)

    # ---- one job at a time, with the config it was started with ------------------------------------------------
    def open(self, cfg: "Config", resume: ResumeMode = "auto", set_aside: tuple[str, ...] = ()) -> "RunDir":
        """Lock the run directory, check `cfg` against the recorded config, write config.yaml. Use as a context
        manager (`with RunDir(out).open(cfg) as rd:`) or call `close()`. `set_aside`: what `resume="off"` renames
        before starting over (besides config.yaml and metrics.jsonl)."""
        self.lock()
        try:
            new = cfg.model_dump(mode="json")
            recorded = self.uri("config.yaml")
            if resume == "off":
                self._set_aside(("config.yaml", "metrics.jsonl", "summary.json", *set_aside))
            elif storage.exists(recorded):
                old = yaml.safe_load(storage.read_text(recorded)) or {}
                diff = config_differences(old, new, frozenset(getattr(type(cfg), "rerun_may_change", ())))
                if diff and resume != "force":
                    lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, b_a in diff.items() for a, b in [b_a])
                    raise ConfigChanged(
                        f"{self.uri_root} holds a run with a different config ({lines}). Rerun with the recorded "
                        f"values to resume it, resume=force to continue it anyway, resume=off to start over, or use "
                        f"another out=")
            storage.write_text(recorded, yaml.safe_dump(new, sort_keys=False))
        except BaseException:
            self.close()
            raise
        return self

    def _set_aside(self, names: tuple[str, ...]) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in names:
            src = self.uri(n)
            if not storage.exists(src):
                continue
            if self.remote:
                raise ConfigChanged(f"resume=off on object storage would copy {src} aside object by object: "
                                    "use a new out= instead")
            os.replace(src, self.uri(f"{n}.old-{stamp}"))

    def lock(self) -> None:
        if self.remote:
            self._lease = _Lease(self.uri("_lock.json"))
            self._lease.acquire()
            return
        f = open(self.uri(".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RunDirBusy(f"run directory {self.uri_root} is in use by {owner}; wait for that job to finish "
                             "or use another out=") from None
        f.seek(0)
        f.truncate()
        f.write(_owner())
        f.flush()
        self._lock_file = f

    def close(self) -> None:
        """Flush metrics and release the lock (idempotent)."""
        try:
            self.flush()
        finally:
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()
                self._lock_file = None
            if self._lease is not None:
                self._lease.release()
                self._lease = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


class _Lease:
    """A lock object on object storage, kept alive by a heartbeat thread (see module doc)."""

    def __init__(self, uri: str, ttl_s: float = LEASE_TTL_S):
        self.uri, self.ttl_s, self.id = uri, ttl_s, uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        storage.write_text(self.uri, json.dumps({"id": self.id, "owner": _owner(), "heartbeat": time.time()}))

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.uri))
        except (FileNotFoundError, ValueError):
            return None

    def acquire(self) -> None:
        held = self._read()
        if held and time.time() - float(held.get("heartbeat", 0)) < self.ttl_s:
            raise RunDirBusy(f"run directory {storage.parent(self.uri)} is in use by {held.get('owner')} (lease "
                             f"refreshed {time.time() - held['heartbeat']:.0f} s ago; it expires {self.ttl_s:.0f} s "
                             "after its owner stops); wait for that job or use another out=")
        self._write()
        time.sleep(0.5)
        if (self._read() or {}).get("id") != self.id:
            raise RunDirBusy(f"run directory {storage.parent(self.uri)}: another job took the lease at the same time")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="dynboot-lease")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:  # a missed beat is fine (the lease lasts 4 beats); a dead thread would let another job in
                storage.retry(self._write, what="refreshing the run-directory lease")
            except Exception:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self._read() or {}).get("id") == self.id:
            storage.delete(self.uri)
