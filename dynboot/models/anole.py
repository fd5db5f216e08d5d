"""The anole backend: Anole-7B / Chameleon-7B behind the common interface.

transformers' `ChameleonForConditionalGeneration.forward` sets every image-token logit to finfo.min, so it can
never generate an image (an image-only sampler over it draws uniform noise) and `labels=` on image targets
gives loss = inf. `AnoleForConditionalGeneration` is the same network and weights without that mask. The rest is
the causal-lm backend (layouts, scoring, constrained sampling of exactly L codes, CFG, weighted loss), with
Chameleon's image-token map instead of an offset: code k <-> the BPE token named "IMGIMG" + digits of k as
letters A-J + "Z" (`vocabulary_map` in config.json). Pixels go through the released VQ-GAN (vqgan.py); the HF
checkpoint's own `model.vqmodel` (encoder only) is frozen and unused by the LM path.

Checkpoint directory (local files only): the HF Chameleon layout (config.json with `vocabulary_map`,
model*.safetensors, tokenizer files) + `vqgan.yaml` + `vqgan.ckpt` (from the original Chameleon/Anole release's
`tokenizer/` folder; also found under `tokenizer/`); `save` adds `vqgan.safetensors`, `dynboot.json` and
`adapter/` when LoRA-wrapped. Without VQ-GAN files the encoder is taken from `model.vqmodel` (IDP works,
decoding raises).

    m = AnoleModel.load("/ckpt/Anole-7b-v0.1-hf", device="cuda")
    codes = m.sample(before, ["open the drawer"], n=4, guidance_scale=3.0)   # [1, 4, 1024]
"""

from __future__ import annotations

import warnings
import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast

from dynboot.models.hf_parts import INSTRUCTION_WORDS, PromptText, building, load_dtype, unwrap, word_tokenizer
from dynboot.models.liquid import LiquidModel
from dynboot.models.vqgan import VQGANConfig, VQGANTokenizer, locate_vqgan
from dynboot.world.actions import WORDS

BOI, EOI, IMAGE = "<racm3:break>", "<eoss>", "<image>"
SIZES = {  # layers, hidden, heads, ffn, VQ-GAN
    "tiny": (2, 64, 4, 128, VQGANConfig.tiny()),
    "7b": (32, 4096, 32, 11008, VQGANConfig()),
}


def image_token_name(code: int) -> str:
    """Chameleon's BPE name of VQ code k: 'IMGIMG' + each digit d as chr(ord('A') + d) + 'Z'."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


class AnoleForConditionalGeneration(ChameleonForConditionalGeneration):
    """Chameleon without the image-logit mask: image tokens can be generated and trained on."""

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, **kwargs):
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


class AnoleModel(LiquidModel):
    """The Liquid-style causal-LM backend with Chameleon's network and image-token map."""

    backend = "anole"
    net_class = AnoleForConditionalGeneration
    OPTIONS = ("guidance_scale", "boi_token", "eoi_token")

    def __init__(self, net, text_tokenizer, image_tokenizer: VQGANTokenizer, prompts: PromptText | None = None,
                 guidance_scale: float = 1.0, source: str = "scratch", boi_token: str = BOI, eoi_token: str = EOI):
        base = unwrap(net)
        img2bpe = base.model.vocabulary_mapping.img2bpe
        K = image_tokenizer.codebook_size
        if sorted(img2bpe) != list(range(K)):
            raise ValueError(f"the vocabulary map has {len(img2bpe)} IMGIMG tokens but the VQ-GAN has {K} codes")
        self.image_token_ids = torch.tensor([img2bpe[k] for k in range(K)])  # code k -> vocabulary id
        base.model.vqmodel.requires_grad_(False)  # frozen explicitly (.eval() alone keeps requires_grad)
        super().__init__(net, text_tokenizer, image_tokenizer, image_offset=int(self.image_token_ids.min()), prompts=prompts,
                         guidance_scale=guidance_scale, source=source, boi_token=boi_token, eoi_token=eoi_token)

    # ---- Chameleon's image-token ids instead of an offset -----------------------------------------------
    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return self.image_token_ids[codes.cpu()]

    def image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_select(-1, self.image_token_ids.to(logits.device))

    def _text_vocab(self, vocab: int) -> torch.Tensor:
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[self.image_token_ids] = False
        image_token = unwrap(self.net).model.vocabulary_mapping.image_token_id
        if image_token is not None:
            allowed[image_token] = False
        return allowed

    # ---- construction / persistence -----------------------------------------------------------------------
    @classmethod
    def create(cls, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype: str | torch.dtype | None = None,
               guidance_scale: float = 1.0) -> "AnoleModel":
        """Random weights at a preset size ('tiny' for tests, '7b' = Chameleon-7B shapes), offline tokenizer."""
        if size not in SIZES:
            raise ValueError(f"unknown anole size {size!r}; choose one of {sorted(SIZES)}")
        layers, hidden, heads, ffn, vq_cfg = SIZES[size]
        codes = [image_token_name(k) for k in range(vq_cfg.n_embed)]
        tok = word_tokenizer(["<s>", "<pad>", "</s>", "<unk>", *codes, EOI, BOI, IMAGE, "\n", *INSTRUCTION_WORDS, *WORDS],
                             dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
                             extra_special=[EOI, BOI, IMAGE, "\n"], size=65536 if size != "tiny" else None)
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
        return cls(net.eval(), tok, image_tokenizer, guidance_scale=guidance_scale, source=f"scratch-{size}")

    def options(self) -> dict:
        return {"guidance_scale": self.guidance_scale, "boi_token": self.boi_token, "eoi_token": self.eoi_token}

    @classmethod
    def load_image_tokenizer(cls, candidates: list, net) -> VQGANTokenizer:
        """The released VQ-GAN files; else the encoder of the HF checkpoint's `vqmodel` (no decoder)."""
        found = locate_vqgan(candidates)
        if found is not None:
            return VQGANTokenizer.load(found)
        warnings.warn("no vqgan.yaml/vqgan.ckpt beside the checkpoint: using the HF checkpoint's VQ encoder; "
                      "decoding images will fail until the released vqgan.ckpt + vqgan.yaml are provided")
        return VQGANTokenizer.from_chameleon(unwrap(net).model.vqmodel)
