"""The tiny world model: the causal-lm backend on the embedded world, trainable from scratch on 2 CPU cores.

- text: a word-level Hugging Face tokenizer over the world's action vocabulary;
- images: the exact grid tokenizer (one code per cell) at a vocabulary offset;
- network: `WorldLM` (Llama + cell-position and changed-cell embeddings, see world_lm.py);
- grammar-constrained captioning: candidates are the actions whose preconditions hold in the before
  image (`valid_actions`), never simulated against the after image (that would need no model at all).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dynboot.models.causal_lm import CausalLMModel
from dynboot.models.world_lm import WorldLM, WorldLMConfig
from dynboot.prompts import Specials
from dynboot.world.actions import WORDS, valid_actions
from dynboot.world.render import GridTokenizer
from dynboot.world.scene import WorldSpec

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<sep>", "<unk>"]
SIZES = {  # layers, hidden, heads, ffn
    "xxs": (2, 64, 4, 256),
    "xs": (2, 128, 4, 512),
    "s": (4, 128, 4, 512),
    "m": (4, 256, 8, 1024),
}
ACTION_PAD = 9  # longest action ("add a red circle left of the blue square") is 9 words


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", sep_token="<sep>")


def _specials(tok: PreTrainedTokenizerFast) -> Specials:
    ids = tok.convert_tokens_to_ids
    return Specials(bos=ids("<bos>"), eos=ids("<eos>"), sep=[ids("<sep>")], pad=ids("<pad>"), action_pad_to=ACTION_PAD)


class TinyWorldModel(CausalLMModel):
    backend = "tiny"

    def __init__(self, net: WorldLM, spec: WorldSpec, text_tokenizer=None, source: str = "scratch"):
        text_tokenizer = text_tokenizer or word_tokenizer()
        self.spec = spec
        grid = GridTokenizer(spec)
        super().__init__(net, text_tokenizer, grid, image_offset=len(text_tokenizer), specials=_specials(text_tokenizer),
                         candidates=self._candidates, source=source)

    def _candidates(self, before_codes: np.ndarray) -> list[str]:
        return [a.text(self.spec) for a in valid_actions(self.spec, before_codes)]

    @classmethod
    def create(cls, spec: WorldSpec, size: str = "xs", seed: int = 0, diff_embeddings: bool = True) -> "TinyWorldModel":
        if size not in SIZES:
            raise ValueError(f"unknown tiny size {size!r}; choose one of {sorted(SIZES)}")
        layers, hidden, heads, ffn = SIZES[size]
        tok = word_tokenizer()
        cfg = WorldLMConfig(
            grid=spec.grid, vocab_size=len(tok) + 1 + spec.n_kinds, hidden_size=hidden, intermediate_size=ffn,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=256, tie_word_embeddings=False, diff_embeddings=diff_embeddings,
            before_embeddings=True, codebook_size=1 + spec.n_kinds,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        return cls(WorldLM(cfg), spec, tok, source=f"scratch-{size}")

    def describe(self) -> dict:
        return super().describe() | {"world": self.spec.model_dump()}

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", **_: object) -> "TinyWorldModel":
        path = Path(path)
        desc = cls.read_description(path)
        spec = WorldSpec.model_validate(desc["world"])
        net = WorldLM.from_pretrained(path, local_files_only=True).to(device)
        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return cls(net.eval(), spec, tok, source=path.name)


def load_world_spec_from_checkpoint(path: str | Path) -> WorldSpec:
    return WorldSpec.model_validate(json.loads((Path(path) / "dynboot.json").read_text())["world"])
