"""Model registry: `backend=` name -> backend class, loaded lazily (real backends import heavy modules).

Every job config carries `backend=` and `model_path=`; `load_model(path)` reads the backend name from
the checkpoint's dynboot.json when `backend` is not given. Checkpoints are local directories only.
`policy_of_checkpoint(path)` gives a checkpoint's image policy without loading it.
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


def checkpoint_description(path: str | Path) -> dict:
    """dynboot.json of a checkpoint directory, or {} for a checkpoint as released (no dynboot.json)."""
    meta = Path(path) / "dynboot.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


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


def policy_of_checkpoint(path: str | Path, backend: str | None = None):
    """The image policy of a checkpoint, read from its files without loading any weights (for CPU decode tasks
    that must prepare images exactly as the model will): dynboot.json's `image_policy`, else the default of the
    backend (`backend=`, required for a checkpoint as released) at the image size its config files give."""
    from dynboot.models.image_policy import ImagePolicy

    desc = checkpoint_description(path)
    if "image_policy" in desc:
        return ImagePolicy.from_dict(desc["image_policy"])
    name = backend or checkpoint_backend(path)
    return backend_class(name).default_policy(Path(path))


def load_model(path: str | Path, backend: str | None = None, device: str = "cpu", **kwargs) -> UnifiedModel:
    """Load a checkpoint directory (Hugging Face layout, local files only) behind the common interface."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model_path {str(path)!r} is not a directory (checkpoints are local directories)")
    name = backend or checkpoint_backend(path)
    return backend_class(name).load(path, device=device, **kwargs)
