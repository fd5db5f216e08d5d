"""The memory-bounded model paths against straightforward references written here, on every backend (tiny world
model + anole, liquid, janus at tiny sizes): scores, losses and their gradients from full-vocabulary logits at
every position (within 1e-5), sampled codes from a teacher-forcing sampler that recomputes the whole sequence
with a CPU generator (same seed -> same codes), one-pass captions against `action_logprob`, chunking under a
token budget, and that no forward ever applies the output head to a whole [B, S, H] batch.
`pytest tests/test_model_paths.py`"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynboot.data.example import Example
from dynboot.models.heads import SelectiveLinear
from dynboot.models.hf_parts import unwrap
from dynboot.models.registry import backend_class
from dynboot.models.tiny import TinyWorldModel
from dynboot.world import WorldSpec, infer_action, render
from dynboot.world.generate import random_pairs

BACKENDS = ["tiny", "anole", "liquid", "janus"]
ACTIONS = ["move the red circle left", "swap the blue square and the red triangle", "remove the circle"]
SPEC = WorldSpec()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def build(name: str):
    if name == "tiny":
        return TinyWorldModel.create(SPEC, size="xxs", seed=0).eval()
    return backend_class(name).create("tiny", seed=0).eval()


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return build(request.param)


def data(model, n: int = 3, seed: int = 0):
    """(before, after, actions): world frames for the tiny model, random images of the tokenizer's size else."""
    if model.backend == "tiny":
        ps = random_pairs(SPEC, n, np.random.default_rng(seed), set())
        return (np.stack([render(SPEC, a) for a, _ in ps]), np.stack([render(SPEC, b) for _, b in ps]),
                [infer_action(SPEC, a, b).text(SPEC) for a, b in ps])
    s, rng = model.tokenizer.image_size, np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8), rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
            [ACTIONS[i % len(ACTIONS)] for i in range(n)])


