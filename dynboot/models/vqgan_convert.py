"""`dynboot convert-vqgan`: the released Chameleon/Anole `vqgan.ckpt` (a PyTorch Lightning pickle) -> safetensors,
once, by explicit request. Loading a model never unpickles anything (vqgan.read_state_dict).

A Lightning checkpoint of the taming VQ-GAN holds, besides the `state_dict` of tensors: epoch / global_step /
version numbers, `optimizer_states` / `lr_schedulers` (plain containers of tensors), and `callbacks`, which
Lightning < 1.5 (the taming-transformers era) keys by the callback *class*
(`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`) and whose monitored scores may be numpy
scalars. Those few names are the allow-list. Each is bound to an inert stand-in defined here (never the real
Lightning or numpy code), so even an allowed name cannot run anything: `torch.load(weights_only=True)` under
`torch.serialization.safe_globals` with the stand-ins. Any other global in the file is refused by name before
the pickle is touched.

    dynboot convert-vqgan ckpt=/ckpt/anole/tokenizer/vqgan.ckpt      # writes vqgan.safetensors beside it
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import save_file

from dynboot.config import Config
from dynboot.models.vqgan import SAFETENSORS_NAME, _weights


class _Inert:
    """Stands in for an allowed class or function of a Lightning checkpoint: keeps its arguments, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _inert(*args, **kwargs) -> _Inert:
    return _Inert(*args, **kwargs)


class ModelCheckpoint(_Inert):
    """Stand-in for pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint (a `callbacks` dict key)."""


class EarlyStopping(_Inert):
    """Stand-in for pytorch_lightning.callbacks.early_stopping.EarlyStopping."""


class NumpyDtype(_Inert):
    """Stand-in for numpy.dtype (the dtype of a numpy scalar score)."""


ALLOWED = {  # pickle GLOBAL -> inert stand-in
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": ModelCheckpoint,
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping": EarlyStopping,
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint": ModelCheckpoint,
    "numpy.core.multiarray.scalar": _inert,
    "numpy._core.multiarray.scalar": _inert,
    "numpy.dtype": NumpyDtype,
}


class ConvertVQGANConfig(Config):
    """Convert a trusted Lightning vqgan.ckpt to vqgan.safetensors (dynboot convert-vqgan)."""

    ckpt: str = Field(..., description="The released vqgan.ckpt (Chameleon/Anole tokenizer/ folder).")
    out: str = Field("", description="Directory for vqgan.safetensors (+ a copy of vqgan.yaml); empty = beside the ckpt.")


def convert_vqgan(ckpt: str | Path, out: str | Path | None = None) -> Path:
    """Write `vqgan.safetensors` from `ckpt` (refusing any global outside `ALLOWED`); returns its path."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint file")
    unknown = [g for g in _globals(ckpt) if g not in ALLOWED]
    if unknown:
        raise ValueError(f"{ckpt} pickles {unknown}, which a Lightning VQ-GAN checkpoint does not hold; refusing to "
                         f"unpickle it (allowed: {sorted(ALLOWED)})")
    stand_ins = [(obj, name) for name, obj in ALLOWED.items()]
    try:
        with torch.serialization.safe_globals(stand_ins):
            raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{ckpt}: refused while unpickling ({str(err).splitlines()[0]})") from None
    state = {k: v.contiguous() for k, v in _weights(raw).items()}
    folder = Path(out) if out else ckpt.parent
    folder.mkdir(parents=True, exist_ok=True)
    yaml_src = ckpt.parent / "vqgan.yaml"
    if folder != ckpt.parent and yaml_src.is_file():
        (folder / "vqgan.yaml").write_text(yaml_src.read_text())
    save_file(state, str(folder / SAFETENSORS_NAME))
    return folder / SAFETENSORS_NAME


def _globals(ckpt: Path) -> list[str]:
    """Every pickle GLOBAL the file needs beyond torch's own safe set (read statically, nothing executed)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(ckpt)
    except ValueError:  # a legacy (non-zip) file: the weights-only unpickler below still refuses unknown globals
        return []


def main(cfg: ConvertVQGANConfig) -> None:
    path = convert_vqgan(cfg.ckpt, cfg.out or None)
    print(f"wrote {path}: load_model / VQGANTokenizer.load now read it (the .ckpt is no longer needed)")
