"""Which training checkpoints may be unpickled: only those this run directory wrote.

Trust boundary. Resuming a DeepSpeed checkpoint is the one place dynboot unpickles files (DeepSpeed's
`load_checkpoint` calls `torch.load(weights_only=False)`; everything else of ours is JSON, safetensors, Parquet, or
`torch.load(weights_only=True)`). So before a rank hands a checkpoint directory to DeepSpeed, it checks it against
the manifests our code wrote beside it when saving: each rank lists every file it wrote with its SHA-256 digest and
the run's id (`run.json` in the run directory, created when the run starts; `resume=off` starts a new id). A file
that no manifest lists, a digest that differs, a listed file that is absent, or a manifest of another run: the
checkpoint is refused with a message naming the file, and nothing in it is unpickled.

What this proves: the checkpoint is the one this run saved, unchanged (a truncated upload, a checkpoint copied in
from another run or another person, files swapped after the fact). It cannot stop someone who can write the run
directory and also rewrites the manifests; for that, set `DYNBOOT_CHECKPOINT_KEY` (a secret from the environment or
a secret store, never logged or written anywhere) on the driver and the workers: manifests then carry an
HMAC-SHA256 under the key, and only a holder of the key can produce a checkpoint that loads. Hashing costs one read
of the checkpoint per rank (it is read to be loaded anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

__all__ = ["write_manifest", "verify_checkpoint", "UntrustedCheckpoint", "KEY_ENV", "MANIFEST_PREFIX"]

KEY_ENV = "DYNBOOT_CHECKPOINT_KEY"
MANIFEST_PREFIX = "manifest_"


class UntrustedCheckpoint(RuntimeError):
    """A checkpoint directory that this run did not write (or that changed since): never unpickled."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and not p.name.startswith(MANIFEST_PREFIX))


def _signature(body: dict) -> str | None:
    key = os.environ.get(KEY_ENV)
    if not key:
        return None
    return hmac.new(key.encode(), json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def write_manifest(directory: str | Path, run_id: str, writer: str) -> Path:
    """List every file now under `directory` (what this writer saved there) with its digest."""
    directory = Path(directory)
    body = {"run_id": run_id, "writer": writer, "files": {f: _digest(directory / f) for f in _files(directory)}}
    sig = _signature(body)
    path = directory / f"{MANIFEST_PREFIX}{writer}.json"
    path.write_text(json.dumps(body | ({"hmac": sig} if sig else {}), indent=1))
    return path


def verify_checkpoint(directory: str | Path, run_id: str) -> None:
    """Raise UntrustedCheckpoint unless every file under `directory` is listed, unchanged, by this run's manifests."""
    directory = Path(directory)
    manifests = sorted(directory.glob(f"{MANIFEST_PREFIX}*.json"))
    where = f"checkpoint {directory.name}"
    if not manifests:
        raise UntrustedCheckpoint(f"{where} has no manifest: it was not written by this run's code, so it is not "
                                  "unpickled. Move it out of the run directory, or rerun with resume=off")
    listed: dict[str, str] = {}
    for m in manifests:
        try:
            data = json.loads(m.read_text())
        except ValueError:
            raise UntrustedCheckpoint(f"{where}: manifest {m.name} is not JSON") from None
        sig = data.pop("hmac", None)
        want = _signature(data)
        if want is not None and not (sig and hmac.compare_digest(sig, want)):
            raise UntrustedCheckpoint(f"{where}: manifest {m.name} is not signed with ${KEY_ENV}: refused")
        if data.get("run_id") != run_id:
            raise UntrustedCheckpoint(f"{where} belongs to another run (run id {data.get('run_id')!r}, this run "
                                      f"{run_id!r}): refused; rerun with resume=off to start over")
        listed.update(data.get("files", {}))
    present = _files(directory)
    for f in present:
        if f not in listed:
            raise UntrustedCheckpoint(f"{where}: {f} is listed in no manifest (added after the checkpoint was saved): refused")
        if _digest(directory / f) != listed[f]:
            raise UntrustedCheckpoint(f"{where}: {f} differs from what this run saved: refused")
    absent = sorted(set(listed) - set(present))
    if absent:
        raise UntrustedCheckpoint(f"{where} is incomplete: {absent[:3]} missing")