# ---- references ------------------------------------------------------------------------------------------------
def full_logits(model, batch, net=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits at every position of a batch: the lm head over the whole vocabulary, and the image head (lm head
    rows of the image codes, or Janus's generation head) in code order."""
    base = unwrap(net or model.net)
    h = base.backbone(**model._net_inputs(batch), use_cache=False).last_hidden_state
    lm = F.linear(h, base.lm_head.weight, base.lm_head.bias).float()
    if model.backend == "janus":
        return lm, base.model.generation_head(h).float()
    return lm, model.image_logits(lm)


def reference_loss(model, batch, net=None) -> torch.Tensor:
    lm, img = full_logits(model, batch, net)
    w = batch["target_weights"][:, 1:]
    ids, codes = batch["input_ids"][:, 1:], batch["label_codes"][:, 1:]
    ce_text = F.cross_entropy(lm[:, :-1].transpose(1, 2), ids, reduction="none")
    ce_img = F.cross_entropy(img[:, :-1].transpose(1, 2), codes.clamp(min=0), reduction="none")
    on_codes = (codes >= 0) if model.fdp_loss_over == "codes" else torch.zeros_like(codes, dtype=torch.bool)
    ce = torch.where(on_codes, ce_img, ce_text)
    return (ce * w).sum() / w.sum()


def reference_score(model, before, after, actions) -> torch.Tensor:
    batch = model._idp_batch(before, after, [model.text_ids(a) for a in actions], False)
    lm, _ = full_logits(model, batch)
    logp = torch.log_softmax(lm[:, :-1], -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    m = batch["target"][:, 1:].float()
    return (logp * m).sum(1) / m.sum(1)


def reference_sample(model, before, actions, n, temperature, top_k, seed, cfg) -> torch.Tensor:
    """Teacher forcing step by step: the training layout with the codes drawn so far (later positions hold
    dummies the causal mask hides), the whole sequence recomputed, the image logits of the position that
    predicts code t, CFG, temperature, top-k, one multinomial draw per step from a CPU generator."""
    L, B = model.tokenizer.tokens_per_image, len(actions)
    gen = torch.Generator().manual_seed(seed)
    ids = [model.text_ids(a) for a in actions]
    rows_before = np.repeat(before, n, 0)
    rows_ids = [i for i in ids for _ in range(n)]
    if cfg != 1.0:
        rows_before, rows_ids = np.concatenate([rows_before, rows_before]), rows_ids + [[] for _ in rows_ids]
    codes = torch.zeros((B * n, L), dtype=torch.long)
    for t in range(L):
        after = codes.repeat(len(rows_ids) // (B * n), 1)
        batch = model._fdp_batch(rows_before, rows_ids, after, True)
        _, img = full_logits(model, batch)
        predicts = torch.cat([(batch["image_of"][:, 1:] == 1) & (batch["cell_of"][:, 1:] == t),
                              torch.zeros_like(batch["image_of"][:, :1], dtype=torch.bool)], 1)
        logits = img[predicts]  # one position per row
        if cfg != 1.0:
            logits = logits[B * n:] + cfg * (logits[: B * n] - logits[B * n:])
        if temperature <= 0:
            codes[:, t] = logits.argmax(-1)
            continue
        logits = logits / temperature
        if top_k:
            logits = logits.masked_fill(logits < torch.topk(logits, top_k, -1).values[:, -1:], float("-inf"))
        codes[:, t] = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
    return codes.reshape(B, n, L)


# ---- scores and losses -------------------------------------------------------------------------------------------
def test_action_logprob_equals_full_vocabulary_reference(model):
    before, after, actions = data(model)
    with torch.no_grad():
        want = reference_score(model, before, after, actions)
    torch.testing.assert_close(model.action_logprob(before, after, actions), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["idp", "fdp"])
def test_loss_and_gradients_equal_reference(model, task):
    before, after, actions = data(model)
    ex = [Example(before[i], after[i], actions[i]) for i in range(len(actions))]
    w = torch.linspace(0.1, 3, model.tokenizer.tokens_per_image).expand(len(ex), -1) if task == "fdp" else None
    batch = model.collate(ex, task, w)
    params = [p for p in model.net.parameters() if p.requires_grad]

    def grads(fn):
        model.net.zero_grad(set_to_none=True)
        value = fn()
        value.backward()
        return value.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    want, want_g = grads(lambda: reference_loss(model, batch))
    for budget, chunk in [(None, model.logit_chunk), (40, 64)]:  # unbounded; 40 tokens per forward, 64 logits per chunk
        model.max_tokens, model.logit_chunk = budget, chunk
        try:
            got, got_g = grads(lambda: model.loss(batch))
        finally:
            model.max_tokens, model.logit_chunk = None, 1 << 25
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for g, r in zip(got_g, want_g):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    model.net.zero_grad(set_to_none=True)


def test_fdp_loss_normalisation_is_documented_per_backend(model):
    """Real backends normalise FDP image targets over the image codes (the sampler's distribution); the tiny
    world model over its whole vocabulary (the quickstart's numbers)."""
    assert model.fdp_loss_over == ("vocab" if model.backend == "tiny" else "codes")


# ---- sampling ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, temperature, top_k", [(1.0, 1.0, 0), (1.0, 0.7, 5), (2.5, 1.0, 0), (1.0, 0.0, 0)])
def test_sample_equals_teacher_forcing_reference(model, cfg, temperature, top_k):
    before, _, actions = data(model, 2, seed=1)
    got = model.sample(before, actions, n=3, temperature=temperature, top_k=top_k, seed=5, guidance_scale=cfg)
    with torch.no_grad():
        want = reference_sample(model, before, actions, 3, temperature, top_k, 5, cfg)
    assert got.shape == want.shape and torch.equal(got, want)


def test_sample_is_budget_chunked_and_deterministic(model):
    before, _, actions = data(model, 3, seed=2)
    per_prompt = model.token_cost("sample", 1, text_tokens=max(len(model.text_ids(a)) for a in actions))
    model.max_tokens = 2 * per_prompt  # two candidate rows per forward: prompts and candidates are split
    try:
        with _Passes(model) as passes:
            a = model.sample(before, actions, n=4, seed=9)
        b = model.sample(before, actions, n=4, seed=9)
    finally:
        model.max_tokens = None
    assert a.shape == (3, 4, model.tokenizer.tokens_per_image) and torch.equal(a, b)
    assert max(rows for rows, _ in passes.shapes) <= 2
    assert 0 <= int(a.min()) and int(a.max()) < model.tokenizer.codebook_size


def test_image_logprobs_are_the_samplers_teacher_forced_distribution(model):
    """image_logprobs (what model-based weights and the FDP-likelihood verifier read) is the sampler's own
    distribution: greedy codes are its argmax at every cell, and it sums to 1 over the codebook."""
    before, _, actions = data(model, 2, seed=4)
    greedy = model.sample(before, actions, n=1, temperature=0)[:, 0]
    lp = model.image_logprobs(before, actions, greedy)
    assert lp.shape == (2, model.tokenizer.tokens_per_image, model.tokenizer.codebook_size)
    assert torch.equal(lp.argmax(-1), greedy)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:2]), atol=1e-4, rtol=0)


# ---- captions with their own score -------------------------------------------------------------------------------
def test_caption_scored_equals_caption_and_action_logprob_with_one_prefill(model):
    before, after, _ = data(model, 4, seed=3)
    for max_new in (3, 12):  # the short limit cuts captions: their score still closes with log p(<eos>)
        with _Passes(model) as passes:
            texts, scores = model.caption_scored(before, after, max_new_tokens=max_new)
        prefills = [s for s in passes.shapes if s[1] > 1]
        assert prefills == [(4, prefills[0][1])], "one prefill pass for the whole batch"
        assert texts == model.caption(before, after, max_new_tokens=max_new)
        usable = [i for i, t in enumerate(texts) if model.text_tokenizer.decode(model.text_ids(t)).strip() == t]
        assert usable, texts
        want = model.action_logprob(before[usable], after[usable], [texts[i] for i in usable])
        torch.testing.assert_close(scores[usable], want, atol=1e-5, rtol=0)


def test_budget_chunks_scoring_and_captions_without_changing_them(model):
    before, after, actions = data(model, 3, seed=4)
    want_scores = model.action_logprob(before, after, actions)
    want_caps = model.caption_scored(before, after, max_new_tokens=5)
    model.max_tokens = model.token_cost("caption", max_new_tokens=5)  # one row per forward
    try:
        with _Passes(model) as passes:
            scores = model.action_logprob(before, after, actions)
            caps = model.caption_scored(before, after, max_new_tokens=5)
    finally:
        model.max_tokens = None
    assert max(rows for rows, _ in passes.shapes) == 1
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)
    assert caps[0] == want_caps[0]
    torch.testing.assert_close(caps[1], want_caps[1], atol=1e-5, rtol=0)
    assert model.rows_per_forward("score") >= 1 and model.token_cost("sample", 4) > model.token_cost("sample", 1)


