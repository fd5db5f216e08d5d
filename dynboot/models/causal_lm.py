"""The causal-lm layout (Liquid-style): any transformers causal LM whose vocabulary holds text tokens and the
image codes (at an offset, or through a map as Chameleon's BPE image tokens), plus an image tokenizer.

Images enter a sequence as the vocabulary ids of their codes, for reading (IDP, the FDP before image) and for
writing (the generated after image) alike. The image head is the lm head's image-code rows: a contiguous slice
when the codes sit at an offset, else an index. Everything else (loss, scoring, captioning, sampling, the
token budget) is the shared core (core.py); this file only says how codes become ids and rows.

Subclasses whose image codes do not sit at one contiguous offset (Chameleon's BPE image tokens) set
`image_token_ids` (code k -> id), and may override `_text_allowed`.
"""

from __future__ import annotations

import torch

from dynboot.models.base import ImageTokenizer
from dynboot.models.core import SequenceModel
from dynboot.models.heads import Readout
from dynboot.models.prompts import Specials, fdp_layout, idp_layout, pad_layouts


class CausalLMModel(SequenceModel):
    backend = "causal-lm"

    def __init__(self, net, text_tokenizer, image_tokenizer: ImageTokenizer, image_offset: int, specials: Specials,
                 source: str = "scratch", guidance_scale: float = 1.0, max_tokens: int | None = None,
                 image_token_ids: torch.Tensor | None = None):
        self.net = net
        self.text_tokenizer = text_tokenizer
        self.tokenizer = image_tokenizer
        self.image_offset = image_offset
        self.specials = specials
        self.source = source
        self.guidance_scale = guidance_scale
        self.max_tokens = max_tokens
        self.read_tokens = image_tokenizer.tokens_per_image
        K = image_tokenizer.codebook_size
        ids = torch.arange(image_offset, image_offset + K) if image_token_ids is None else image_token_ids.long()
        self.image_token_ids = ids  # code k -> vocabulary id (CPU; a device copy is kept for decoding steps)
        contiguous = bool(torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + K))) if K else True
        self.image_rows: slice | torch.Tensor = slice(int(ids[0]), int(ids[0]) + K) if contiguous else ids
        self._ids_on: dict[torch.device, torch.Tensor] = {}

    # ---- codes <-> ids ---------------------------------------------------------------------------------
    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Image codes -> vocabulary ids (on the codes' device)."""
        if isinstance(self.image_rows, slice):
            return codes + self.image_rows.start
        dev = codes.device
        if dev not in self._ids_on:
            self._ids_on[dev] = self.image_token_ids.to(dev)
        return self._ids_on[dev][codes]

    def image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., vocab] -> [..., codebook]: the logits of the image tokens, in code order (for full-logit references)."""
        if isinstance(self.image_rows, slice):
            return logits[..., self.image_rows]
        return logits.index_select(-1, self.image_rows.to(logits.device))

    def image_readout(self, mask: torch.Tensor, labels: torch.Tensor | None = None) -> Readout:
        rows = self.image_rows if isinstance(self.image_rows, slice) else self.image_rows.to(self.device)
        return Readout(mask, labels, head="lm", rows=rows)

    def _codes(self, images_or_codes) -> torch.Tensor:
        if isinstance(images_or_codes, torch.Tensor) and images_or_codes.dtype == torch.int64:
            return images_or_codes.reshape(-1, self.tokenizer.tokens_per_image).cpu()
        return self.tokenizer.encode(images_or_codes).cpu()

    def _vocab(self, codes: torch.Tensor) -> list[int]:
        return self.codes_to_ids(codes).tolist()

    def _text_allowed(self, vocab: int) -> torch.Tensor:
        """Text ids: those below the image codes."""
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[: self.image_offset] = True
        return allowed

    # ---- batches -----------------------------------------------------------------------------------------
    def _idp_batch(self, before, after, actions, left_pad: bool) -> dict[str, torch.Tensor]:
        a, b = self._codes(before), self._codes(after)
        layouts = [idp_layout(self.specials, self._vocab(a[i]), self._vocab(b[i]), None if actions is None else actions[i])
                   for i in range(len(a))]
        batch = pad_layouts(layouts, self.specials.pad, left_pad)
        batch["codes_a"], batch["codes_b"] = a, b
        return batch

    def _fdp_batch(self, before, actions, after, left_pad: bool) -> dict[str, torch.Tensor]:
        a = self._codes(before)
        b = None if after is None else self._codes(after)
        layouts = [fdp_layout(self.specials, self._vocab(a[i]), actions[i], None if b is None else self._vocab(b[i]))
                   for i in range(len(a))]
        batch = pad_layouts(layouts, self.specials.pad, left_pad)
        if b is not None:
            on_b = (batch["image_of"] == 1) & batch["target"]
            codes = torch.gather(b, 1, batch["cell_of"].clamp(min=0))
            batch["label_codes"] = torch.where(on_b, codes, batch["label_codes"])
        batch["codes_a"] = a
        return batch

    def _net_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device
        return {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "position_ids")}

    def _image_step(self, codes: torch.Tensor, t: int, batch: dict, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.codes_to_ids(codes)[:, None]}
