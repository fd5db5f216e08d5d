"""`dynboot init-model`: random checkpoints of every real backend that `load_model` loads and that run every
interface method; `size=shapes` keeps the real vocabulary, image size and codes per image with a tiny
transformer. `pytest tests/test_init_model.py`"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dynboot.cli import main as cli
from dynboot.data.example import Example
from dynboot.models.registry import backend_class, load_model, policy_of_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("backend", ["anole", "liquid", "janus"])
def test_init_model_tiny_loads_and_runs_every_method(backend, tmp_path):
    out = tmp_path / backend
    assert cli(["init-model", f"backend={backend}", f"out={out}", "size=tiny", "seed=3"]) == 0
    model = load_model(out)
    assert model.backend == backend and policy_of_checkpoint(out) == model.tokenizer.policy
    tok, L = model.tokenizer, model.tokenizer.tokens_per_image
    rng = np.random.default_rng(0)
    a = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    b = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)]
    codes = tok.encode(b)
    assert codes.shape == (2, L) and tok.decode(codes).shape == (2, tok.image_size, tok.image_size, 3)
    assert tok.features(b).shape[:2] == (2, L)
    caps, scores = model.caption_scored(a, b, max_new_tokens=4)
    assert len(caps) == 2 and scores.shape == (2,) and torch.isfinite(scores).all()
    assert model.action_logprob(a, codes, ["move the red circle left", "remove the circle"]).shape == (2,)
    assert model.sample(a, ["move the red circle left", "remove the circle"], n=2, seed=0).shape == (2, 2, L)
    ex = [Example(a[i], b[i], "move the red circle left") for i in range(2)]
    for task in ("idp", "fdp"):
        loss = model.loss(model.collate(ex, task))
        assert torch.isfinite(loss)
    # the same seed writes the same weights
    again = tmp_path / "again"
    assert cli(["init-model", f"backend={backend}", f"out={again}", "size=tiny", "seed=3"]) == 0
    assert torch.equal(load_model(again).action_logprob(a, codes, ["x", "y"]), model.action_logprob(a, codes, ["x", "y"]))


@pytest.mark.parametrize("backend, vocab, codes, per_image, image_size", [
    ("anole", 65536, 8192, 1024, 512),
    ("janus", 102400, 16384, 576, 384),
    pytest.param("liquid", 256000 + 8192, 8192, 1024, 512, marks=pytest.mark.slow),  # a 256k-word tokenizer: ~30 s
])
def test_shapes_keep_the_real_vocabulary_and_image_codes(backend, vocab, codes, per_image, image_size):
    model = backend_class(backend).create("shapes", seed=0)
    base = model.net
    text_vocab = base.config.text_config.vocab_size if backend == "janus" else base.config.vocab_size
    assert text_vocab == vocab
    tok = model.tokenizer
    assert (tok.codebook_size, tok.tokens_per_image, tok.image_size) == (codes, per_image, image_size)
    assert sum(p.numel() for p in base.parameters()) < 5e7  # a tiny transformer around the real vocabulary
    assert model.options()["max_tokens"] == "auto" and model.max_tokens == 32768  # "auto" on a CPU: the default budget
    if backend == "anole":  # 8192 Chameleon image tokens inside the 65536-token vocabulary
        assert len(model.image_token_ids) == 8192 and int(model.image_token_ids.max()) < vocab


def test_init_model_rejects_what_does_not_exist(tmp_path, capsys):
    assert cli(["init-model", "backend=liquid", f"out={tmp_path / 'x'}", "size=full-1b"]) == 1
    assert "janus only" in capsys.readouterr().err
    assert cli(["init-model", "backend=emu3", f"out={tmp_path / 'y'}"]) == 2


def test_checkpoints_on_object_storage(bucket, tmp_path, monkeypatch):
    """init-model writes to a URI; load_model fetches it once per node; the policy is read from dynboot.json
    alone; a LoRA model loaded from the URI saves an adapter that points at the URI, not at this node's cache."""
    from peft import get_peft_model

    from dynboot.io import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    uri = f"{bucket}/models/anole-tiny"
    assert cli(["init-model", "backend=anole", f"out={uri}", "size=tiny"]) == 0
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    policy = policy_of_checkpoint(uri)  # small files only: nothing fetched yet
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    model = load_model(uri)
    assert model.tokenizer.policy == policy and model.base_path == uri
    model.net = get_peft_model(model.net, model.lora_config(rank=2, alpha=4))
    out = model.save(tmp_path / "adapter")
    assert json.loads((out / "dynboot.json").read_text())["base_model_path"] == uri
    x = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(load_model(out).action_logprob(x, x, ["a"]), model.action_logprob(x, x, ["a"]))
