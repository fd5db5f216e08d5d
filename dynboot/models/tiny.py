"""The tiny world model: the causal-lm backend on the embedded world, trainable from scratch on 2 CPU cores.

- text: a word-level Hugging Face tokenizer over the world's action vocabulary;
- images: the exact grid tokenizer (one code per cell) at a vocabulary offset; any image is first brought to
  the frame size (its policy: both sides to the frame, nearest neighbour);
- network: `WorldLM` (Llama + cell-position, changed-cell and before-code embeddings, see world_lm.py). Those
  world features are this backend's alone: the batches and decoding steps below add them to the inputs;
- grammar-constrained captioning: candidates are the actions whose preconditions hold in the before
  image (`valid_actions`), never simulated against the after image (that would need no model at all);
- its FDP loss normalises image targets over the whole (tiny) vocabulary, as the quickstart was measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dynboot.models.base import TinySize
from dynboot.models.causal_lm import CausalLMModel
from dynboot.io.images import ImagePolicy
from dynboot.models.registry import read_description
from dynboot.models.world_lm import WorldLM, WorldLMConfig
from dynboot.models.prompts import Specials
from dynboot.io.rundir import write_json
from dynboot.world.actions import WORDS, valid_actions
from dynboot.world.render import GridTokenizer
from dynboot.world.scene import WorldSpec

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<sep>", "<unk>"]
SIZES: dict[TinySize, tuple[int, int, int, int]] = {  # layers, hidden, heads, ffn
    "xxs": (2, 64, 4, 256),
    "xs": (2, 128, 4, 512),
    "s": (4, 128, 4, 512),
    "m": (4, 256, 8, 1024),
}
assert set(SIZES) == set(get_args(TinySize))
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


def world_policy(spec: WorldSpec) -> ImagePolicy:
    return ImagePolicy(kind="squash", size=spec.image_px, resample="nearest")


class WorldTokenizer(GridTokenizer):
    """The exact grid tokenizer behind an image policy: any image is brought to the frame size first."""

    def __init__(self, spec: WorldSpec):
        super().__init__(spec)
        self.policy = world_policy(spec)

    def encode(self, images) -> torch.Tensor:
        return super().encode(self.policy.apply_batch(images))

    def features(self, images) -> torch.Tensor:
        return super().features(self.policy.apply_batch(images))


class TinyWorldModel(CausalLMModel):
    backend = "tiny"
    fdp_loss_over = "vocab"

    def __init__(self, net: WorldLM, spec: WorldSpec, text_tokenizer=None, source: str = "scratch"):
        text_tokenizer = text_tokenizer or word_tokenizer()
        self.spec = spec
        super().__init__(net, text_tokenizer, WorldTokenizer(spec), image_offset=len(text_tokenizer),
                         specials=_specials(text_tokenizer), source=source)
        self.candidates = self._candidates  # the caption grammar (None = unconstrained)

    def _candidates(self, before_codes: np.ndarray) -> list[str]:
        return [a.text(self.spec) for a in valid_actions(self.spec, before_codes)]

    # ---- the world features of the inputs ------------------------------------------------------------------
    def _idp_batch(self, before, after, actions, left_pad: bool) -> dict[str, torch.Tensor]:
        batch = super()._idp_batch(before, after, actions, left_pad)
        # 1 + [A[i] != B[i]] at the image tokens of cell i of both images
        changed = (batch["codes_a"] != batch["codes_b"]).long() + 1
        is_img = batch["cell_of"] >= 0
        batch["diff_flags"] = torch.where(is_img, torch.gather(changed, 1, batch["cell_of"].clamp(min=0)), 0)
        return batch

    def _fdp_batch(self, before, actions, after, left_pad: bool) -> dict[str, torch.Tensor]:
        batch = super()._fdp_batch(before, actions, after, left_pad)
        batch["diff_flags"] = torch.zeros_like(batch["input_ids"])  # the FDP does not know B
        # 1 + A[k] at the inputs that predict cell k of the generated image, 0 elsewhere
        predicts = (batch["cell_in"] >= 0) & (batch["image_of"] != 0)
        batch["before_codes"] = torch.where(predicts, torch.gather(batch["codes_a"], 1, batch["cell_in"].clamp(min=0)) + 1, 0)
        return batch

    def _net_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super()._net_inputs(batch)
        dev = self.device
        out["cell_ids"] = batch["cell_in"].to(dev)
        out["diff_flags"] = batch.get("diff_flags", torch.zeros_like(batch["input_ids"])).to(dev)
        if "before_codes" in batch:
            out["before_codes"] = batch["before_codes"].to(dev)
        return out

    def _text_step(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": tokens[:, None], "cell_ids": torch.full_like(tokens[:, None], -1),
                "diff_flags": torch.zeros_like(tokens[:, None])}

    def _image_step(self, codes: torch.Tensor, t: int, batch: dict, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        a = batch["codes_a"].to(codes.device)[rows]  # the before codes of each decoded row
        return {"input_ids": self.codes_to_ids(codes)[:, None], "cell_ids": torch.full_like(codes[:, None], t + 1),
                "diff_flags": torch.zeros_like(codes[:, None]), "before_codes": a[:, t + 1: t + 2] + 1}  # code t in, t+1 out

    def _caption_tries(self, batch: dict) -> list[list[list[int]]] | None:
        if self.candidates is None:
            return None
        eos = self.specials.eos
        return [[self.text_ids(c) + [eos] for c in self.candidates(a.numpy())] for a in batch["codes_a"]]

    # ---- construction / persistence ------------------------------------------------------------------------
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
        s = self.specials
        return {"backend": self.backend, "image_offset": self.image_offset, "world": self.spec.model_dump(),
                "image_policy": self.tokenizer.policy.model_dump(mode="json"),
                "specials": {"bos": s.bos, "eos": s.eos, "sep": s.sep, "pad": s.pad, "boi": s.boi, "eoi": s.eoi,
                             "instruction_idp": s.instruction_idp, "instruction_fdp": s.instruction_fdp,
                             "action_pad_to": s.action_pad_to}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.net.save_pretrained(path)
        self.text_tokenizer.save_pretrained(path)
        write_json(path / "dynboot.json", self.describe())
        return path

    @classmethod
    def default_policy(cls, read) -> ImagePolicy:
        """The policy of a checkpoint saved before policies were recorded: from its world spec."""
        return world_policy(WorldSpec.model_validate(json.loads(read("dynboot.json"))["world"]))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", **_: object) -> "TinyWorldModel":
        path = Path(path)
        spec = WorldSpec.model_validate(read_description(path)["world"])
        net = WorldLM.from_pretrained(path, local_files_only=True).to(device)
        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return cls(net.eval(), spec, tok, source=path.name)
