"""The janus backend: Janus / Janus-Pro (1B, 7B) through transformers' Janus classes, VQ decoder included.

Janus reads images with SigLIP (the understanding path: 576 features at `<image_placeholder>` tokens) and
writes them as VQ codes through separate generation embeddings and a generation head (not `lm_head`).
transformers' `generate(generation_mode="image")` ignores the input image, so FDP has its own sampler here:
the before image's SigLIP features in the prompt, conditional and unconditional (action dropped, before image
kept) rows in one batch, the shared prompt computed once and its KV cache repeated for the N candidates, then
L steps of generation head -> CFG -> top-k sampling -> generation embedding. The FDP loss runs the same layout
with the after image's codes as generation embeddings and weighted CE from the generation head; the IDP
(caption, scoring, loss) uses SigLIP for both images and `lm_head`. Candidates given as codes are decoded by
the VQ decoder before SigLIP reads them.

Checkpoint directory (local files only): the HF Janus layout (`deepseek-community/Janus-Pro-1B` style:
config.json, model*.safetensors, tokenizer files), optional dynboot.json and `adapter/` written by `save`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, DynamicCache, JanusConfig, JanusForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast

from dynboot.models.base import Example, Task, UnifiedModel
from dynboot.models.causal_lm import _pick, pad_layouts
from dynboot.models.hf_parts import (
    INSTRUCTION_WORDS, PromptText, attach_adapter, base_dir, build_specials, building, checkpoint_description,
    known_options, language_model_projections, load_dtype, save_net, text_ids, token_id, unwrap, word_tokenizer,
)
from dynboot.models.vqgan import to_pixels, to_uint8
from dynboot.prompts import fdp_layout, idp_layout
from dynboot.rundir import write_json
from dynboot.world.actions import WORDS

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
PLACEHOLDER, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
SIZES = {  # text (layers, hidden, heads, ffn), vision (layers, hidden, heads, image, patch), VQ (base channels, mult)
    "tiny": ((2, 64, 4, 128), (1, 32, 2, 32, 8), (32, [1, 1, 2, 2])),
    "1b": ((24, 2048, 16, 5632), (24, 1024, 16, 384, 16), (128, [1, 1, 2, 2, 4])),
    "7b": ((30, 4096, 32, 11008), (24, 1024, 16, 384, 16), (128, [1, 1, 2, 2, 4])),
}


class JanusWorldNet(JanusForConditionalGeneration):
    """Janus with one forward for both heads and three kinds of input: text ids, SigLIP features at the image
    placeholders (`pixel_values`), VQ codes at `gen_mask` positions (generation embeddings). `head="image"`
    returns generation-head logits over the codebook, `head="text"` the lm_head's."""

    def embed(self, input_ids, pixel_values=None, gen_codes=None, gen_mask=None) -> torch.Tensor:
        emb = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            feats = self.model.get_image_features(pixel_values.to(self.model.vision_model.dtype)).pooler_output
            slots = input_ids == self.config.image_token_id
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(slots.sum())} image placeholders but {feats.shape[0]} images of {feats.shape[1]} features")
            emb = emb.masked_scatter(slots[..., None], feats.to(emb.dtype))
        if gen_mask is not None and bool(gen_mask.any()):
            codes = self.prepare_embeddings_for_image_generation(gen_codes[gen_mask])
            emb = emb.masked_scatter(gen_mask[..., None], codes.to(emb.dtype))
        return emb

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, gen_codes=None, gen_mask=None, head: str = "text", inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, gen_codes, gen_mask)
        out = self.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache)
        h = out.last_hidden_state
        logits = self.model.generation_head(h) if head == "image" else self.lm_head(h)
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)


