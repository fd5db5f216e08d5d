"""The janus backend: Janus / Janus-Pro (1B, 7B) through transformers' Janus classes, VQ decoder included.

Janus reads images with SigLIP (the understanding path: 576 features at `<image_placeholder>` tokens) and
writes them as VQ codes through separate generation embeddings and a generation head (not `lm_head`). So its
layout differs from the causal-lm one: read images are placeholders + pixels (`pixel_values` [B, k, 3, S, S],
k images per row), the generated image is codes at `gen_mask` positions; its image readout is the generation
head (codebook-sized). Everything else is the shared core: transformers' `generate(generation_mode="image")`
ignores the input image, so FDP uses the core's sampler (before image's SigLIP features in the prompt,
conditional and unconditional rows in one batch, the prompt's KV cache repeated for the N candidates). Candidate
codes given to `action_logprob` are decoded by the VQ decoder before SigLIP reads them.

The image tokenizer holds its own float32 copy of the frozen VQ model: DeepSpeed's bf16 casts the network (its
`vqmodel` included), and the nearest-code search in bf16 flips codes, so codes never depend on the training
dtype. Policy: longest side to 384 (BICUBIC), padded to a square with 127, as transformers' JanusImageProcessor.
LoRA: the language model's projections, plus the generation head trained in full (`modules_to_save`): FDP
fine-tuning must move the head that maps hidden states to codes, which no language-model LoRA reaches.

Checkpoint directory (local files only): the HF Janus layout (`deepseek-community/Janus-Pro-1B` style:
config.json, model*.safetensors, tokenizer files), optional dynboot.json and `adapter/` written by `save`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import JanusConfig, JanusForConditionalGeneration

from dynboot.models.core import SequenceModel
from dynboot.models.heads import Readout, ReadoutMixin, make_selective
from dynboot.models.hf_core import Budget, HFBackend, from_pretrained, resolve_budget
from dynboot.models.hf_parts import (
    INSTRUCTION_WORDS, PromptText, build_specials, building, load_dtype, token_id, unwrap, word_tokenizer,
)
from dynboot.io.images import ImagePolicy
from dynboot.models.liquid import _words
from dynboot.models.vqgan import to_pixels, to_uint8
from dynboot.models.prompts import fdp_layout, idp_layout, pad_layouts

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
PLACEHOLDER, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
JANUS_VOCAB = 102400
SIZES = {  # text (layers, hidden, heads, ffn), vision (layers, hidden, heads, image, patch), VQ (channels, mult, codes)
    "tiny": ((2, 64, 4, 128), (1, 32, 2, 32, 8), (32, [1, 1, 2, 2], 64), None),
    "shapes": ((2, 64, 4, 128), (1, 32, 2, 384, 16), (32, [1, 1, 2, 2, 4], 16384), JANUS_VOCAB),
    "full-1b": ((24, 2048, 16, 5632), (24, 1024, 16, 384, 16), (128, [1, 1, 2, 2, 4], 16384), JANUS_VOCAB),
    "full": ((30, 4096, 32, 11008), (24, 1024, 16, 384, 16), (128, [1, 1, 2, 2, 4], 16384), JANUS_VOCAB),
}


def janus_policy(size: int = 384) -> ImagePolicy:
    return ImagePolicy(kind="letterbox", size=size, fill=(127, 127, 127), resample="bicubic")


class JanusWorldNet(ReadoutMixin, JanusForConditionalGeneration):
    """Janus with three kinds of input: text ids, SigLIP features at the image placeholders (`pixel_values`
    [B, k, 3, S, S]), VQ codes at `gen_mask` positions (generation embeddings); readouts through `lm_head`
    ("lm") or the generation head ("generation", logits over the codebook)."""

    def __init__(self, config):
        super().__init__(config)
        make_selective(self.lm_head)

    def embed(self, input_ids, pixel_values=None, gen_codes=None, gen_mask=None) -> torch.Tensor:
        emb = self.get_input_embeddings()(input_ids)
        if pixel_values is not None and pixel_values.numel():
            px = pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values
            feats = self.model.get_image_features(px.to(self.model.vision_model.dtype)).pooler_output
            slots = input_ids == self.config.image_token_id
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(slots.sum())} image placeholders but {feats.shape[0]} images of {feats.shape[1]} features")
            emb = emb.masked_scatter(slots[..., None], feats.to(emb.dtype))
        if gen_mask is not None and bool(gen_mask.any()):
            codes = self.prepare_embeddings_for_image_generation(gen_codes[gen_mask])
            emb = emb.masked_scatter(gen_mask[..., None], codes.to(emb.dtype))
        return emb

    def backbone(self, input_ids=None, pixel_values=None, gen_codes=None, gen_mask=None, inputs_embeds=None, **kw):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, gen_codes, gen_mask)
        return self.model.language_model(inputs_embeds=inputs_embeds, **kw)

    def generation_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.generation_head(hidden)

    def generation_logits_size(self) -> int:
        return self.config.vq_config.num_embeddings


class JanusVQTokenizer:
    """`ImageTokenizer` over a float32 copy of Janus's frozen VQ model (see the module doc), behind its policy."""

    def __init__(self, vqmodel, policy: ImagePolicy):
        self.vq = copy.deepcopy(vqmodel).float().eval().requires_grad_(False)
        self.codebook_size = vqmodel.config.num_embeddings
        self.tokens_per_image = int(np.prod(vqmodel.quantize.quant_state_dims))
        self.image_size = policy.size
        self.policy = policy

    @property
    def device(self) -> torch.device:
        return next(self.vq.parameters()).device

    def to(self, device) -> "JanusVQTokenizer":
        self.vq.to(device)
        return self

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        pv = to_pixels(images, self.policy).to(self.device)
        return self.vq.encode(pv).image_tokens.view(len(pv), -1).cpu()

    @torch.inference_mode()
    def features(self, images) -> torch.Tensor:
        pv = to_pixels(images, self.policy).to(self.device)
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


