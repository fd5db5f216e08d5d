"""The model interface on the tiny backend, and the method core (weights, best-of-N, plain loop).
`pytest tests/test_models.py`"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynboot.method.best_of_n import best_of_n
from dynboot.data.example import Example
from dynboot.models.registry import load_model
from dynboot.models.tiny import TinyWorldModel
from dynboot.training.trainer import LoopConfig, TrainLoop
from dynboot.method.weights import recognition_weights, weights_from_distance
from dynboot.world import WorldSpec, infer_action, render
from dynboot.world.augment import world_augmenter
from dynboot.world.generate import random_pairs

SPEC = WorldSpec()


@pytest.fixture(scope="module")
def pairs():
    ps = random_pairs(SPEC, 12, np.random.default_rng(0), set())
    before = np.stack([render(SPEC, a) for a, _ in ps])
    after = np.stack([render(SPEC, b) for _, b in ps])
    actions = [infer_action(SPEC, a, b).text(SPEC) for a, b in ps]
    return before, after, actions


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return TinyWorldModel.create(SPEC, size="xxs", seed=0).eval()


def _bias_towards(model, ids: range | list[int]):
    """A copy of the model whose output head strongly prefers the given token ids."""
    m = TinyWorldModel.create(SPEC, size="xxs", seed=0)
    m.net.load_state_dict(model.net.state_dict())
    with torch.no_grad():
        m.net.lm_head.weight[list(ids)] += 5.0 * m.net.model.norm.weight.sign()[None]
    return m.eval()


def test_fdp_samples_only_image_tokens_exactly_L(model, pairs):
    before, _, actions = pairs
    text_lover = _bias_towards(model, range(model.image_offset))  # the head now prefers text tokens
    for m in (model, text_lover):
        codes = m.sample(before[:4], actions[:4], n=3, temperature=1.0, seed=1)
        assert codes.shape == (4, 3, SPEC.cells)
        assert int(codes.min()) >= 0 and int(codes.max()) < m.tokenizer.codebook_size


def test_idp_captions_only_text(model, pairs):
    before, after, _ = pairs
    image_lover = _bias_towards(model, range(model.image_offset, model.net.config.vocab_size))
    for m in (model, image_lover):
        m.candidates = None  # unconstrained by the grammar: the text mask alone must hold
        for cap in m.caption(before[:4], after[:4], max_new_tokens=6):
            ids = m.text_ids(cap)
            assert all(i < m.image_offset for i in ids)
    model.candidates = model._candidates


def test_grammar_constrained_captions_are_valid_actions(model, pairs):
    from dynboot.world import parse, parse_action, valid_actions

    before, after, _ = pairs
    for b, cap in zip(before, model.caption(before, after)):
        assert parse_action(SPEC, cap) in valid_actions(SPEC, parse(SPEC, b)[0])


def test_action_logprob_batched_equals_single(model, pairs):
    before, after, actions = pairs
    batched = model.action_logprob(before, after, actions)
    single = torch.cat([model.action_logprob(before[i:i + 1], after[i:i + 1], actions[i:i + 1]) for i in range(len(actions))])
    assert torch.allclose(batched, single, atol=1e-5)
    codes = model.tokenizer.encode(after)  # codes and images give the same score
    assert torch.allclose(model.action_logprob(before, codes, actions), batched, atol=1e-6)


def test_kv_cache_matches_recompute(model, pairs):
    before, _, actions = pairs
    a = model.sample(before[:3], actions[:3], n=2, temperature=1.0, seed=7)
    b = model.sample(before[:3], actions[:3], n=2, temperature=1.0, seed=7, use_cache=False)
    assert torch.equal(a, b)
    assert torch.equal(a, model.sample(before[:3], actions[:3], n=2, temperature=1.0, seed=7))  # seeded



def full_logits(model, batch) -> torch.Tensor:
    """Logits at every position (the network's plain contract; the model's own paths read only what they need)."""
    with torch.no_grad():
        return model.net(**model._net_inputs(batch)).logits


def test_greedy_sampling_sees_the_training_layout(model, pairs):
    """Greedy codes fed back as the target image: the training forward's argmax at every code-predicting
    position must reproduce them (token, position and cell features of generation = those of training)."""
    before, _, actions = pairs
    codes = model.sample(before[:4], actions[:4], n=1, temperature=0)[:, 0]
    after = model.tokenizer.decode(codes)
    examples = [Example(before=before[i], after=after[i], action=actions[i]) for i in range(4)]
    batch = model.collate(examples, "fdp")
    with torch.no_grad():
        logits = full_logits(model, batch)
    predicts_code = batch["image_of"][:, 1:] == 1  # position j predicts the token at j+1
    teacher = model.image_logits(logits[:, :-1])[predicts_code].argmax(-1).reshape(4, -1)
    assert torch.equal(teacher, codes)

def test_weighted_loss_with_unit_weights_is_plain_ce(model, pairs):
    before, after, actions = pairs
    ex = [Example(before[i], after[i], actions[i]) for i in range(len(actions))]
    for task in ("idp", "fdp"):
        batch = model.collate(ex, task, torch.ones(len(ex), SPEC.cells) if task == "fdp" else None)
        labels = batch["input_ids"].masked_fill(batch["target_weights"] == 0, -100)
        logits = full_logits(model, batch)
        plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        assert torch.allclose(model.loss(batch), plain, atol=1e-5)
    w = torch.zeros(len(ex), SPEC.cells)  # zero weight on every image code: only <eos> is left to learn
    batch = model.collate(ex, "fdp", w)
    assert int((batch["target_weights"] > 0).sum()) == len(ex)


def test_save_load_identical_logits(model, pairs, tmp_path):
    before, after, actions = pairs
    model.save(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, TinyWorldModel) and loaded.spec == SPEC
    ex = [Example(before[i], after[i], actions[i]) for i in range(4)]
    b = model.collate(ex, "fdp")
    assert torch.equal(full_logits(model, b), full_logits(loaded, b))
    assert torch.equal(model.action_logprob(before, after, actions), loaded.action_logprob(before, after, actions))


def test_best_of_n_picks_highest_score(model, pairs):
    before, _, actions = pairs
    res = best_of_n(model, model, before[:3], actions[:3], n=6, seed=3)
    assert res.candidates.shape == (3, 6, SPEC.cells) and res.scores.shape == (3, 6)
    for i in range(3):  # each candidate re-scored alone by the verifier
        alone = torch.cat([model.action_logprob(before[i:i + 1], res.candidates[i, j:j + 1], actions[i:i + 1]) for j in range(6)])
        assert torch.allclose(alone, res.scores[i], atol=1e-5)
        assert int(res.index[i]) == int(alone.argmax()) and torch.equal(res.codes[i], res.candidates[i, res.index[i]])
    again = best_of_n(model, model, before[:3], actions[:3], n=6, seed=3)
    assert torch.equal(again.codes, res.codes)


def test_recognition_weights(pairs):
    before, after, _ = pairs
    from dynboot.world.render import GridTokenizer

    tok = GridTokenizer(SPEC)
    w = recognition_weights(tok, before, after, "relative")
    changed = tok.encode(before) != tok.encode(after)
    assert torch.all(w[~changed] == 1.0) and torch.all(w[changed] > 1.0)
    assert torch.allclose(w.mean(1), torch.full((len(w),), 2.0))  # 1 + d/mean(d) has mean 2
    same = recognition_weights(tok, before, before, "relative")
    assert torch.all(same == 1.0)
    d = torch.tensor([[0.0, 0.0, 3.0, 1.0]])
    assert torch.allclose(weights_from_distance(d, "floor", 0.05), torch.tensor([[0.05, 0.05, 3.05, 1.05]]))
    assert torch.all(weights_from_distance(d, "none") == 1)
    with pytest.raises(ValueError, match="unknown weighting"):
        weights_from_distance(d, "bogus")


def test_plain_loop_learns_and_is_deterministic(pairs):
    before, after, actions = pairs
    ex = [Example(before[i], after[i], actions[i]) for i in range(len(actions))]

    def run():
        m = TinyWorldModel.create(SPEC, size="xxs", seed=0)
        cfg = LoopConfig(task="idp", steps=30, batch_size=8, lr=3e-3, warmup=5, eval_every=0, threads=2)
        return TrainLoop(m, cfg, ex, augment=world_augmenter(SPEC)).run()

    h1, h2 = run(), run()
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    assert np.mean([r["loss"] for r in h1[-5:]]) < 0.6 * np.mean([r["loss"] for r in h1[:5]])
