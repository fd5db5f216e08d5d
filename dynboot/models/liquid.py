"""The liquid backend: Liquid-7B is a Gemma causal LM whose vocabulary is extended by the 8192 codes of
Chameleon's VQ-GAN at offset 256000 (code k = token 256000 + k), plus that VQ-GAN. There is no special network
class: this is the causal-lm backend with the VQ-GAN tokenizer (vqgan.py), Liquid's tokens and prompt text,
and a loader for the local checkpoint layout. `LiquidModel` is also the base of the anole backend.

Checkpoint directory (local files only):
- the HF causal-LM layout: config.json (`model_type: gemma`), model*.safetensors, tokenizer files;
- `vqgan.yaml` + `vqgan.ckpt`: Chameleon's released VQ-GAN (Liquid's checkpoint does not ship it; copy it in,
  or pass `vqgan_path=`); `save` writes `vqgan.safetensors` instead of the ckpt;
- optional `dynboot.json` (written by `save`): backend, prompt text, `options` (image_offset, boi/eoi token
  names, guidance_scale); `adapter/` when the net is LoRA-wrapped.
Token names default to `<boi>` / `<eoi>`; if a checkpoint's tokenizer names them differently, pass
`boi_token=` / `eoi_token=` (or `none` for a layout without image brackets).

    m = LiquidModel.load("/ckpt/Liquid_V1_7B", device="cuda", vqgan_path="/ckpt/chameleon_vqgan")
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GemmaConfig, GemmaForCausalLM

from dynboot.models.causal_lm import CausalLMModel
from dynboot.models.hf_parts import (
    INSTRUCTION_WORDS, PromptText, attach_adapter, base_dir, build_specials, building, checkpoint_description,
    known_options, language_model_projections, load_dtype, save_net, token_id, unwrap, word_tokenizer,
)
from dynboot.models.vqgan import YAML_NAME, VQGANConfig, VQGANTokenizer, locate_vqgan
from dynboot.rundir import write_json
from dynboot.world.actions import WORDS

LIQUID_OFFSET = 256000  # Gemma's text vocabulary
SIZES = {  # layers, hidden, heads, kv heads, head_dim, ffn, text vocabulary, VQ-GAN
    "tiny": (2, 64, 4, 1, 16, 128, None, VQGANConfig.tiny()),
    "7b": (28, 3072, 16, 16, 256, 24576, LIQUID_OFFSET, VQGANConfig()),
}


class LiquidModel(CausalLMModel):
    backend = "liquid"
    net_class = AutoModelForCausalLM
    OPTIONS = ("image_offset", "guidance_scale", "boi_token", "eoi_token")  # dynboot.json / load(...) keywords

    def __init__(self, net, text_tokenizer, image_tokenizer: VQGANTokenizer, image_offset: int = LIQUID_OFFSET,
                 prompts: PromptText | None = None, guidance_scale: float = 1.0, source: str = "scratch",
                 boi_token: str | None = "<boi>", eoi_token: str | None = "<eoi>"):
        self.prompts = prompts or PromptText()
        self.boi_token, self.eoi_token = _none(boi_token), _none(eoi_token)
        vocab = unwrap(net).config.vocab_size
        if image_offset + image_tokenizer.codebook_size > vocab:
            raise ValueError(f"image codes [{image_offset}, {image_offset + image_tokenizer.codebook_size}) do not fit "
                             f"the model's vocabulary of {vocab}; wrong image_offset or VQ-GAN?")
        boi = token_id(text_tokenizer, self.boi_token) if self.boi_token else None
        eoi = token_id(text_tokenizer, self.eoi_token) if self.eoi_token else None
        super().__init__(net, text_tokenizer, image_tokenizer, image_offset=image_offset,
                         specials=build_specials(text_tokenizer, self.prompts, boi, eoi), source=source,
                         guidance_scale=guidance_scale)

    def lora_target_modules(self) -> list[str]:
        return language_model_projections(self.net, "model.layers.")

    def to(self, device: str | torch.device) -> "LiquidModel":
        self.net.to(device)
        self.tokenizer.to(device)
        return self

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype: str | torch.dtype | None = None,
               guidance_scale: float = 1.0) -> "LiquidModel":
        """Random weights at a preset size ('tiny' for tests, '7b' = Liquid-7B shapes), offline tokenizer."""
        if size not in SIZES:
            raise ValueError(f"unknown liquid size {size!r}; choose one of {sorted(SIZES)}")
        layers, hidden, heads, kv, head_dim, ffn, text_vocab, vq_cfg = SIZES[size]
        tok = word_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<boi>", "<eoi>", "\n", *INSTRUCTION_WORDS, *WORDS],
                             dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
                             extra_special=["<boi>", "<eoi>", "\n"], size=text_vocab)
        offset = len(tok)
        config = GemmaConfig(
            vocab_size=offset + vq_cfg.n_embed, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=8192,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        with building(device, load_dtype(device, dtype)):
            net = GemmaForCausalLM(config)
        image_tokenizer = VQGANTokenizer.create(vq_cfg, seed=seed).to(device)
        return cls(net.eval(), tok, image_tokenizer, image_offset=offset, guidance_scale=guidance_scale,
                   source=f"scratch-{size}")

    # ---- persistence -----------------------------------------------------------------------------------
    def options(self) -> dict:
        return {"image_offset": self.image_offset, "guidance_scale": self.guidance_scale,
                "boi_token": self.boi_token, "eoi_token": self.eoi_token}

    def describe(self) -> dict:
        return {"backend": self.backend, "prompts": vars(self.prompts), "options": self.options()}

    def save(self, path: str | Path, include_base: bool = True, base_model_path: str | None = None) -> Path:
        """Base weights (unless `include_base=False`, then dynboot.json points at `base_model_path`), adapter,
        text tokenizer, VQ-GAN (yaml + safetensors), dynboot.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_net(self.net, path, include_base)
        self.text_tokenizer.save_pretrained(path)
        self.tokenizer.save(path)
        desc = self.describe()
        if not include_base:
            if not base_model_path:
                raise ValueError("include_base=False needs base_model_path (the directory holding the base weights)")
            desc["base_model_path"] = str(Path(base_model_path).resolve())
        write_json(path / "dynboot.json", desc)
        return path

    @classmethod
    def load_image_tokenizer(cls, candidates: list, net) -> VQGANTokenizer:
        found = locate_vqgan(candidates)
        if found is None:
            raise FileNotFoundError(f"no {YAML_NAME} (+ vqgan.ckpt) in any of {[str(c) for c in candidates if c]}: "
                                    "put Chameleon's VQ-GAN files beside the checkpoint or pass vqgan_path=")
        return VQGANTokenizer.load(found)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None,
             vqgan_path: str | None = None, trainable_adapter: bool = False, **overrides: object) -> "LiquidModel":
        """A local checkpoint directory; `overrides` may set any of `OPTIONS` (e.g. boi_token=...)."""
        path = Path(path)
        desc = checkpoint_description(path)
        root = base_dir(path, desc)
        net = cls.net_class.from_pretrained(root, local_files_only=True, dtype=load_dtype(device, dtype))
        net = attach_adapter(net.to(device), path, trainable_adapter).eval()
        tok_dir = path if (path / "tokenizer_config.json").is_file() else root
        text_tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        image_tokenizer = cls.load_image_tokenizer([vqgan_path, path, root, root / "tokenizer"], net).to(device)
        options = {**desc.get("options", {}), **known_options(cls, overrides)}
        return cls(net, text_tokenizer, image_tokenizer, prompts=PromptText(**desc.get("prompts", {})),
                   source=path.name, **options)


def _none(token: str | None) -> str | None:
    return None if token in (None, "", "none", "None") else token