class JanusProModel(HFBackend, SequenceModel):
    backend = "janus"
    LAYERS_PREFIX = "model.language_model.layers."

    def __init__(self, net: JanusWorldNet, text_tokenizer, prompts: PromptText | None = None, guidance_scale: float = 1.0,
                 source: str = "scratch", boi_token: str = BOI, eoi_token: str = EOI,
                 max_tokens: Budget = "auto", policy: ImagePolicy | None = None):
        self.net, self.text_tokenizer, self.source = net, text_tokenizer, source
        base = unwrap(net)
        vision = base.config.vision_config
        base.model.vqmodel.requires_grad_(False)  # frozen explicitly (.eval() alone keeps requires_grad)
        self.tokenizer = JanusVQTokenizer(base.model.vqmodel, policy or janus_policy(vision.image_size))
        self.vision_size, self.read_tokens = vision.image_size, vision.num_image_tokens
        self.placeholder = base.config.image_token_id
        self.prompts, self.guidance_scale = prompts or PromptText(), guidance_scale
        self.budget_setting, self.max_tokens = max_tokens, resolve_budget(max_tokens, net)
        self.boi_token, self.eoi_token = boi_token, eoi_token
        self.specials = build_specials(text_tokenizer, self.prompts, token_id(text_tokenizer, boi_token),
                                       token_id(text_tokenizer, eoi_token))

    @classmethod
    def default_policy(cls, read) -> ImagePolicy:
        """The policy of a released checkpoint, at its config's SigLIP image size."""
        return janus_policy(int(json.loads(read("config.json"))["vision_config"].get("image_size", 384)))

    def to(self, device) -> "JanusProModel":
        self.net.to(device)
        self.tokenizer.to(device)
        return self

    # ---- layout ------------------------------------------------------------------------------------------
    def _pixels(self, images_or_codes) -> torch.Tensor:
        """SigLIP input [B, 3, S, S] in [-1, 1] from images (through the policy), or from codes through the VQ decoder."""
        if isinstance(images_or_codes, torch.Tensor) and images_or_codes.dtype == torch.int64:
            px = self.tokenizer.pixels(images_or_codes).float()
            if px.shape[-1] != self.vision_size:
                px = F.interpolate(px, size=(self.vision_size, self.vision_size), mode="bilinear", align_corners=False)
            return px.to(self.device)
        return to_pixels(images_or_codes, self.tokenizer.policy).to(self.device)

    def _idp_batch(self, before, after, actions, left_pad: bool) -> dict[str, torch.Tensor]:
        a_px, b_px = self._pixels(before), self._pixels(after)
        ph = [self.placeholder] * self.read_tokens
        layouts = [idp_layout(self.specials, ph, ph, None if actions is None else actions[i]) for i in range(len(a_px))]
        batch = pad_layouts(layouts, self.specials.pad, left_pad)
        batch["pixel_values"] = torch.stack([a_px, b_px], 1)  # [B, 2, 3, S, S]: A, B in placeholder order
        batch["gen_mask"] = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        batch["gen_codes"] = torch.zeros_like(batch["input_ids"])
        return batch

    def _fdp_batch(self, before, actions, after, left_pad: bool) -> dict[str, torch.Tensor]:
        L, ph = self.tokenizer.tokens_per_image, [self.placeholder] * self.read_tokens
        layouts = [fdp_layout(self.specials, ph, actions[i], None if after is None else [self.specials.pad] * L)
                   for i in range(len(actions))]
        batch = pad_layouts(layouts, self.specials.pad, left_pad)
        batch["pixel_values"] = self._pixels(before)[:, None]  # [B, 1, 3, S, S]
        gen_mask = batch["image_of"] == 1  # the after image: codes in, codes out (generation head)
        gen_codes = torch.zeros_like(batch["input_ids"])
        if after is not None:
            codes = self.tokenizer.encode(after) if not isinstance(after, torch.Tensor) else after.reshape(-1, L).cpu()
            gen_codes[gen_mask] = codes.flatten()
            batch["label_codes"] = torch.where(gen_mask & batch["target"], gen_codes, batch["label_codes"])
        batch.update(gen_mask=gen_mask, gen_codes=gen_codes)
        return batch

    def _net_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device
        keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "gen_codes", "gen_mask")
        return {k: batch[k].to(dev) for k in keys}

    def _image_step(self, codes: torch.Tensor, t: int, batch: dict, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        col = codes[:, None]
        return {"input_ids": torch.full_like(col, self.specials.pad), "gen_codes": col,
                "gen_mask": torch.ones_like(col, dtype=torch.bool)}

    def image_readout(self, mask: torch.Tensor, labels: torch.Tensor | None = None) -> Readout:
        return Readout(mask, labels, head="generation")

    def _text_allowed(self, vocab: int) -> torch.Tensor:
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[: len(self.text_tokenizer)] = True
        allowed[self.placeholder] = False
        return allowed

    # ---- LoRA / construction / persistence -------------------------------------------------------------------
    def lora_modules_to_save(self) -> list[str]:
        return ["generation_head"]

    @classmethod
    def create(cls, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype: str | torch.dtype | None = None,
               guidance_scale: float = 1.0, words: Sequence[str] | None = None) -> "JanusProModel":
        """Random weights at a preset size ('tiny' for tests; 'shapes' = Janus's 102400-token vocabulary, 384 px,
        576 codes of 16384, a 2-layer transformer; 'full' = Janus-Pro-7B, 'full-1b' = Janus-Pro-1B)."""
        if size not in SIZES:
            raise ValueError(f"unknown janus size {size!r}; choose one of {sorted(SIZES)}")
        (layers, hidden, heads, ffn), (v_layers, v_hidden, v_heads, image, patch), (ch, mult, codes), vocab = SIZES[size]
        small = size in ("tiny", "shapes")
        tok = word_tokenizer([BOS, EOS, PAD, "<unk>", PLACEHOLDER, BOI, EOI, "\n", *INSTRUCTION_WORDS, *_words(words)],
                             dict(bos_token=BOS, eos_token=EOS, pad_token=PAD), extra_special=[PLACEHOLDER, BOI, EOI, "\n"],
                             size=vocab)
        grid = image // patch  # the VQ downsample must equal the SigLIP patch size (JanusConfig ties them)
        config = JanusConfig(
            text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=16384, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
            vision_config=dict(hidden_size=v_hidden, num_hidden_layers=v_layers, num_attention_heads=v_heads,
                               image_size=image, patch_size=patch, projection_dim=hidden, num_image_tokens=grid * grid),
            vq_config=dict(embed_dim=8, num_embeddings=codes, base_channels=ch, channel_multiplier=mult,
                           num_res_blocks=1 if small else 2, latent_channels=32 if small else 256,
                           projection_dim=hidden, image_token_embed_dim=hidden),
            image_token_id=tok.convert_tokens_to_ids(PLACEHOLDER))
        torch.manual_seed(seed)
        with building(device, load_dtype(device, dtype)):
            net = JanusWorldNet(config)
        return cls(net.eval(), tok, guidance_scale=guidance_scale, source=f"scratch-{size}",
                   max_tokens=None if size == "tiny" else "auto")

    @classmethod
    def load_net(cls, root: Path, device, dtype: torch.dtype):
        return from_pretrained(JanusWorldNet, root, device, dtype)

    @classmethod
    def _assemble(cls, net, text_tokenizer, *, path: Path, root: Path, prompts: PromptText, policy, source: str,
                  options: dict, device="cpu") -> "JanusProModel":
        return cls(net, text_tokenizer, prompts=prompts, source=source, policy=policy, **options)
