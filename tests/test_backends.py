"""One interface suite for the real backends (anole, liquid, janus), each built from config objects at a
tiny size with random weights and an offline tokenizer (no downloads), plus the checks specific to each:
the released VQ-GAN file layout, Chameleon's unmasked logits and BPE image ids, Janus's vision-tower LoRA trap.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from dynboot.data.example import Example
from dynboot.models.causal_lm import CausalLMModel
from dynboot.models.hf_parts import unwrap
from dynboot.models.registry import backend_class, load_model
from dynboot.models.vqgan import VQGAN, VQGANConfig, VQGANTokenizer, chameleon_policy, to_pixels, to_uint8

BACKENDS = ["anole", "liquid", "janus"]
ACTIONS = ["move the red circle left", "swap the blue square and the red triangle", "remove a circle"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def build(name: str):
    return backend_class(name).create("tiny", seed=0)


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return build(request.param)


def images(model, n: int, seed: int, size: int | None = None) -> np.ndarray:
    s = size or model.tokenizer.image_size
    return np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8)


def examples(model, n: int = 2) -> list[Example]:
    a, b = images(model, n, 1), images(model, n, 2)
    return [Example(a[i], b[i], ACTIONS[i % len(ACTIONS)]) for i in range(n)]


def tokenizer_modules(model) -> list[torch.nn.Module]:
    """What must stay frozen and untouched by LoRA: the image tokenizer and any vision tower."""
    base = unwrap(model.net)
    mods = [getattr(model.tokenizer, "vqgan", None) or model.tokenizer.vq]
    for name in ("vqmodel", "vision_model"):
        if hasattr(base.model, name):
            mods.append(getattr(base.model, name))
    return mods


def lora_wrap(model, seed: int = 0):
    model.net = get_peft_model(model.net, LoraConfig(r=4, lora_alpha=8, target_modules=model.lora_target_modules()))
    torch.manual_seed(seed)
    for name, p in model.net.named_parameters():
        if "lora_B" in name:  # non-zero, so that the adapter changes the outputs
            torch.nn.init.normal_(p, std=0.05)
    return model


# ---- image tokenizer ---------------------------------------------------------------------------------------
def test_tokenizer_shapes_ranges_and_nearest_codes(model):
    tok = model.tokenizer
    x = images(model, 3, 0)
    codes = tok.encode(x)
    assert codes.shape == (3, tok.tokens_per_image) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < tok.codebook_size
    z = tok.features(x)
    assert z.shape[:2] == (3, tok.tokens_per_image)
    # encode = nearest codebook entry of the pre-quantisation features
    book = (getattr(tok, "vqgan", None) or tok.vq).quantize.embedding.weight.float().cpu()
    assert torch.equal(torch.cdist(z.reshape(-1, z.shape[-1]), book).argmin(-1).view(3, -1), codes)
    # decode -> pixels -> codes again: shapes, dtype, range, determinism
    pix = tok.decode(codes)
    assert pix.shape == (3, tok.image_size, tok.image_size, 3) and pix.dtype == np.uint8
    assert np.array_equal(pix, tok.decode(codes))
    again = tok.encode(pix)
    assert again.shape == codes.shape and int(again.max()) < tok.codebook_size
    # other input sizes are resized (shortest side) and centre-cropped
    assert tok.encode(np.zeros((2, tok.image_size + 9, tok.image_size * 2, 3), np.uint8)).shape == (2, tok.tokens_per_image)
    with pytest.raises(ValueError, match="codes out of range"):
        tok.decode(torch.full((1, tok.tokens_per_image), tok.codebook_size))


def test_pixel_normalisation_round_trip():
    x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    px = to_pixels(x, chameleon_policy(16))
    assert px.shape == (2, 3, 16, 16) and float(px.min()) >= -1 and float(px.max()) <= 1
    assert np.array_equal(to_uint8(px), x)
    with pytest.raises(ValueError, match="uint8"):
        to_pixels(x.astype(np.float32), chameleon_policy(16))


def test_image_tokenizer_is_frozen(model):
    for module in tokenizer_modules(model)[:2]:  # the tokenizer and the HF VQ model (the vision tower may train)
        assert not any(p.requires_grad for p in module.parameters())


# ---- IDP ---------------------------------------------------------------------------------------------------
def test_caption_returns_one_string_per_pair(model):
    out = model.caption(images(model, 2, 3), images(model, 2, 4), max_new_tokens=6)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(s, str) for s in out)
    assert all(len(s.split()) <= 6 for s in out)


def test_action_logprob_batched_equals_single(model):
    a, b = images(model, 3, 5), images(model, 3, 6)
    batched = model.action_logprob(a, b, ACTIONS)
    single = torch.cat([model.action_logprob(a[i: i + 1], b[i: i + 1], ACTIONS[i: i + 1]) for i in range(3)])
    assert batched.shape == (3,) and torch.isfinite(batched).all() and bool((batched < 0).all())
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    codes = model.tokenizer.encode(b)
    if isinstance(model, CausalLMModel):  # reads image codes: codes and the images they came from score the same
        torch.testing.assert_close(model.action_logprob(a, codes, ACTIONS), batched, atol=1e-6, rtol=0)
    else:  # reads pixels: codes are decoded first, like their uint8 decode up to rounding
        torch.testing.assert_close(model.action_logprob(a, codes, ACTIONS),
                                   model.action_logprob(a, model.tokenizer.decode(codes), ACTIONS), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.action_logprob(a, b[:2], ACTIONS)


# ---- FDP ---------------------------------------------------------------------------------------------------
class _Calls:
    """Counts passes through the first language-model projection: (batch rows, sequence length) per call."""

    def __init__(self, model):
        name = model.lora_target_modules()[0]
        self.shapes: list[tuple[int, int]] = []
        self.handle = unwrap(model.net).get_submodule(name).register_forward_hook(
            lambda m, args, out: self.shapes.append(tuple(args[0].shape[:2])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_sample_exactly_L_codes_in_one_batched_call(model):
    tok, B, n = model.tokenizer, 2, 3
    before = images(model, B, 7)
    with _Calls(model) as calls:
        out = model.sample(before, ACTIONS[:B], n=n, temperature=1.0, top_k=8, seed=11)
    assert out.shape == (B, n, tok.tokens_per_image) and out.dtype == torch.int64
    assert 0 <= int(out.min()) and int(out.max()) < tok.codebook_size
    # one prompt pass for all candidates (batch B), then L - 1 single-token steps over B * n rows
    assert calls.shapes[0][0] == B and calls.shapes[0][1] > 1
    assert calls.shapes[1:] == [(B * n, 1)] * (tok.tokens_per_image - 1)
    assert torch.equal(out, model.sample(before, ACTIONS[:B], n=n, temperature=1.0, top_k=8, seed=11))
    assert not torch.equal(out, model.sample(before, ACTIONS[:B], n=n, temperature=1.0, top_k=8, seed=12))
    greedy = model.sample(before, ACTIONS[:B], n=2, temperature=0)
    assert torch.equal(greedy[:, 0], greedy[:, 1])


def test_guidance_rows_keep_the_before_image(model):
    B, n = 2, 2
    before = images(model, B, 8)
    embeddings = unwrap(model.net).get_input_embeddings()
    seen: list[torch.Tensor] = []
    handle = embeddings.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().cpu()))
    with _Calls(model) as calls:
        out = model.sample(before, ACTIONS[:B], n=n, seed=0, guidance_scale=3.0)
    handle.remove()
    assert out.shape == (B, n, model.tokenizer.tokens_per_image)
    assert calls.shapes[0][0] == 2 * B and calls.shapes[1] == (2 * B * n, 1)  # cond + uncond rows, one batch
    prompt = seen[0]
    if isinstance(model, CausalLMModel):
        image_ids = set(model.codes_to_ids(torch.arange(model.tokenizer.codebook_size)).tolist())
    else:
        image_ids = {model.placeholder}
    for i in range(B):
        cond, uncond = prompt[i].tolist(), prompt[B + i].tolist()
        assert [t for t in uncond if t in image_ids] == [t for t in cond if t in image_ids] != []
        action_only = set(model.text_ids(ACTIONS[i])) - set(model.specials.instruction_fdp)
        assert action_only and action_only <= set(cond) and not action_only & set(uncond)
        assert len(uncond) - uncond.count(model.specials.pad) < len(cond) - cond.count(model.specials.pad)
    # guidance 0 leaves only the unconditional rows: the same as prompting with an empty action
    unguided = model.sample(before, ACTIONS[:B], n=1, temperature=0, guidance_scale=0.0)
    assert torch.equal(unguided, model.sample(before, ["", ""], n=1, temperature=0, guidance_scale=1.0))


# ---- training ------------------------------------------------------------------------------------------------
def test_weighted_loss_finite_and_reduces_to_plain_ce(model):
    ex = examples(model, 2)
    L = model.tokenizer.tokens_per_image
    with torch.no_grad():
        plain = model.loss(model.collate(ex, "fdp"))
        ones = model.loss(model.collate(ex, "fdp", torch.ones(2, L)))
        peaked = model.loss(model.collate(ex, "fdp", torch.linspace(0.05, 4, L).expand(2, L)))
        idp = model.loss(model.collate(ex, "idp"))
    assert all(torch.isfinite(v) for v in (plain, idp, peaked))
    torch.testing.assert_close(plain, ones)
    assert not torch.isclose(plain, peaked)


def test_lora_targets_only_the_language_model_and_only_lora_learns():
    for name in BACKENDS:
        model = build(name)
        targets = set(model.lora_target_modules())
        inside = {n for n, m in unwrap(model.net).named_modules()
                  if any(m is t or any(m is s for s in t.modules()) for t in tokenizer_modules(model))}
        assert targets and not targets & inside, name
        lora_wrap(model)
        for module in tokenizer_modules(model):
            assert not any("lora_" in n for n, _ in module.named_parameters()), name
        loss = model.loss(model.collate(examples(model), "fdp", torch.rand(2, model.tokenizer.tokens_per_image))) + \
            model.loss(model.collate(examples(model), "idp"))
        assert torch.isfinite(loss), name
        loss.backward()
        grads = {n: p.grad for n, p in model.net.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads), name
        assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n), name
        assert not any(p.requires_grad for m in tokenizer_modules(model)[:2] for p in m.parameters()), name


def test_plain_lora_list_would_reach_janus_vision_tower():
    """Why backends name full module paths: the usual short list also matches SigLIP's attention."""
    model = build("janus")
    wrapped = get_peft_model(model.net, LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert any("vision_model" in n and "lora_" in n for n, _ in wrapped.named_parameters())
    assert not any("vision_model" in n for n in build("janus").lora_target_modules())


# ---- persistence ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_save_load_base_and_adapter_identical(name, tmp_path):
    model = lora_wrap(build(name))
    a, b = images(model, 2, 9), images(model, 2, 10)
    ex = examples(model)
    w = torch.rand(2, model.tokenizer.tokens_per_image, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = (model.action_logprob(a, b, ACTIONS[:2]), model.loss(model.collate(ex, "fdp", w)))
    model.save(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert {"config.json", "dynboot.json", "adapter"} <= set(files), files
    with safe_open(str(next((tmp_path / "ckpt").glob("model*.safetensors"))), "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k]
    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(model) and isinstance(loaded.net, PeftModel)
    with torch.no_grad():
        got = (loaded.action_logprob(a, b, ACTIONS[:2]), loaded.loss(loaded.collate(ex, "fdp", w)))
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)
    assert torch.equal(loaded.sample(a[:1], ACTIONS[:1], seed=3), model.sample(a[:1], ACTIONS[:1], seed=3))
    with loaded.net.disable_adapter():  # the adapter matters: the base alone scores differently
        assert not torch.allclose(loaded.action_logprob(a, b, ACTIONS[:2]), want[0], atol=1e-4)
    # an adapter-only export pointing at the base directory loads to the same outputs
    model.save(tmp_path / "adapter_only", include_base=False, base_model_path=str(tmp_path / "ckpt"))
    assert not (tmp_path / "adapter_only" / "config.json").exists()
    again = load_model(tmp_path / "adapter_only")
    torch.testing.assert_close(again.action_logprob(a, b, ACTIONS[:2]), want[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", BACKENDS)
def test_save_load_plain_identical_logits(name, tmp_path):
    model = build(name)
    a, b = images(model, 2, 11), images(model, 2, 12)
    want = model.action_logprob(a, b, ACTIONS[:2])
    loaded = load_model(model.save(tmp_path / "m"), backend=name)
    assert not isinstance(loaded.net, PeftModel)
    torch.testing.assert_close(loaded.action_logprob(a, b, ACTIONS[:2]), want, atol=1e-6, rtol=0)
    assert np.array_equal(loaded.tokenizer.decode(loaded.tokenizer.encode(a)), model.tokenizer.decode(model.tokenizer.encode(a)))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_model(tmp_path / "missing", backend="liquid")
    liquid = build("liquid")
    liquid.save(tmp_path / "liq")
    for f in ("vqgan.yaml", "vqgan.safetensors"):
        (tmp_path / "liq" / f).unlink()
    with pytest.raises(FileNotFoundError, match="vqgan"):
        load_model(tmp_path / "liq")
    with pytest.raises(FileNotFoundError, match="vqgan_path"):
        load_model(tmp_path / "liq", vqgan_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="has no '<nope>' token"):
        load_model(liquid.save(tmp_path / "liq2"), boi_token="<nope>")


# ---- backend specifics -------------------------------------------------------------------------------------
def test_vqgan_loads_the_released_file_layout(tmp_path):
    """vqgan.yaml (taming config incl. lossconfig) + vqgan.ckpt (Lightning dict with `state_dict` and loss.* keys)."""
    tok = VQGANTokenizer.create(VQGANConfig.tiny(), seed=4)
    cfg = tok.vqgan.cfg
    doc = {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed,
        "ddconfig": {"double_z": False, "z_channels": cfg.z_channels, "resolution": cfg.resolution, "in_channels": 3,
                     "out_ch": 3, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
                     "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 0}}}}}
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump(doc))
    state = dict(tok.vqgan.state_dict(), **{"loss.discriminator.main.0.weight": torch.zeros(2)})
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, tmp_path / "vqgan.ckpt")
    loaded = VQGANTokenizer.load(tmp_path)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    codes = tok.encode(x)
    assert torch.equal(loaded.encode(x), codes) and np.array_equal(loaded.decode(codes), tok.decode(codes))


def test_vqgan_names_match_taming_and_transformers():
    from transformers import ChameleonVQVAE

    with torch.device("meta"):
        vq = VQGAN(VQGANConfig())  # Chameleon's released shapes: 512 px, 1024 codes of 8192
        hf = ChameleonVQVAE(VQGANConfig().chameleon())
    shapes = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    # everything but the decoder is named exactly as transformers' converted Chameleon VQ model
    assert {k for k in shapes if not k.startswith("decoder.")} == set(hf.state_dict())
    assert shapes["quantize.embedding.weight"] == (8192, 256)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.up.4.block.2.conv2.weight"] == (512, 512, 3, 3)  # lowest level = up[4], num_res_blocks + 1
    assert shapes["decoder.up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes and shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert VQGANConfig().grid ** 2 == 1024


def test_anole_image_ids_match_transformers_and_logits_are_unmasked():
    from transformers import ChameleonForConditionalGeneration

    model = build("anole")
    x = images(model, 2, 13)
    pv = to_pixels(x, model.tokenizer.policy)
    # transformers' own image path (its VQ encoder + img2bpe) gives the ids our tokenizer + code map give
    assert torch.equal(model.net.get_image_tokens(pv), model.codes_to_ids(model.tokenizer.encode(x)))
    assert model.codes_to_ids(torch.tensor([12])).item() == model.text_tokenizer.convert_tokens_to_ids("IMGIMGBCZ")
    batch = model.collate(examples(model), "fdp")
    stock = ChameleonForConditionalGeneration(model.net.config)
    stock.load_state_dict(model.net.state_dict())
    labels = torch.where(batch["target_weights"] > 0, batch["input_ids"], -100)
    with torch.no_grad():
        stock_out = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        ours = model.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    assert torch.isinf(stock_out.loss) and torch.isfinite(ours.loss)
    assert float(ours.logits[..., model.image_token_ids].min()) > torch.finfo(ours.logits.dtype).min
    # the same weights and logits; the FDP loss reads image targets over the image codes only (tests/test_model_paths.py)
    torch.testing.assert_close(ours.logits, stock_out.logits.masked_scatter(
        torch.zeros_like(stock_out.logits, dtype=torch.bool).index_fill_(-1, model.image_token_ids, True),
        ours.logits[..., model.image_token_ids]), atol=1e-6, rtol=0)
    assert torch.isfinite(model.loss(batch))


def test_anole_without_vqgan_files_encodes_but_cannot_decode(tmp_path):
    model = build("anole")
    model.save(tmp_path / "hf")
    for f in ("vqgan.yaml", "vqgan.safetensors"):
        (tmp_path / "hf" / f).unlink()
    with pytest.warns(UserWarning, match="decoding images will fail"):
        loaded = load_model(tmp_path / "hf")
    x = images(model, 2, 14)
    assert torch.equal(loaded.tokenizer.encode(x), model.tokenizer.encode(x))
    with pytest.raises(RuntimeError, match="without decoder"):
        loaded.tokenizer.decode(model.tokenizer.encode(x))
