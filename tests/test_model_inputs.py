"""Images of any size and mode through every backend: one image policy per backend, owned by its tokenizer, the
same codes for the same image through `encode`, `collate` and the scoring path, batches of mixed sizes, and the
policy readable from a checkpoint without loading weights. `pytest tests/test_model_inputs.py`"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynboot.io.images import ImagePolicy
from dynboot.data.example import Example
from dynboot.models.causal_lm import CausalLMModel
from dynboot.models.registry import backend_class, load_model, policy_of_checkpoint
from dynboot.models.tiny import TinyWorldModel
from dynboot.world import WorldSpec

BACKENDS = ["tiny", "anole", "liquid", "janus"]
EXPECTED = {  # backend -> (kind, fill, resample) of its image policy
    "tiny": ("squash", (0, 0, 0), "nearest"),
    "anole": ("center_crop", (0, 0, 0), "lanczos"),
    "liquid": ("pad_square", (122, 116, 104), "lanczos"),
    "janus": ("letterbox", (127, 127, 127), "bicubic"),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def build(name: str):
    if name == "tiny":
        return TinyWorldModel.create(WorldSpec(), size="xxs", seed=0).eval()
    return backend_class(name).create("tiny", seed=0).eval()


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return build(request.param)


def odd_image(h: int = 333, w: int = 500, seed: int = 0, alpha: bool = True) -> np.ndarray:
    """A structured picture (gradients and blocks) of an odd size, partly transparent when `alpha`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
        img[y: y + 40, x: x + 40] = rng.integers(0, 256, 3)
    if not alpha:
        return img
    a = np.full((h, w, 1), 255, np.uint8)
    a[: h // 3, : w // 4] = 90
    return np.concatenate([img, a], -1)


def test_each_backend_owns_its_policy(model):
    p = model.tokenizer.policy
    assert isinstance(p, ImagePolicy) and p.size == model.tokenizer.image_size
    assert (p.kind, tuple(p.fill), p.resample) == EXPECTED[model.backend]


def test_odd_size_rgba_image_gives_the_same_codes_everywhere(model):
    tok, L = model.tokenizer, model.tokenizer.tokens_per_image
    img, other, square = odd_image(), odd_image(420, 260, seed=1, alpha=False), odd_image(64, 64, seed=2, alpha=False)
    codes = tok.encode([img])[0]
    assert codes.shape == (L,)
    assert torch.equal(tok.encode([tok.policy.apply(img)])[0], codes)  # the policy is what encode applies
    assert torch.equal(tok.encode([other, img, square])[1], codes)  # in a batch of mixed sizes
    # collate (training): the after image's target codes, in a batch of mixed sizes
    ex = [Example(other, img, "move the red circle left"), Example(square, other, "remove the circle")]
    batch = model.collate(ex, "fdp")
    targets = batch["label_codes"][0]
    assert torch.equal(targets[targets >= 0], codes)
    assert model.collate(ex, "idp")["input_ids"].shape[0] == 2
    # scoring (relabel, serve's verifier): any-size images score as their policy output, and as their codes
    got = model.action_logprob([other], [img], ["move the red circle left"])
    torch.testing.assert_close(got, model.action_logprob([tok.policy.apply(other)], tok.policy.apply(img)[None],
                                                         ["move the red circle left"]), atol=1e-6, rtol=0)
    if isinstance(model, CausalLMModel):
        torch.testing.assert_close(got, model.action_logprob([other], codes[None], ["move the red circle left"]),
                                   atol=1e-6, rtol=0)
    # captioning and sampling take mixed sizes too
    assert len(model.caption([img, square], [other, img], max_new_tokens=3)) == 2
    assert model.sample([img, square], ["a", "b"], n=2, seed=0).shape == (2, 2, L)


def test_policy_is_recorded_and_read_without_loading_weights(model, tmp_path):
    path = model.save(tmp_path / "m")
    assert policy_of_checkpoint(path) == model.tokenizer.policy
    assert load_model(path).tokenizer.policy == model.tokenizer.policy


@pytest.mark.parametrize("name", ["anole", "liquid", "janus"])
def test_policy_of_a_released_checkpoint_comes_from_its_config_files(name, tmp_path):
    model = build(name)
    path = model.save(tmp_path / name)
    (path / "dynboot.json").unlink()  # as released: no dynboot.json
    assert policy_of_checkpoint(path, backend=name) == model.tokenizer.policy
    with pytest.raises(FileNotFoundError, match="backend="):
        policy_of_checkpoint(path)
