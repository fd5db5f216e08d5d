"""The tiny world model's network: a Llama causal LM plus position and content features for image tokens.

Inductive biases of the *tiny backend* (not of the method), each measured in the reference notes
(shared/reference/toyworld*.md) and documented in the README:
- a learned 2-D cell-position embedding (row + column), shared by the before and after images, added
  to every image token: "same cell in A and B" becomes a content match rather than a RoPE-offset
  circuit that a 2-layer model fails to find;
- a learned "changed cell" embedding for the IDP layout: 1 + [A[i] != B[i]] added to the image tokens
  of cell i in both images, computed from the two input images only (no label). The verifier computes
  it from (before, candidate). FDP sequences carry 0 (the FDP does not know B).
- a "before code" embedding for the FDP layout: the input that predicts B[k] also gets an embedding of
  A[k], the before image's code at the cell it predicts (0 elsewhere and in IDP sequences). A pretrained
  unified model copies unchanged image regions well; a 2-layer model trained from scratch for minutes
  does not (without it, greedy FDP outputs kept 2.5% of the unchanged objects and reached 13% exact).
  With it, copying is free and what the FDP learns is which cells the action changes and into what.

It is a `LlamaForCausalLM` subclass registered with the Auto classes, so `save_pretrained` /
`from_pretrained(local_files_only=True)`, PEFT LoRA, DeepSpeed and activation checkpointing treat it like any
HF causal LM; its forward reads only the requested positions (`readouts=`, heads.py).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dynboot.models.heads import ReadoutMixin, make_selective


class WorldLMConfig(LlamaConfig):
    model_type = "dynboot_world_lm"

    def __init__(self, grid: int = 5, cell_embeddings: bool = True, diff_embeddings: bool = True,
                 before_embeddings: bool = False, codebook_size: int = 0, **kwargs):
        self.grid = grid
        self.cell_embeddings = cell_embeddings
        self.diff_embeddings = diff_embeddings
        self.before_embeddings = before_embeddings  # False in checkpoints saved before the feature existed
        self.codebook_size = codebook_size
        super().__init__(**kwargs)


class WorldLM(ReadoutMixin, LlamaForCausalLM):
    config_class = WorldLMConfig

    def __init__(self, config: WorldLMConfig):
        super().__init__(config)
        h, g = config.hidden_size, config.grid
        # index 0 = "not an image token"; rows/cols are 1..G
        self.row_embed = nn.Embedding(g + 1, h) if config.cell_embeddings else None
        self.col_embed = nn.Embedding(g + 1, h) if config.cell_embeddings else None
        # 0 = no flag (text, or FDP), 1 = cell unchanged between A and B, 2 = changed
        self.diff_embed = nn.Embedding(3, h) if config.diff_embeddings else None
        # 0 = none, 1 + code = the before image's code at the cell this input predicts (FDP)
        self.before_embed = nn.Embedding(config.codebook_size + 1, h) if config.before_embeddings else None
        self.post_init()
        make_selective(self.lm_head)

    def backbone(self, input_ids=None, cell_ids=None, diff_flags=None, before_codes=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if cell_ids is not None and self.row_embed is not None:
            # cell_ids: -1 for text, else the cell index within its image
            is_img = cell_ids >= 0
            g = self.config.grid
            row = torch.where(is_img, cell_ids // g + 1, 0)
            col = torch.where(is_img, cell_ids % g + 1, 0)
            inputs_embeds = inputs_embeds + self.row_embed(row) + self.col_embed(col)
        if diff_flags is not None and self.diff_embed is not None:
            inputs_embeds = inputs_embeds + self.diff_embed(diff_flags)
        if before_codes is not None and self.before_embed is not None:
            inputs_embeds = inputs_embeds + self.before_embed(before_codes)
        return self.model(inputs_embeds=inputs_embeds, **kwargs)


AutoConfig.register(WorldLMConfig.model_type, WorldLMConfig, exist_ok=True)
AutoModelForCausalLM.register(WorldLMConfig, WorldLM, exist_ok=True)