class JanusVQTokenizer:
    """`ImageTokenizer` over Janus's frozen VQ model (kept in float32: nearest-code search in bf16 flips codes)."""

    def __init__(self, vqmodel, image_size: int):
        self.vq = vqmodel.float().eval().requires_grad_(False)
        self.codebook_size = vqmodel.config.num_embeddings
        self.tokens_per_image = int(np.prod(vqmodel.quantize.quant_state_dims))
        self.image_size = image_size

    @property
    def device(self) -> torch.device:
        return next(self.vq.parameters()).device

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        pv = to_pixels(images, self.image_size).to(self.device)
        return self.vq.encode(pv).image_tokens.view(len(pv), -1).cpu()

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> torch.Tensor:
        pv = to_pixels(images, self.image_size).to(self.device)
        return self.vq.quant_conv(self.vq.encoder(pv)).flatten(2).transpose(1, 2).float().cpu()

    @torch.inference_mode()
    def pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, L] codes -> [B, 3, S, S] in [-1, 1] (on the VQ model's device)."""
        codes = torch.as_tensor(codes).reshape(-1, self.tokens_per_image)
        if len(codes) and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes out of range [0, {self.codebook_size})")
        return self.vq.decode(codes.to(self.device)).clamp(-1, 1)

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        return to_uint8(self.pixels(codes))


class JanusProModel(UnifiedModel):
    backend = "janus"
    OPTIONS = ("guidance_scale", "boi_token", "eoi_token")

    def __init__(self, net: JanusWorldNet, text_tokenizer, prompts: PromptText | None = None, guidance_scale: float = 1.0,
                 source: str = "scratch", boi_token: str = BOI, eoi_token: str = EOI):
        self.net, self.text_tokenizer, self.source = net, text_tokenizer, source
        base = unwrap(net)
        vision = base.config.vision_config
        self.tokenizer = JanusVQTokenizer(base.model.vqmodel, vision.image_size)
        self.vision_size, self.n_vision = vision.image_size, vision.num_image_tokens
        self.placeholder = base.config.image_token_id
        self.prompts, self.guidance_scale = prompts or PromptText(), guidance_scale
        self.boi_token, self.eoi_token = boi_token, eoi_token
        self.specials = build_specials(text_tokenizer, self.prompts, token_id(text_tokenizer, boi_token),
                                       token_id(text_tokenizer, eoi_token))

    # ---- helpers ---------------------------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        return text_ids(self.text_tokenizer, text)

    def _pixels(self, images_or_codes) -> torch.Tensor:
        """SigLIP input [B, 3, S, S] in [-1, 1] from images, or from codes through the VQ decoder."""
        if isinstance(images_or_codes, torch.Tensor) and images_or_codes.dtype == torch.int64:
            px = self.tokenizer.pixels(images_or_codes).float()
            if px.shape[-1] != self.vision_size:
                px = F.interpolate(px, size=(self.vision_size, self.vision_size), mode="bilinear", align_corners=False)
            return px.to(self.device)
        return to_pixels(np.asarray(images_or_codes), self.vision_size).to(self.device)

    def _idp_batch(self, a_px, b_px, actions: list[list[int]] | None, left_pad: bool) -> dict[str, torch.Tensor]:
        ph = [self.placeholder] * self.n_vision
        layouts = [idp_layout(self.specials, ph, ph, None if actions is None else actions[i]) for i in range(len(a_px))]
        batch = pad_layouts(layouts, self.specials.pad, left_pad)
        batch["pixel_values"] = torch.stack([a_px, b_px], 1).flatten(0, 1)  # A0, B0, A1, B1, ... (placeholder order)
        return batch

    def _run(self, net, batch: dict[str, torch.Tensor], head: str, **kw):
        dev = self.device
        args = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        for k in ("pixel_values", "gen_codes", "gen_mask"):
            if k in batch:
                args[k] = batch[k].to(dev)
        return net(**args, head=head, **kw)

    # ---- training ----------------------------------------------------------------------------------------
    def collate(self, examples: list[Example], task: Task, token_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        before = np.stack([e.before for e in examples])
        after = np.stack([e.after for e in examples])
        acts = [self.text_ids(e.action) for e in examples]
        if task == "idp":
            batch = self._idp_batch(self._pixels(before).cpu(), self._pixels(after).cpu(), acts, left_pad=False)
            batch["gen_mask"] = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            batch["gen_codes"] = torch.zeros_like(batch["input_ids"])
            batch["target_weights"] = batch["target"].float()
        else:
            codes = self.tokenizer.encode(after)
            L, ph = self.tokenizer.tokens_per_image, [self.placeholder] * self.n_vision
            layouts = [fdp_layout(self.specials, ph, acts[i], [self.specials.pad] * L) for i in range(len(examples))]
            batch = pad_layouts(layouts, self.specials.pad)
            batch["pixel_values"] = self._pixels(before).cpu()
            gen_mask = batch["image_of"] == 1  # the after image: codes in, codes out (generation head)
            gen_codes = torch.zeros_like(batch["input_ids"])
            gen_codes[gen_mask] = codes.flatten()
            w = torch.ones_like(codes, dtype=torch.float) if token_weights is None else token_weights.float()
            weights = torch.zeros_like(batch["input_ids"], dtype=torch.float)
            weights[gen_mask] = w.flatten()
            batch.update(gen_mask=gen_mask, gen_codes=gen_codes, target_weights=weights)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values", "gen_mask",
                                      "gen_codes", "target_weights")}

    def loss(self, batch: dict[str, torch.Tensor], net: torch.nn.Module | None = None) -> torch.Tensor:
        fdp = bool(batch["gen_mask"].any())
        logits = self._run(net or self.net, batch, head="image" if fdp else "text").logits[:, :-1].float()
        labels = (batch["gen_codes"] if fdp else batch["input_ids"])[:, 1:].to(logits.device)
        w = batch["target_weights"][:, 1:].to(logits.device)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return (ce * w.reshape(-1)).sum() / w.sum().clamp(min=1e-8)

    # ---- IDP ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def action_logprob(self, before, after, actions: list[str]) -> torch.Tensor:
        a_px, b_px = self._pixels(before), self._pixels(after)
        if not (len(a_px) == len(b_px) == len(actions)):
            raise ValueError(f"batch sizes differ: {len(a_px)} before, {len(b_px)} after, {len(actions)} actions")
        batch = self._idp_batch(a_px, b_px, [self.text_ids(t) for t in actions], left_pad=False)
        logp = torch.log_softmax(self._run(self.net, batch, "text").logits[:, :-1].float(), -1)
        tok = torch.gather(logp, 2, batch["input_ids"][:, 1:, None].to(logp.device))[..., 0]
        m = batch["target"][:, 1:].to(logp.device).float()
        return ((tok * m).sum(1) / m.sum(1)).cpu()

    def _text_mask(self, vocab: int) -> torch.Tensor:
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[: len(self.text_tokenizer)] = True
        s = self.specials
        for t in [s.bos, s.pad, s.boi, s.eoi, self.placeholder, *self.text_tokenizer.all_special_ids]:
            allowed[t] = False
        allowed[s.eos] = True
        return allowed

    @torch.inference_mode()
    def caption(self, before, after, max_new_tokens: int = 32) -> list[str]:
        batch = self._idp_batch(self._pixels(before), self._pixels(after), None, left_pad=True)
        cache = DynamicCache()
        logits = self._run(self.net, batch, "text", past_key_values=cache, use_cache=True).logits[:, -1].float()
        B, dev = logits.shape[0], self.device
        ok = self._text_mask(logits.shape[-1]).to(logits.device)
        mask, pos = batch["attention_mask"].to(dev), batch["position_ids"][:, -1:].to(dev)
        gen, done = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool)
        for _ in range(max_new_tokens):
            tok = logits.masked_fill(~ok, float("-inf")).argmax(-1).cpu()
            for i in range(B):
                if not done[i]:
                    done[i] = bool(tok[i] == self.specials.eos)
                    if not done[i]:
                        gen[i].append(int(tok[i]))
            if done.all():
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], 1)
            pos = pos + 1
            step = {"input_ids": tok[:, None], "attention_mask": mask, "position_ids": pos}
            logits = self._run(self.net, step, "text", past_key_values=cache, use_cache=True).logits[:, -1].float()
        return [self.text_tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]

    # ---- FDP ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, before, actions: list[str], n: int = 1, temperature: float = 1.0, top_k: int = 0,
               seed: int | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        a_px = self._pixels(before)
        if len(a_px) != len(actions):
            raise ValueError(f"{len(a_px)} images but {len(actions)} actions")
        cfg = self.guidance_scale if guidance_scale is None else guidance_scale
        ph = [self.placeholder] * self.n_vision
        layouts = [fdp_layout(self.specials, ph, self.text_ids(t), None) for t in actions]
        if cfg != 1.0:  # unconditional rows: same before image, no action
            layouts += [fdp_layout(self.specials, ph, [], None) for _ in actions]
            a_px = torch.cat([a_px, a_px])
        batch = pad_layouts(layouts, self.specials.pad, left_pad=True)
        B, L, R, dev = len(actions), self.tokenizer.tokens_per_image, len(layouts) * n, self.device
        base = unwrap(self.net)
        lm, head = base.model.language_model, base.model.generation_head
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ()).item()))
        cache = DynamicCache()
        mask, pos = batch["attention_mask"].to(dev), batch["position_ids"].to(dev)
        emb = base.embed(batch["input_ids"].to(dev), pixel_values=a_px)
        # the shared prompt once per request, then its cache repeated for the n candidates
        h = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache,
               use_cache=True).last_hidden_state[:, -1]
        cache.batch_repeat_interleave(n)
        h, mask, pos = h.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), pos[:, -1:].repeat_interleave(n, 0)
        codes = torch.empty((B * n, L), dtype=torch.long)
        for t in range(L):
            logits = head(h).float().cpu()
            if cfg != 1.0:
                logits = logits[B * n:] + cfg * (logits[: B * n] - logits[B * n:])
            codes[:, t] = _pick(logits, temperature, top_k, gen)
            if t == L - 1:
                break
            nxt = codes[:, t: t + 1].repeat(R // (B * n), 1).to(dev)  # unconditional rows continue with the same codes
            mask = torch.cat([mask, torch.ones((R, 1), dtype=mask.dtype, device=dev)], 1)
            pos = pos + 1
            h = lm(inputs_embeds=base.prepare_embeddings_for_image_generation(nxt), attention_mask=mask, position_ids=pos,
                   past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        return codes.reshape(B, n, L)

    # ---- LoRA / persistence ----------------------------------------------------------------------------------
    def lora_target_modules(self) -> list[str]:
        return language_model_projections(self.net, "model.language_model.layers.")

    @classmethod
    def create(cls, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype: str | torch.dtype | None = None,
               guidance_scale: float = 1.0) -> "JanusProModel":
        """Random weights at a preset size ('tiny' for tests, '1b' / '7b' = Janus-Pro shapes), offline tokenizer."""
        if size not in SIZES:
            raise ValueError(f"unknown janus size {size!r}; choose one of {sorted(SIZES)}")
        (layers, hidden, heads, ffn), (v_layers, v_hidden, v_heads, image, patch), (ch, mult) = SIZES[size]
        tok = word_tokenizer([BOS, EOS, PAD, "<unk>", PLACEHOLDER, BOI, EOI, "\n", *INSTRUCTION_WORDS, *WORDS],
                             dict(bos_token=BOS, eos_token=EOS, pad_token=PAD), extra_special=[PLACEHOLDER, BOI, EOI, "\n"],
                             size=102400 if size != "tiny" else None)
        grid = image // patch  # the VQ downsample must equal the SigLIP patch size (JanusConfig ties them)
        config = JanusConfig(
            text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=16384, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
            vision_config=dict(hidden_size=v_hidden, num_hidden_layers=v_layers, num_attention_heads=v_heads,
                               image_size=image, patch_size=patch, projection_dim=hidden, num_image_tokens=grid * grid),
            vq_config=dict(embed_dim=8, num_embeddings=64 if size == "tiny" else 16384, base_channels=ch,
                           channel_multiplier=mult, num_res_blocks=1 if size == "tiny" else 2,
                           latent_channels=32 if size == "tiny" else 256, projection_dim=hidden,
                           image_token_embed_dim=hidden),
            image_token_id=tok.convert_tokens_to_ids(PLACEHOLDER))
        torch.manual_seed(seed)
        with building(device, load_dtype(device, dtype)):
            net = JanusWorldNet(config)
        return cls(net.eval(), tok, guidance_scale=guidance_scale, source=f"scratch-{size}")

    def describe(self) -> dict:
        return {"backend": self.backend, "prompts": vars(self.prompts),
                "options": {"guidance_scale": self.guidance_scale, "boi_token": self.boi_token, "eoi_token": self.eoi_token}}

    def save(self, path: str | Path, include_base: bool = True, base_model_path: str | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_net(self.net, path, include_base)
        self.text_tokenizer.save_pretrained(path)
        desc = self.describe()
        if not include_base:
            if not base_model_path:
                raise ValueError("include_base=False needs base_model_path (the directory holding the base weights)")
            desc["base_model_path"] = str(Path(base_model_path).resolve())
        write_json(path / "dynboot.json", desc)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None,
             trainable_adapter: bool = False, **overrides: object) -> "JanusProModel":
        path = Path(path)
        desc = checkpoint_description(path)
        root = base_dir(path, desc)
        net = JanusWorldNet.from_pretrained(root, local_files_only=True, dtype=load_dtype(device, dtype))
        net = attach_adapter(net.to(device), path, trainable_adapter).eval()
        tok_dir = path if (path / "tokenizer_config.json").is_file() else root
        text_tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        options = {**desc.get("options", {}), **known_options(cls, overrides)}
        return cls(net, text_tokenizer, prompts=PromptText(**desc.get("prompts", {})), source=path.name, **options)
