"""No code from checkpoints: a malicious `vqgan.ckpt` (a pickle whose `__reduce__` touches a file) loaded every way
the code can load it -- VQGANTokenizer.load, the liquid and anole loaders, `dynboot convert-vqgan` -- never runs
(the file is never touched) and the error says how to convert a trusted checkpoint; a checkpoint in the
released Lightning format (its callback class as a dict key, numpy scalars) converts once, with only inert
stand-ins for those names, and then loads from safetensors. `pytest tests/test_checkpoint_safety.py`"""

from __future__ import annotations

import pathlib
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from dynboot.cli import main as cli
from dynboot.models.registry import backend_class, load_model
from dynboot.models.vqgan import VQGANConfig, VQGANTokenizer


class Touch:
    """Unpickling this creates `marker`: what a malicious checkpoint would do (run code)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def vqgan_dir(tmp_path: pathlib.Path, payload: dict | None = None) -> tuple[pathlib.Path, VQGANTokenizer]:
    """vqgan.yaml + a vqgan.ckpt holding `payload` beside the state dict (no safetensors)."""
    tok = VQGANTokenizer.create(VQGANConfig.tiny(), seed=3)
    folder = tmp_path / "vq"
    tok.save(folder)
    (folder / "vqgan.safetensors").unlink()
    torch.save({"state_dict": tok.vqgan.state_dict(), **(payload or {})}, folder / "vqgan.ckpt")
    return folder, tok


@pytest.fixture
def lightning_names():
    """Make pickles that name Lightning's ModelCheckpoint class (as the release's `callbacks` dict does),
    without Lightning installed; the names are gone again before anything is loaded."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[names[-1]].ModelCheckpoint = cls
    sys.modules.update(mods)
    yield cls
    for n in names:
        sys.modules.pop(n, None)


def test_malicious_vqgan_ckpt_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    folder, _ = vqgan_dir(tmp_path, {"hyper_parameters": Touch(marker)})
    with pytest.raises(ValueError, match="dynboot convert-vqgan"):
        VQGANTokenizer.load(folder)
    for name in ("liquid", "anole"):  # the model loaders, with the VQ-GAN files beside the model or via vqgan_path
        model_dir = backend_class(name).create("tiny", seed=0).save(tmp_path / name)
        for f in ("vqgan.yaml", "vqgan.safetensors"):
            (model_dir / f).unlink()
        with pytest.raises(ValueError, match="dynboot convert-vqgan"):
            load_model(model_dir, vqgan_path=str(folder))
        shutil.copy(folder / "vqgan.yaml", model_dir)
        shutil.copy(folder / "vqgan.ckpt", model_dir)
        with pytest.raises(ValueError, match="never unpickled"):
            load_model(model_dir)
    # the explicit conversion refuses it too, naming what it would have run
    assert cli(["convert-vqgan", f"ckpt={folder / 'vqgan.ckpt'}"]) == 1
    assert not (folder / "vqgan.safetensors").exists()
    assert not marker.exists()


def test_convert_names_the_refused_global(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder, _ = vqgan_dir(tmp_path, {"x": Touch(marker)})
    assert cli(["convert-vqgan", f"ckpt={folder / 'vqgan.ckpt'}"]) == 1
    assert "pathlib" in capsys.readouterr().err and not marker.exists()


def test_released_lightning_format_converts_once_then_loads_from_safetensors(tmp_path, lightning_names):
    payload = {"epoch": 0, "global_step": 190000, "pytorch-lightning_version": "1.0.8",
               "callbacks": {lightning_names: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.25),
                                               "current_score": np.float64(0.3), "best_model_path": "last.ckpt"}},
               "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 4.5e-6}]}],
               "lr_schedulers": []}
    folder, tok = vqgan_dir(tmp_path, payload)
    for n in list(sys.modules):  # nothing of "Lightning" is importable while loading
        if n.startswith("pytorch_lightning"):
            sys.modules.pop(n)
    with pytest.raises(ValueError, match="convert-vqgan"):  # a plain load still refuses it
        VQGANTokenizer.load(folder)
    out = tmp_path / "converted"
    assert cli(["convert-vqgan", f"ckpt={folder / 'vqgan.ckpt'}", f"out={out}"]) == 0
    assert (out / "vqgan.safetensors").is_file() and (out / "vqgan.yaml").is_file()
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    loaded = VQGANTokenizer.load(out)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert np.array_equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))
    assert "pytorch_lightning" not in sys.modules  # converting imported nothing of it
