"""Hugging Face plumbing shared by the real backends (anole, liquid, janus); their save/load is hf_core.py.

- LoRA on the language model only: a plain `target_modules=["q_proj", ...]` also wraps VQ / vision-tower
  attention (Janus's SigLIP has q/k/v_proj), so backends name every language-model projection in full.
- Construction directly on the target device and dtype (a random 7B model never materialises in CPU fp32).
- Prompt text -> `Specials`, and token lookups that fail loudly.
- Offline word-level tokenizers for random-weight builds (tests, init-model, GPU smoke): no downloads.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from dynboot.models.prompts import Specials

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- LoRA ---------------------------------------------------------------------------------------------------
def unwrap(net: nn.Module) -> nn.Module:
    """The transformers model under its wrappers (DeepSpeed engine / DDP `.module`, PEFT; LoRA layers stay in)."""
    while not isinstance(net, PeftModel) and isinstance(getattr(net, "module", None), nn.Module):
        net = net.module
    return net.get_base_model() if isinstance(net, PeftModel) else net


def language_model_projections(net: nn.Module, layers_prefix: str) -> list[str]:
    """Full names of the attention/MLP projections under `layers_prefix` (e.g. 'model.layers.')."""
    names = [n for n, m in unwrap(net).named_modules()
             if n.startswith(layers_prefix) and n.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"no projections under {layers_prefix!r}: not the architecture this backend expects")
    return names


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
