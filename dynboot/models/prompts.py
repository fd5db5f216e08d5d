"""Prompt layouts for IDP and FDP, defined once for every backend.

    IDP  <bos> [instr] <boi> A <eoi> <sep> <boi> B <eoi> <sep> ACTION <eos>          target: ACTION <eos>
    FDP  <bos> [instr] <boi> A <eoi> <sep> ACTION [pad..] <sep> <boi> B <eoi> <eos>   target: B (+ <eoi>) <eos>

Backends fill in their own special ids (`boi`/`eoi` may be absent, as in the tiny world model) and an
optional instruction. The FDP action is padded to a fixed number of tokens when the backend asks for it,
so that A->B always sits at the same relative offset (this helped tiny models learn; see README).

Each layout returns token ids plus, per position, which image and cell it holds (`image_of`, `cell_of`,
-1 for text) and the target weight slots, so backends can add position features and losses without
re-deriving the layout. `cell_in` is the cell a position-aware backend tells the input token about: its own
cell, except inside the generated FDP image, where each input carries the cell it predicts next (the token
before the first code carries cell 0, code i carries cell i+1). The query that predicts B[k] then holds the
same cell feature as A[k], so copying an unchanged cell is one attention match instead of an
"offset by one cell" relation (see README, inductive biases).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Specials:
    bos: int
    eos: int
    sep: list[int]  # separator token ids (a single token, or a short text)
    pad: int
    boi: int | None = None
    eoi: int | None = None
    instruction_idp: list[int] = field(default_factory=list)
    instruction_fdp: list[int] = field(default_factory=list)
    action_pad_to: int = 0  # pad FDP actions to this many tokens (0 = no padding)


@dataclass
class Layout:
    ids: list[int]
    image_of: list[int]  # 0 = before image, 1 = after image, -1 = not an image code
    cell_of: list[int]  # cell index within its image, -1 for text
    cell_in: list[int]  # cell feature of the input token (see module doc), -1 for none
    target: list[bool]  # positions whose token is predicted by the loss (labels at these positions)
    prefix_len: int  # tokens before the generated part (FDP: start of B; IDP: start of the action)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"ids": np.asarray(self.ids), "image_of": np.asarray(self.image_of),
                "cell_of": np.asarray(self.cell_of), "cell_in": np.asarray(self.cell_in), "target": np.asarray(self.target)}


class _Builder:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.image_of: list[int] = []
        self.cell_of: list[int] = []
        self.cell_in: list[int] = []
        self.target: list[bool] = []

    def text(self, ids: list[int], target: bool = False) -> None:
        self.ids += ids
        self.image_of += [-1] * len(ids)
        self.cell_of += [-1] * len(ids)
        self.cell_in += [-1] * len(ids)
        self.target += [target] * len(ids)

    def image(self, vocab_ids: list[int], which: int, s: Specials, target: bool = False) -> None:
        if s.boi is not None:
            self.text([s.boi])
        self.ids += vocab_ids
        self.image_of += [which] * len(vocab_ids)
        self.cell_of += list(range(len(vocab_ids)))
        self.cell_in += list(range(len(vocab_ids)))
        self.target += [target] * len(vocab_ids)
        if s.eoi is not None:
            self.text([s.eoi], target=target)

    def done(self, prefix_len: int) -> Layout:
        return Layout(self.ids, self.image_of, self.cell_of, self.cell_in, self.target, prefix_len)


def idp_layout(s: Specials, before: list[int], after: list[int], action: list[int] | None) -> Layout:
    """IDP sequence; with `action=None` the prompt alone (for captioning)."""
    b = _Builder()
    b.text([s.bos] + s.instruction_idp)
    b.image(before, 0, s)
    b.text(s.sep)
    b.image(after, 1, s)
    b.text(s.sep)
    prefix = len(b.ids)
    if action is not None:
        b.text(action + [s.eos], target=True)
    return b.done(prefix)


def fdp_layout(s: Specials, before: list[int], action: list[int], after: list[int] | None) -> Layout:
    """FDP sequence; with `after=None` the prompt alone, ending where the first image code goes."""
    b = _Builder()
    b.text([s.bos] + s.instruction_fdp)
    b.image(before, 0, s)
    b.text(s.sep)
    if s.action_pad_to and len(action) > s.action_pad_to:
        action = action[: s.action_pad_to]
    b.text(action + [s.pad] * max(0, s.action_pad_to - len(action)))
    b.text(s.sep)
    if s.boi is not None:
        b.text([s.boi])
    b.cell_in[-1] = 0  # this token predicts the first code
    prefix = len(b.ids)
    if after is not None:
        # the <boi> was emitted above, so the after image goes in without its own opening token
        b.ids += after
        b.image_of += [1] * len(after)
        b.cell_of += list(range(len(after)))
        b.cell_in += list(range(1, len(after))) + [-1]  # code i predicts code i+1; the last predicts the end
        b.target += [True] * len(after)
        if s.eoi is not None:
            b.text([s.eoi], target=True)
        b.text([s.eos], target=True)
    return b.done(prefix)


def pad_layouts(layouts: list[Layout], pad: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad layouts into tensors (right-padded for training/scoring, left-padded for generation)."""
    n = max(len(l.ids) for l in layouts)
    B = len(layouts)
    ids = torch.full((B, n), pad, dtype=torch.long)
    mask = torch.zeros((B, n), dtype=torch.long)
    target = torch.zeros((B, n), dtype=torch.bool)
    cells = torch.full((B, n), -1, dtype=torch.long)
    cells_in = torch.full((B, n), -1, dtype=torch.long)
    images = torch.full((B, n), -1, dtype=torch.long)
    for i, l in enumerate(layouts):
        sl = slice(n - len(l.ids), n) if left_pad else slice(0, len(l.ids))
        ids[i, sl] = torch.tensor(l.ids)
        mask[i, sl] = 1
        target[i, sl] = torch.tensor(l.target)
        cells[i, sl] = torch.tensor(l.cell_of)
        cells_in[i, sl] = torch.tensor(l.cell_in)
        images[i, sl] = torch.tensor(l.image_of)
    out = {"input_ids": ids, "attention_mask": mask, "target": target, "cell_of": cells, "cell_in": cells_in,
           "image_of": images}
    out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    out["label_codes"] = torch.full((B, n), -1, dtype=torch.long)  # filled by the backend at generated-image targets
    return out
