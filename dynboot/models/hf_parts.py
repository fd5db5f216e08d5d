"""Hugging Face plumbing shared by the real backends (anole, liquid, janus).

- LoRA on the language model only: a plain `target_modules=["q_proj", ...]` also wraps VQ / vision-tower
  attention (Janus's SigLIP has q/k/v_proj), so backends name every language-model projection in full.
- Checkpoints hold base weights + a PEFT adapter: `save_net` writes the base in the HF layout at `path`
  (LoRA layers stripped back to their base weights) and the adapter under `path/adapter/` as PEFT saves it;
  `attach_adapter` wraps a freshly loaded base with it. A checkpoint may instead name its base directory in
  dynboot.json (`base_model_path`) and hold only the adapter, to avoid copying 7B weights per export.
- Prompt text -> `Specials`, and token lookups that fail loudly.
- Offline word-level tokenizers for random-weight builds (tests, GPU smoke): no downloads.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from dynboot.prompts import Specials

ADAPTER_DIR = "adapter"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- LoRA / adapters --------------------------------------------------------------------------------
def unwrap(net: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return net.get_base_model() if isinstance(net, PeftModel) else net


def language_model_projections(net: nn.Module, layers_prefix: str) -> list[str]:
    """Full names of the attention/MLP projections under `layers_prefix` (e.g. 'model.layers.')."""
    names = [n for n, m in unwrap(net).named_modules()
             if n.startswith(layers_prefix) and n.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"no projections under {layers_prefix!r}: not the architecture this backend expects")
    return names


def base_state_dict(net: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's weights with PEFT's wrappers removed (keys as in the original checkpoint)."""
    out = {}
    for key, value in net.get_base_model().state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


def save_net(net: nn.Module, path: Path, include_base: bool = True) -> None:
    if isinstance(net, PeftModel):
        if include_base:
            net.get_base_model().save_pretrained(path, state_dict=base_state_dict(net))
        net.save_pretrained(path / ADAPTER_DIR)
    elif include_base:
        net.save_pretrained(path)
    else:
        raise ValueError("include_base=False needs a PEFT-wrapped net (there is no adapter to save on its own)")


def checkpoint_description(path: Path) -> dict:
    """dynboot.json of a checkpoint directory, or {} for a checkpoint as released (no dynboot.json)."""
    meta = path / "dynboot.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def base_dir(path: Path, desc: dict) -> Path:
    """Where the base weights of checkpoint `path` live (itself, or dynboot.json's `base_model_path`)."""
    if (path / "config.json").is_file():
        return path
    if desc.get("base_model_path"):
        return Path(desc["base_model_path"])
    raise FileNotFoundError(f"{path}: no config.json and no base_model_path in dynboot.json")


def attach_adapter(net: nn.Module, path: Path, trainable: bool = False) -> nn.Module:
    adapter = path / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return net
    return PeftModel.from_pretrained(net, str(adapter), is_trainable=trainable)


def known_options(cls, overrides: dict) -> dict:
    """The load-time keywords a backend understands (`cls.OPTIONS`); others are named in a warning."""
    unknown = sorted(set(overrides) - set(cls.OPTIONS))
    if unknown:
        warnings.warn(f"{cls.__name__}.load ignores {unknown}; it understands {list(cls.OPTIONS)}")
    return {k: v for k, v in overrides.items() if k in cls.OPTIONS}


def load_dtype(device: str | torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """bfloat16 on accelerators, float32 on CPU, unless given."""
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


@contextmanager
def building(device: str | torch.device, dtype: torch.dtype):
    """Create modules directly on `device` in `dtype` (a random 7B model never materialises in CPU fp32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


# ---- prompts / tokens ---------------------------------------------------------------------------------
@dataclass
class PromptText:
    """The text around images and actions, stored in dynboot.json and re-tokenised on load."""

    idp: str = "What action turns the first image into the second?"
    fdp: str = "Show the image after the action."
    sep: str = "\n"


def token_id(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no {token!r} token; this backend needs it (set the token name explicitly)")
    return int(tid)


def text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def build_specials(tokenizer, prompts: PromptText, boi: int | None, eoi: int | None, bos: str | None = None,
                   eos: str | None = None, pad: str | None = None) -> Specials:
    bos_id = token_id(tokenizer, bos) if bos else tokenizer.bos_token_id
    eos_id = token_id(tokenizer, eos) if eos else tokenizer.eos_token_id
    pad_id = token_id(tokenizer, pad) if pad else tokenizer.pad_token_id
    if bos_id is None or eos_id is None:
        raise ValueError("the tokenizer defines no bos/eos token")
    sep = text_ids(tokenizer, prompts.sep)
    if not sep:
        raise ValueError(f"separator {prompts.sep!r} tokenises to nothing")
    return Specials(bos=bos_id, eos=eos_id, sep=sep, pad=eos_id if pad_id is None else pad_id, boi=boi, eoi=eoi,
                    instruction_idp=text_ids(tokenizer, prompts.idp), instruction_fdp=text_ids(tokenizer, prompts.fdp))


def prompts_dict(p: PromptText) -> dict:
    return asdict(p)


# ---- offline tokenizers for random-weight builds ---------------------------------------------------------
INSTRUCTION_WORDS = ("what action turns the first image into second ? show after .").split()


def word_tokenizer(vocab: list[str], special: dict[str, str], extra_special: list[str] = (), unk: str = "<unk>",
                   size: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: `vocab` in order (ids 0..), lower-cased words and punctuation, `extra_special` tokens
    (image codes, separators) matched whole; padded with `<reservedNNNNN>` entries up to `size`."""
    vocab = list(dict.fromkeys([*vocab, *extra_special]))
    if size is not None:
        vocab += [f"<reserved{i:05d}>" for i in range(len(vocab), size)]
    table = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **special)
    out.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return out
