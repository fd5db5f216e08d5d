"""Model registry: `backend=` name -> backend class, loaded lazily (real backends import heavy modules).

Every job config carries `backend=` and `model_path=`; `load_model(path)` reads the backend name from
the checkpoint's dynboot.json when `backend` is not given. Checkpoints are local directories only.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from dynboot.models.base import UnifiedModel

BACKENDS: dict[str, str] = {
    "tiny": "dynboot.models.tiny:TinyWorldModel",
    "liquid": "dynboot.models.liquid:LiquidModel",
    "anole": "dynboot.models.anole:AnoleModel",
    "janus": "dynboot.models.janus:JanusProModel",
}


def register(name: str, target: str) -> None:
    """Add a backend: `target` is 'module.path:ClassName' of a UnifiedModel with a `load(path, ...)` classmethod."""
    BACKENDS[name] = target


def backend_class(name: str) -> type[UnifiedModel]:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(sorted(BACKENDS))}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def checkpoint_backend(path: str | Path) -> str:
    meta = Path(path) / "dynboot.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{path}: no dynboot.json; pass backend= explicitly or point at a dynboot checkpoint")
    return json.loads(meta.read_text())["backend"]


def load_model(path: str | Path, backend: str | None = None, device: str = "cpu", **kwargs) -> UnifiedModel:
    """Load a checkpoint directory (Hugging Face layout, local files only) behind the common interface."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model_path {str(path)!r} is not a directory (checkpoints are local directories)")
    name = backend or checkpoint_backend(path)
    return backend_class(name).load(path, device=device, **kwargs)
