"""Model registry: `backend=` name -> backend class, loaded lazily (real backends import heavy modules).

Every job config carries `backend=` and `model_path=`; `load_model(path)` reads the backend name from
the checkpoint's dynboot.json when `backend` is not given. A model path is a local directory or a URI
(`s3://...`, fetched once per node into a local cache by `dynboot.io.storage.local_model_dir`).
`policy_of_checkpoint(path)` gives a checkpoint's image policy from its small files, without loading weights.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

from dynboot.io import storage
from dynboot.io.images import ImagePolicy
from dynboot.models.base import UnifiedModel

BACKENDS: dict[str, str] = {
    "tiny": "dynboot.models.tiny:TinyWorldModel",
    "liquid": "dynboot.models.liquid:LiquidModel",
    "anole": "dynboot.models.anole:AnoleModel",
    "janus": "dynboot.models.janus:JanusProModel",
}
Reader = Callable[[str], "str | None"]  # a checkpoint file's text by relative name, None when it is absent


def register(name: str, target: str) -> None:
    """Add a backend: `target` is 'module.path:ClassName' of a UnifiedModel with a `load(path, ...)` classmethod."""
    BACKENDS[name] = target


def backend_class(name: str) -> type[UnifiedModel]:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(sorted(BACKENDS))}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def checkpoint_description(path: str | Path) -> dict:
    """dynboot.json of a checkpoint directory, or {} for a checkpoint as released (no dynboot.json)."""
    text = checkpoint_reader(path)("dynboot.json")
    return json.loads(text) if text else {}


def read_description(path: str | Path) -> dict:
    """dynboot.json of a checkpoint written by dynboot (an error naming the directory if there is none)."""
    desc = checkpoint_description(path)
    if not desc:
        raise FileNotFoundError(f"{path} has no dynboot.json: not a dynboot checkpoint directory")
    return desc


def checkpoint_backend(path: str | Path) -> str:
    desc = checkpoint_description(path)
    if "backend" not in desc:
        raise FileNotFoundError(f"{path}: no dynboot.json; pass backend= explicitly or point at a dynboot checkpoint")
    return desc["backend"]


def checkpoint_reader(path: str | Path) -> Reader:
    """Read small files of a checkpoint (local or URI) by name, without fetching the whole directory."""
    def read(name: str) -> str | None:
        f = storage.join(str(path), name)
        return storage.read_text(f) if storage.is_file(f) else None

    return read


def policy_of_checkpoint(path: str | Path, backend: str | None = None) -> ImagePolicy:
    """The image policy of a checkpoint, for CPU tasks that prepare images exactly as the model will:
    dynboot.json's `image_policy`, else the backend's default (`backend=`, needed for a checkpoint as released)
    at the image size its config files give."""
    read = checkpoint_reader(path)
    desc = json.loads(read("dynboot.json") or "{}")
    if "image_policy" in desc:
        return ImagePolicy.model_validate(desc["image_policy"])
    name = backend or desc.get("backend")
    if not name:
        raise FileNotFoundError(f"{path}: no dynboot.json; pass backend= to name the model family")
    return backend_class(name).default_policy(read)


def load_model(path: str | Path, backend: str | None = None, device: str = "cpu", **kwargs) -> UnifiedModel:
    """Load a checkpoint (a local directory, or a URI fetched once per node) behind the common interface."""
    local = storage.local_model_dir(path)
    name = backend or checkpoint_backend(local)
    if storage.is_uri(str(path)):
        kwargs["origin"] = str(path)  # an adapter saved later points at the URI, not at this node's cache
    return backend_class(name).load(local, device=device, **kwargs)
