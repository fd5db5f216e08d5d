"""Checkpoints and training sized to what is trained, on the real backends (tiny random configs): adapter-only
saves when the base is on disk, a merged bfloat16 export, loading in a dtype, Janus's generation head in the
LoRA and its codes independent of the network dtype, and the chunked loss under a real DeepSpeed ZeRO-3 engine.
`pytest tests/test_model_checkpoints.py`"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from dynboot.data.example import Example
from dynboot.models.hf_parts import unwrap
from dynboot.models.registry import backend_class, load_model

BACKENDS = ["anole", "liquid", "janus"]
ACTIONS = ["move the red circle left", "swap the blue square and the red triangle", "remove a circle"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def build(name: str):
    return backend_class(name).create("tiny", seed=0)


def images(model, n: int, seed: int) -> np.ndarray:
    s = model.tokenizer.image_size
    return np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8)


def examples(model, n: int = 2) -> list[Example]:
    a, b = images(model, n, 1), images(model, n, 2)
    return [Example(a[i], b[i], ACTIONS[i % len(ACTIONS)]) for i in range(n)]


# ---- checkpoints sized to what is trained ----------------------------------------------------------------------
def _adapted(model, steps: int = 1):
    """`model` wrapped with its own LoRA config (modules_to_save included) after `steps` of FDP training."""
    from peft import get_peft_model

    model.net = get_peft_model(model.net, model.lora_config(rank=4, alpha=8, dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model.loss(model.collate(examples(model), "fdp", torch.rand(2, model.tokenizer.tokens_per_image)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", BACKENDS)
def test_adapter_only_save_when_the_base_is_on_disk(name, tmp_path):
    """A model loaded from a base directory and LoRA-trained saves its adapter alone, pointing at that base."""
    base = build(name).save(tmp_path / "base")
    model = _adapted(load_model(base))
    a, b = images(model, 2, 15), images(model, 2, 16)
    want = model.action_logprob(a, b, ACTIONS[:2])
    out = model.save(tmp_path / "trained")
    assert not list(out.glob("model*.safetensors")) and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "dynboot.json").read_text())["base_model_path"] == str(base.resolve())
    torch.testing.assert_close(load_model(out).action_logprob(a, b, ACTIONS[:2]), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", BACKENDS)
def test_merged_bfloat16_export_and_loading_in_dtype(name, tmp_path):
    model = _adapted(build(name))
    a, b = images(model, 2, 17), images(model, 2, 18)
    want = model.action_logprob(a, b, ACTIONS[:2])
    out = model.save(tmp_path / "merged", merged=True, dtype="bfloat16")
    assert not (out / "adapter").exists()
    with safe_open(str(next(out.glob("model*.safetensors"))), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if "vqmodel" not in k}
        assert not [k for k in f.keys() if "lora_" in k or "modules_to_save" in k or "original_module" in k]
    assert dtypes == {"BF16"}, dtypes
    # the in-memory model keeps its adapter (merged and unmerged again)
    torch.testing.assert_close(model.action_logprob(a, b, ACTIONS[:2]), want, atol=1e-5, rtol=0)
    merged = load_model(out, dtype="bfloat16")
    assert not isinstance(merged.net, PeftModel)
    assert {p.dtype for n, p in merged.net.named_parameters() if "vqmodel" not in n} == {torch.bfloat16}
    torch.testing.assert_close(merged.action_logprob(a, b, ACTIONS[:2]), want, atol=0.05, rtol=0.02)
    full = load_model(model.save(tmp_path / "merged32", merged=True))  # fp32 merge: the same numbers
    torch.testing.assert_close(full.action_logprob(a, b, ACTIONS[:2]), want, atol=1e-5, rtol=0)


def test_janus_lora_trains_its_generation_head_and_saves_it():
    model = build("janus")
    assert model.lora_config().modules_to_save == ["generation_head"]
    before = {k: v.clone() for k, v in unwrap(model.net).model.generation_head.state_dict().items()}
    model = _adapted(model, steps=2)
    trained = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert any("generation_head.modules_to_save" in n for n in trained)
    assert not any("vision_model" in n or "vqmodel" in n for n in trained)
    head = unwrap(model.net).model.generation_head.modules_to_save["default"]
    assert any(not torch.equal(v, before[k]) for k, v in head.state_dict().items())


def test_janus_codes_do_not_depend_on_the_network_dtype():
    """DeepSpeed's bf16 casts the whole network, its VQ model included: the tokenizer keeps its own fp32 copy."""
    model = build("janus")
    x = images(model, 2, 19)
    codes = model.tokenizer.encode(x)
    model.net.to(torch.bfloat16)  # what deepspeed.initialize(bf16) does to the module
    assert torch.equal(model.tokenizer.encode(x), codes)
    assert next(model.tokenizer.vq.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model.loss(model.collate(examples(model), "fdp")))
        assert torch.isfinite(model.action_logprob(x, images(model, 2, 20), ACTIONS[:2])).all()


def _zero_losses(stage: int) -> list[float]:
    """FDP losses of three steps through a one-process DeepSpeed engine (gloo, CPU), with the token budget and the
    logit chunk small enough that rows and logits are chunked, and activation checkpointing on; stage -1 = plain."""
    import os
    import socket

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    model = build("liquid").train()
    model.max_tokens, model.logit_chunk = 40, 64
    model.gradient_checkpointing(True)
    batch = model.collate(examples(model), "fdp", torch.linspace(0.1, 2, model.tokenizer.tokens_per_image).expand(2, -1))
    opt = torch.optim.AdamW(model.net.parameters(), lr=2e-3)
    net = model.net
    if stage >= 0:
        import deepspeed
        import torch.distributed as dist

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        net, *_ = deepspeed.initialize(model=model.net, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1 << 30,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}})  # every weight partitioned
    losses = []
    for _ in range(3):
        loss = model.loss(batch, net=net)
        if stage >= 0:
            net.backward(loss)
            net.step()
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss))
    return losses


@pytest.mark.slow
def test_chunked_loss_trains_identically_under_deepspeed_zero3():
    """The readouts (chunked rows, checkpointed logit chunks, image-code rows of the lm head) run inside the
    network's forward and call the head modules, so through a ZeRO-3 engine, every weight partitioned and
    activation checkpointing on, training follows plain AdamW."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        zero3, plain = pool.map(_zero_losses, [3, -1])
    assert plain[2] < plain[0] - 0.1
    # Adam amplifies the summation-order differences of ZeRO's flat buffers a little: 1e-3 after three steps
    np.testing.assert_allclose(zero3, plain, atol=1e-3, rtol=0)