# ---- the output head is never applied to a whole batch ------------------------------------------------------------
def test_output_head_reads_only_needed_rows(model):
    """Every call of the lm head sees [N, H] rows (never [B, S, H]), at most `logit_chunk` logits' worth when
    log-probs are taken, and only the image-code rows when sampling."""
    head = unwrap(model.net).lm_head
    assert isinstance(head, SelectiveLinear)
    calls: list[tuple[tuple[int, ...], object]] = []
    handle = head.register_forward_hook(lambda m, args, kwargs, out: calls.append((tuple(args[0].shape), kwargs.get("rows"))),
                                        with_kwargs=True)
    before, after, actions = data(model)
    model.logit_chunk = 2 * head.out_features  # at most two positions per chunk
    try:
        model.action_logprob(before, after, actions)
        model.loss(model.collate([Example(before[i], after[i], actions[i]) for i in range(3)], "idp"))
        scored = list(calls)
        calls.clear()
        model.sample(before[:1], actions[:1], n=2, seed=0)
    finally:
        model.logit_chunk = 1 << 25
        handle.remove()
    assert scored and all(len(shape) == 2 and shape[0] <= 2 for shape, _ in scored)
    if model.backend != "janus":  # janus samples through its generation head
        assert calls and all(rows is not None for _, rows in calls)


class _Passes:
    """(rows, sequence length) of every language-model pass."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        layer = unwrap(model.net).get_submodule(model.lora_target_modules()[0] if model.backend != "tiny"
                                                else "model.layers.0.self_attn.q_proj")
        self.handle = layer.register_forward_hook(lambda m, args, out: self.shapes.append(tuple(args[0].shape[:2])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---- activation checkpointing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = build(name).train()
    before, after, actions = data(model)
    batch = model.collate([Example(before[i], after[i], actions[i]) for i in range(3)], "fdp")
    assert model.gradient_checkpointing() is False  # default: off below a billion parameters
    torch.manual_seed(0)
    model.loss(batch).backward()
    want = {n: p.grad.clone() for n, p in model.net.named_parameters() if p.grad is not None}
    model.net.zero_grad(set_to_none=True)
    assert model.gradient_checkpointing(True) is True and unwrap(model.net).is_activation_checkpointing
    torch.manual_seed(0)
    model.loss(batch).backward()
    got = {n: p.grad for n, p in model.net.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)
    assert model.gradient_checkpointing(False) is False and not unwrap(model.net).is_activation_checkpointing
