"""Recognition weightings (dynboot.method.weights) on real tiny models: label independence, shapes, the paper's setting.
`pytest tests/test_weights.py`"""

import numpy as np
import pytest
import torch

from dynboot.data.example import Example
from dynboot.models.tiny import TinyWorldModel
from dynboot.training.trainer import LoopConfig, TrainLoop, make_batch
from dynboot.method.weights import (LABEL_INDEPENDENT, STRATEGIES, anneal_scale, model_weights,
                             recognition_weights, token_weights, weights_from_distance)
from dynboot.world import WorldSpec, infer_action, render
from dynboot.world.generate import random_pairs
from dynboot.world.render import GridTokenizer

SPEC = WorldSpec()


@pytest.fixture(scope="module")
def examples():
    ps = random_pairs(SPEC, 16, np.random.default_rng(1), set())
    return [Example(render(SPEC, a), render(SPEC, b), infer_action(SPEC, a, b).text(SPEC)) for a, b in ps]


@pytest.fixture(scope="module")
def model(examples):
    """A briefly trained FDP, so its predictions (and the weights read from them) are far from uniform."""
    torch.set_num_threads(2)
    m = TinyWorldModel.create(SPEC, size="xxs", seed=0)
    TrainLoop(m, LoopConfig(task="fdp", steps=25, batch_size=16, weighting="none", warmup=2, eval_every=0), examples).run()
    return m.eval()


def _relabel(model, examples, i: int, cell: int) -> list[Example]:
    """The same pairs with only the label of one target cell (pair i) changed to another code."""
    codes = model.tokenizer.encode(np.stack([e.after for e in examples]))
    codes[i, cell] = (codes[i, cell] + 1) % model.tokenizer.codebook_size
    after = model.tokenizer.decode(codes)
    return [Example(e.before, after[k], e.action) for k, e in enumerate(examples)]


@pytest.mark.parametrize("strategy", [s for s in LABEL_INDEPENDENT if s != "none"])
def test_label_independent_weights_do_not_depend_on_the_label_of_their_position(model, examples, strategy):
    for i, cell in ((0, 0), (3, 7), (5, 24)):
        w = token_weights(model, examples, strategy, alpha=4.0)
        w2 = token_weights(model, _relabel(model, examples, i, cell), strategy, alpha=4.0)
        assert w.shape == (len(examples), SPEC.cells)
        assert torch.allclose(w[:, : cell + 1], w2[:, : cell + 1], atol=1e-5)  # this cell and the ones before it
        assert torch.allclose(w[np.arange(len(w)) != i], w2[np.arange(len(w)) != i], atol=1e-5)  # other pairs
        if cell < SPEC.cells - 1:  # later cells are conditioned on the changed label (teacher forcing): they may move
            assert not torch.allclose(w[i, cell + 1:], w2[i, cell + 1:], atol=1e-6)


def test_paper_weights_do_depend_on_the_label(model, examples):
    """The property the model-based weights are tested for is one the paper's weights lack."""
    w = token_weights(model, examples, "relative")
    w2 = token_weights(model, _relabel(model, examples, 0, 0), "relative")
    assert w[0, 0] != w2[0, 0]


def test_model_weights_read_the_predicted_change_probability(model, examples):
    before = np.stack([e.before for e in examples])
    lp = model.image_logprobs(before, [e.action for e in examples], np.stack([e.after for e in examples]))
    assert lp.shape == (len(examples), SPEC.cells, model.tokenizer.codebook_size)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(len(examples), SPEC.cells), atol=1e-4)
    codes = model.tokenizer.encode(before)
    w = model_weights(lp, codes, "predicted_change", alpha=3.0)
    keep = torch.gather(lp.exp(), 2, codes[..., None])[..., 0]
    assert torch.allclose(w, 1 + 3.0 * (1 - keep), atol=1e-5)
    assert float(w.min()) >= 1.0 and float(w.max()) <= 4.0
    h = model_weights(lp, codes, "entropy", alpha=2.0)
    assert float(h.min()) >= 1.0 and float(h.max()) <= 3.0 + 1e-5
    assert torch.all(model_weights(lp, codes, "predicted_change", alpha=0.0) == 1.0)


def test_teacher_forced_logprobs_agree_with_the_sampler(model, examples):
    """Greedy sampling (KV cache, one code at a time) picks the argmax of the teacher-forced log-probs."""
    before, actions = np.stack([e.before for e in examples[:6]]), [e.action for e in examples[:6]]
    greedy = model.sample(before, actions, n=1, temperature=0)[:, 0]
    lp = model.image_logprobs(before, actions, greedy)
    assert torch.equal(lp.argmax(-1), greedy)


def test_paper_setting_unchanged(examples):
    tok = GridTokenizer(SPEC)
    before, after = np.stack([e.before for e in examples]), np.stack([e.after for e in examples])
    d = ((tok.features(before).float() - tok.features(after).float()) ** 2).sum(-1)
    w = recognition_weights(tok, before, after, "relative")
    assert torch.allclose(w, 1 + d / d.mean(-1, keepdim=True))  # Eq. 2, relative: 1 + d / mean(d)
    changed = tok.encode(before) != tok.encode(after)
    assert torch.all(w[~changed] == 1.0) and torch.all(w[changed] > 1.0)
    assert torch.all(recognition_weights(tok, before, before, "relative") == 1.0)
    dd = torch.tensor([[0.0, 0.0, 3.0, 1.0]])
    assert torch.allclose(weights_from_distance(dd, "floor", 0.05), torch.tensor([[0.05, 0.05, 3.05, 1.05]]))
    with pytest.raises(ValueError, match="unknown weighting"):
        weights_from_distance(dd, "bogus")


def test_annealed_weights_fall_to_plain_ce(model, examples):
    start = token_weights(model, examples, "relative_annealed", progress=0.0, anneal=0.5)
    assert torch.allclose(start, token_weights(model, examples, "relative"))
    half = token_weights(model, examples, "relative_annealed", progress=0.25, anneal=0.5)
    assert torch.allclose(half - 1, 0.5 * (start - 1))
    assert torch.all(token_weights(model, examples, "relative_annealed", progress=0.5, anneal=0.5) == 1.0)
    assert anneal_scale(0.9, 0.5) == 0.0 and anneal_scale(0.0, 0.5) == 1.0


def test_make_batch_puts_the_weights_on_the_target_codes(model, examples):
    cfg = LoopConfig(task="fdp", steps=10, weighting="predicted_change", weight_alpha=4.0)
    batch = make_batch(model, examples, "fdp", cfg, step=3)
    w = token_weights(model, examples, "predicted_change", alpha=4.0)
    on_b = batch["image_of"] == 1
    assert torch.allclose(batch["target_weights"][on_b].reshape(len(examples), -1), w, atol=1e-6)
    assert torch.all(batch["target_weights"][(~on_b) & (batch["target_weights"] > 0)] == 1.0)  # the end token
    assert make_batch(model, examples, "fdp", LoopConfig(task="fdp", weighting="none"))["target_weights"].max() == 1.0
    assert set(STRATEGIES) >= {"none", "relative", "floor", "predicted_change"}
    with pytest.raises(ValueError):
        LoopConfig(task="fdp", weighting="bogus")


def test_model_weighted_training_runs_and_learns(examples):
    m = TinyWorldModel.create(SPEC, size="xxs", seed=0)
    hist = TrainLoop(m, LoopConfig(task="fdp", steps=20, batch_size=16, weighting="predicted_change", warmup=2,
                                   eval_every=0), examples).run()
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert np.mean([h["loss"] for h in hist[-5:]]) < np.mean([h["loss"] for h in hist[:5]])
