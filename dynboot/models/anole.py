"""The anole backend: Anole-7B / Chameleon-7B behind the common interface.

transformers' `ChameleonForConditionalGeneration.forward` sets every image-token logit to finfo.min, so it can
never generate an image (an image-only sampler over it draws uniform noise) and `labels=` on image targets
gives loss = inf. `AnoleForConditionalGeneration` is the same network and weights without that mask (and with
readouts, heads.py). The rest is the liquid backend (causal-lm layout, VQ-GAN, hf_core's save/load) with
Chameleon's image-token map instead of an offset: code k <-> the BPE token named "IMGIMG" + digits of k as
letters A-J + "Z" (`vocabulary_map` in config.json), and Chameleon's image policy (shortest side to 512,
centre crop). Pixels go through the released VQ-GAN (vqgan.py); the HF checkpoint's own `model.vqmodel`
(encoder only) is frozen and unused by the LM path.

Checkpoint directory (local files only): the HF Chameleon layout (config.json with `vocabulary_map`,
model*.safetensors, tokenizer files) + `vqgan.yaml` + `vqgan.safetensors` (or the release's `vqgan.ckpt`,
converted once by `dynboot convert-vqgan`; also found under `tokenizer/`). Without VQ-GAN files the encoder is
taken from `model.vqmodel` (IDP works, decoding raises).

    m = AnoleModel.load("/ckpt/Anole-7b-v0.1-hf", device="cuda")
    codes = m.sample(before, ["open the drawer"], n=4, guidance_scale=3.0)   # [1, 4, 1024]
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from dynboot.models.heads import ReadoutMixin, make_selective
from dynboot.models.hf_core import Budget, from_pretrained
from dynboot.models.hf_parts import INSTRUCTION_WORDS, PromptText, building, load_dtype, unwrap, word_tokenizer
from dynboot.io.images import ImagePolicy
from dynboot.models.liquid import LiquidModel, _words
from dynboot.models.vqgan import VQGANConfig, VQGANTokenizer, chameleon_policy, locate_vqgan

BOI, EOI, IMAGE = "<racm3:break>", "<eoss>", "<image>"
CHAMELEON_VOCAB = 65536
SIZES = {  # layers, hidden, heads, ffn, text vocabulary size, VQ-GAN
    "tiny": (2, 64, 4, 128, None, VQGANConfig.tiny()),
    "shapes": (2, 64, 4, 128, CHAMELEON_VOCAB, VQGANConfig.shapes()),
    "full": (32, 4096, 32, 11008, CHAMELEON_VOCAB, VQGANConfig()),
}


def image_token_name(code: int) -> str:
    """Chameleon's BPE name of VQ code k: 'IMGIMG' + each digit d as chr(ord('A') + d) + 'Z'."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


class AnoleForConditionalGeneration(ReadoutMixin, ChameleonForConditionalGeneration):
    """Chameleon without the image-logit mask: image tokens can be generated and trained on."""

    def __init__(self, config):
        super().__init__(config)
        make_selective(self.lm_head)

    def backbone(self, **inputs):
        return self.model(**inputs)


class AnoleModel(LiquidModel):
    """The Liquid-style causal-LM backend with Chameleon's network and image-token map."""

    backend = "anole"
    OPTIONS = ("guidance_scale", "boi_token", "eoi_token", "max_tokens")

    def __init__(self, net, text_tokenizer, image_tokenizer: VQGANTokenizer, prompts: PromptText | None = None,
                 guidance_scale: float = 1.0, source: str = "scratch", boi_token: str = BOI, eoi_token: str = EOI,
                 max_tokens: Budget = "auto", policy: ImagePolicy | None = None):
        base = unwrap(net)
        img2bpe = base.model.vocabulary_mapping.img2bpe
        K = image_tokenizer.codebook_size
        if sorted(img2bpe) != list(range(K)):
            raise ValueError(f"the vocabulary map has {len(img2bpe)} IMGIMG tokens but the VQ-GAN has {K} codes")
        ids = torch.tensor([img2bpe[k] for k in range(K)])  # code k -> vocabulary id
        base.model.vqmodel.requires_grad_(False)  # frozen explicitly (.eval() alone keeps requires_grad)
        super().__init__(net, text_tokenizer, image_tokenizer, image_offset=int(ids.min()), prompts=prompts,
                         guidance_scale=guidance_scale, source=source, boi_token=boi_token, eoi_token=eoi_token,
                         max_tokens=max_tokens, policy=policy, image_token_ids=ids)

    @classmethod
    def default_image_policy(cls, size: int) -> ImagePolicy:
        return chameleon_policy(size)

    def _text_allowed(self, vocab: int) -> torch.Tensor:
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[self.image_token_ids] = False
        image_token = unwrap(self.net).model.vocabulary_mapping.image_token_id
        if image_token is not None:
            allowed[image_token] = False
        return allowed

    # ---- construction / persistence -----------------------------------------------------------------------
    @classmethod
    def create(cls, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype: str | torch.dtype | None = None,
               guidance_scale: float = 1.0, words: Sequence[str] | None = None) -> "AnoleModel":
        """Random weights at a preset size ('tiny' for tests, 'shapes' = Chameleon's 65536-token vocabulary with
        8192 image tokens, 512 px and 1024 codes per image, a 2-layer transformer; 'full' = Chameleon-7B)."""
        if size not in SIZES:
            raise ValueError(f"unknown anole size {size!r}; choose one of {sorted(SIZES)}")
        layers, hidden, heads, ffn, vocab, vq_cfg = SIZES[size]
        codes = [image_token_name(k) for k in range(vq_cfg.n_embed)]
        tok = word_tokenizer(["<s>", "<pad>", "</s>", "<unk>", *codes, EOI, BOI, IMAGE, "\n", *INSTRUCTION_WORDS,
                              *_words(words)],
                             dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
                             extra_special=[EOI, BOI, IMAGE, "\n"], size=vocab)
        config = ChameleonConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            vocabulary_map=tok.get_vocab(), vq_config=vq_cfg.chameleon().to_dict())
        torch.manual_seed(seed)
        with building(device, load_dtype(device, dtype)):
            net = AnoleForConditionalGeneration(config)
        image_tokenizer = VQGANTokenizer.create(vq_cfg, seed=seed).to(device)
        # transformers' own image path (`net.get_image_tokens`) gets the same encoder weights as our tokenizer
        encoder_state = {k: v for k, v in image_tokenizer.vqgan.state_dict().items() if not k.startswith("decoder.")}
        net.model.vqmodel.load_state_dict(encoder_state)
        return cls(net.eval(), tok, image_tokenizer, guidance_scale=guidance_scale, source=f"scratch-{size}",
                   max_tokens=None if size == "tiny" else "auto")

    @classmethod
    def load_net(cls, root: Path, device, dtype: torch.dtype):
        return from_pretrained(AnoleForConditionalGeneration, root, device, dtype)

    @classmethod
    def load_image_tokenizer(cls, candidates: list, net) -> VQGANTokenizer:
        """The released VQ-GAN files; else the encoder of the HF checkpoint's `vqmodel` (no decoder)."""
        found = locate_vqgan(candidates)
        if found is not None:
            return VQGANTokenizer.load(found)
        warnings.warn("no vqgan.yaml/vqgan.ckpt beside the checkpoint: using the HF checkpoint's VQ encoder; "
                      "decoding images will fail until the released vqgan.ckpt + vqgan.yaml are provided")
        return VQGANTokenizer.from_chameleon(unwrap(net).model.vqmodel)
