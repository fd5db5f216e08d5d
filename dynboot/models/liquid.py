"""The liquid backend: Liquid-7B is a Gemma causal LM whose vocabulary is extended by the 8192 codes of
Chameleon's VQ-GAN at offset 256000 (code k = token 256000 + k), plus that VQ-GAN. There is no special network
class: any transformers causal LM with readouts added (hf_core.causal_lm_class), the causal-lm layout, the
VQ-GAN tokenizer (vqgan.py) behind Liquid's image recipe (pad to a square with (122, 116, 104), LANCZOS to 512),
Liquid's tokens and prompt text. `LiquidModel` is also the base of the anole backend.

Checkpoint directory (local files only), besides hf_core's layout:
- `vqgan.yaml` + `vqgan.safetensors` (what `save` writes), or Chameleon's released `vqgan.yaml` + `vqgan.ckpt`
  (Liquid's checkpoint does not ship them; copy them in or pass `vqgan_path=`; a Lightning ckpt is converted
  once by `dynboot convert-vqgan`);
- options: image_offset, boi/eoi token names (`<boi>` / `<eoi>` by default; `none` for a layout without image
  brackets), guidance_scale, max_tokens.

    m = LiquidModel.load("/ckpt/Liquid_V1_7B", device="cuda", vqgan_path="/ckpt/chameleon_vqgan")
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import yaml
from transformers import GemmaConfig

from dynboot.models.causal_lm import CausalLMModel
from dynboot.models.hf_core import Budget, HFBackend, causal_lm_class, config_of, from_pretrained, resolve_budget
from dynboot.models.hf_parts import (
    INSTRUCTION_WORDS, PromptText, build_specials, building, load_dtype, token_id, unwrap, word_tokenizer,
)
from dynboot.io.images import ImagePolicy
from dynboot.models.vqgan import YAML_NAME, VQGANConfig, VQGANTokenizer, locate_vqgan

LIQUID_OFFSET = 256000  # Gemma's text vocabulary
LIQUID_FILL = (122, 116, 104)  # Liquid's padding colour (the CLIP mean in 0-255)
SIZES = {  # layers, hidden, heads, kv heads, head_dim, ffn, text vocabulary, VQ-GAN
    "tiny": (2, 64, 4, 1, 16, 128, None, VQGANConfig.tiny()),
    "shapes": (2, 64, 4, 1, 16, 128, LIQUID_OFFSET, VQGANConfig.shapes()),
    "full": (28, 3072, 16, 16, 256, 24576, LIQUID_OFFSET, VQGANConfig()),
}


def liquid_policy(size: int = 512) -> ImagePolicy:
    return ImagePolicy(kind="pad_square", size=size, fill=LIQUID_FILL, resample="lanczos")


class LiquidModel(HFBackend, CausalLMModel):
    backend = "liquid"
    OPTIONS = ("image_offset", "guidance_scale", "boi_token", "eoi_token", "max_tokens")
    LOAD_KEYWORDS = ("vqgan_path",)

    def __init__(self, net, text_tokenizer, image_tokenizer: VQGANTokenizer, image_offset: int = LIQUID_OFFSET,
                 prompts: PromptText | None = None, guidance_scale: float = 1.0, source: str = "scratch",
                 boi_token: str | None = "<boi>", eoi_token: str | None = "<eoi>",
                 max_tokens: Budget = "auto", policy: ImagePolicy | None = None,
                 image_token_ids: torch.Tensor | None = None):
        self.prompts = prompts or PromptText()
        self.boi_token, self.eoi_token = _none(boi_token), _none(eoi_token)
        image_tokenizer.policy = policy or self.default_image_policy(image_tokenizer.image_size)
        vocab = unwrap(net).config.vocab_size
        if image_token_ids is None and image_offset + image_tokenizer.codebook_size > vocab:
            raise ValueError(f"image codes [{image_offset}, {image_offset + image_tokenizer.codebook_size}) do not fit "
                             f"the model's vocabulary of {vocab}; wrong image_offset or VQ-GAN?")
        boi = token_id(text_tokenizer, self.boi_token) if self.boi_token else None
        eoi = token_id(text_tokenizer, self.eoi_token) if self.eoi_token else None
        self.budget_setting = max_tokens
        super().__init__(net, text_tokenizer, image_tokenizer, image_offset=image_offset,
                         specials=build_specials(text_tokenizer, self.prompts, boi, eoi), source=source,
                         guidance_scale=guidance_scale, max_tokens=resolve_budget(max_tokens, net),
                         image_token_ids=image_token_ids)

    @classmethod
    def default_image_policy(cls, size: int) -> ImagePolicy:
        return liquid_policy(size)

    @classmethod
    def default_policy(cls, read) -> ImagePolicy:
        """The policy of a released checkpoint, at its vqgan.yaml's resolution (512, Chameleon's, without one)."""
        text = read(YAML_NAME) or read(f"tokenizer/{YAML_NAME}")
        size = yaml.safe_load(text)["model"]["params"]["ddconfig"]["resolution"] if text else 512
        return cls.default_image_policy(int(size))

    def to(self, device: str | torch.device) -> "LiquidModel":
        self.net.to(device)
        self.tokenizer.to(device)
        return self

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype: str | torch.dtype | None = None,
               guidance_scale: float = 1.0, words: Sequence[str] | None = None) -> "LiquidModel":
        """Random weights at a preset size ('tiny' for tests, 'shapes' = the real vocabulary, image size and code
        grid with a 2-layer transformer, 'full' = Liquid-7B), an offline word-level tokenizer over `words`."""
        if size not in SIZES:
            raise ValueError(f"unknown liquid size {size!r}; choose one of {sorted(SIZES)}")
        layers, hidden, heads, kv, head_dim, ffn, text_vocab, vq_cfg = SIZES[size]
        tok = word_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<boi>", "<eoi>", "\n", *INSTRUCTION_WORDS, *_words(words)],
                             dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
                             extra_special=["<boi>", "<eoi>", "\n"], size=text_vocab)
        offset = len(tok)
        config = GemmaConfig(
            vocab_size=offset + vq_cfg.n_embed, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=8192,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        with building(device, load_dtype(device, dtype)):
            net = causal_lm_class(config)(config)
        image_tokenizer = VQGANTokenizer.create(vq_cfg, seed=seed).to(device)
        return cls(net.eval(), tok, image_tokenizer, image_offset=offset, guidance_scale=guidance_scale,
                   source=f"scratch-{size}", max_tokens=None if size == "tiny" else "auto")

    # ---- persistence -----------------------------------------------------------------------------------
    def _save_image_tokenizer(self, path: Path) -> None:
        self.tokenizer.save(path)

    @classmethod
    def load_net(cls, root: Path, device, dtype: torch.dtype):
        config = config_of(root)
        return from_pretrained(causal_lm_class(config), root, device, dtype, config=config)

    @classmethod
    def load_image_tokenizer(cls, candidates: list, net) -> VQGANTokenizer:
        found = locate_vqgan(candidates)
        if found is None:
            raise FileNotFoundError(f"no {YAML_NAME} (+ vqgan.ckpt) in any of {[str(c) for c in candidates if c]}: "
                                    "put Chameleon's VQ-GAN files beside the checkpoint or pass vqgan_path=")
        return VQGANTokenizer.load(found)

    @classmethod
    def _assemble(cls, net, text_tokenizer, *, path: Path, root: Path, prompts: PromptText, policy, source: str,
                  options: dict, device="cpu", vqgan_path: str | None = None) -> "LiquidModel":
        image_tokenizer = cls.load_image_tokenizer([vqgan_path, path, root, root / "tokenizer"], net).to(device)
        return cls(net, text_tokenizer, image_tokenizer, prompts=prompts, source=source, policy=policy, **options)


def _none(token: str | None) -> str | None:
    return None if token in (None, "", "none", "None") else token


def _words(words: Sequence[str] | None) -> list[str]:
    """The words a random test tokenizer knows: given, else the embedded world's (what tests and the tiny
    pipelines caption); imported here only, so the real backends carry no world vocabulary otherwise."""
    if words is not None:
        return list(words)
    from dynboot.world.actions import WORDS

    return list(WORDS)
