"""Output heads that compute logits only where a result is read, in bounded chunks.

A 7B unified model's vocabulary is 65k-264k tokens and its sequences 1-2k tokens: the full `[B, S, V]` fp32
logits of one batch are tens of GB. Nothing here ever builds them. A forward takes `readouts`: which positions
to read (a mask), through which head ("lm" = the language-model head, optionally only some of its rows, e.g.
the image codes; "generation" = Janus's codebook-sized image head), and either labels (-> log p(label) at each
position, the log-sum-exp taken over the head's rows in chunks of at most `logit_chunk` logits) or no labels
(-> the logits of the read positions, fp32: one row per sequence when sampling or captioning).

Under autograd each chunk of the log-prob is recomputed in the backward pass (`torch.utils.checkpoint`) and its
gradient written over its own logits (`LabelLogprob`), so a training step holds one `[chunk, V]` block at a
time, not one per chunk, nor the four copies autograd's log-softmax + gather would keep. Everything runs inside the network's
own `forward` and calls the head *modules* (never their weights from outside): PEFT and DeepSpeed wrap that
forward, and ZeRO-3 gathers a module's weights only when the module itself is called.

    out = net(input_ids=..., attention_mask=..., readouts=[Readout(mask, labels)], row_chunk=4)
    logp = out.readouts[0]            # [N] log p(label) at the N masked positions, row-major
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput

Head = Literal["lm", "generation"]
DEFAULT_LOGIT_CHUNK = 1 << 25  # logits per chunk: 128 MiB of fp32, ~127 positions of a 264k vocabulary
_WRAPPER_ONLY = {"output_attentions", "output_hidden_states", "return_dict", "logits_to_keep", "task_ids",
                 "num_items_in_batch"}


@dataclass
class Readout:
    """What one forward reads: the hidden states at `mask` through `head` (`rows`: a subset of the lm head)."""

    mask: torch.Tensor  # [B, S] bool; results come in row-major order of the True positions
    labels: torch.Tensor | None = None  # [B, S] int64 in the head's row space (used where mask); None -> logits
    head: Head = "lm"
    rows: slice | torch.Tensor | None = None  # lm head rows to use (e.g. the image codes); None = all


@dataclass
class ReadoutOutput(ModelOutput):
    readouts: tuple[torch.Tensor, ...] | None = None
    past_key_values: object | None = None


class SelectiveLinear(nn.Linear):
    """`nn.Linear` whose forward can use a subset of its output rows (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return super().forward(x)
        bias = None if self.bias is None else self.bias[rows]
        return F.linear(x, self.weight[rows], bias)


def make_selective(linear: nn.Module) -> None:
    """Turn a plain `nn.Linear` head into a `SelectiveLinear` in place (no copy, parameters and ties kept)."""
    if type(linear) is nn.Linear:
        linear.__class__ = SelectiveLinear
    elif not isinstance(linear, SelectiveLinear):
        raise TypeError(f"the output head is a {type(linear).__name__}, not an nn.Linear: cannot read subsets of it")


def rows_count(rows: slice | torch.Tensor | None, total: int) -> int:
    if rows is None:
        return total
    if isinstance(rows, slice):
        return len(range(*rows.indices(total)))
    return int(rows.numel())


class ReadoutMixin:
    """Adds `readouts=` / `row_chunk=` to a transformers model's forward. A subclass defines `backbone(**inputs)`
    (-> an output with `last_hidden_state` and `past_key_values`), and `generation_logits(h)` if it has a
    generation head; `lm_head` must be a `SelectiveLinear` (`make_selective` in `__init__`)."""

    def backbone(self, **inputs) -> ModelOutput:  # pragma: no cover - every network defines it
        raise NotImplementedError

    def generation_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no generation head")

    def head_logits(self, hidden: torch.Tensor, readout: Readout) -> torch.Tensor:
        if readout.head == "generation":
            return self.generation_logits(hidden)
        return self.lm_head(hidden, rows=readout.rows)

    def head_rows(self, readout: Readout) -> int:
        if readout.head == "generation":
            return int(self.generation_logits_size())
        return rows_count(readout.rows, self.lm_head.out_features)

    def generation_logits_size(self) -> int:
        raise ValueError(f"{type(self).__name__} has no generation head")

    def forward(self, readouts: list[Readout] | None = None, row_chunk: int | None = None,
                logit_chunk: int = DEFAULT_LOGIT_CHUNK, past_key_values=None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, **inputs):
        # wrappers (PEFT's causal-LM forward) pass the HF generation arguments along, mostly as None
        inputs = {k: v for k, v in inputs.items() if v is not None and k not in _WRAPPER_ONLY}
        if readouts is None:  # the plain contract: logits at every position (small models, tests, references)
            out = self.backbone(past_key_values=past_key_values, use_cache=use_cache, **inputs)
            logits = self.lm_head(out.last_hidden_state)
            loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
            return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
        rows = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
        step = rows if (not row_chunk or past_key_values is not None) else max(1, row_chunk)
        parts: list[list[torch.Tensor]] = [[] for _ in readouts]
        out = None
        for start in range(0, rows, step):
            sl = slice(start, start + step)
            chunk = {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            out = self.backbone(past_key_values=past_key_values, use_cache=bool(use_cache), **chunk)
            hidden = out.last_hidden_state
            for j, r in enumerate(readouts):
                mask = r.mask[sl].to(hidden.device)
                h = hidden[mask]
                if r.labels is None:
                    parts[j].append(self.head_logits(h, r).float())
                else:
                    labels = r.labels[sl].to(hidden.device)[mask]
                    parts[j].append(self._label_logprobs(h, labels, r, logit_chunk))
            del hidden
        return ReadoutOutput(readouts=tuple(torch.cat(p) for p in parts),
                             past_key_values=out.past_key_values if use_cache else None)

    def _label_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, r: Readout, logit_chunk: int) -> torch.Tensor:
        """log p(label) per row of `hidden` under a log-softmax over the head's rows, `logit_chunk` logits at a time."""
        step = max(1, logit_chunk // max(1, self.head_rows(r)))
        out = []
        for i in range(0, len(hidden), step):
            h, y = hidden[i: i + step], labels[i: i + step]
            if torch.is_grad_enabled():  # recomputed in backward: one [chunk, V] block alive at a time
                out.append(checkpoint(self._chunk_logprob, h, y, r, use_reentrant=False))
            else:
                out.append(self._chunk_logprob(h, y, r))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    def _chunk_logprob(self, hidden: torch.Tensor, labels: torch.Tensor, r: Readout) -> torch.Tensor:
        z = self.head_logits(hidden, r).float()
        if torch.is_grad_enabled():
            return LabelLogprob.apply(z, labels)
        picked = z.gather(1, labels[:, None])[:, 0]
        top = z.amax(1, keepdim=True)
        z.sub_(top).exp_()  # in place: the chunk is the only [chunk, V] buffer (z is not needed afterwards)
        return picked - (z.sum(1).log() + top[:, 0])


class LabelLogprob(torch.autograd.Function):
    """log p(label) = z[label] - logsumexp(z) per row of fp32 logits z. Its backward writes the gradient
    (onehot - softmax) * g into z itself (the head's backward reads its input and weight, never z), so a chunk
    costs one [rows, V] buffer in the forward and one in the backward, where autograd's own ops hold four."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
        step = max(1, z.shape[0] // 8)  # log-sum-exp in row blocks: its temporaries stay 1/8 of the chunk
        for i in range(0, z.shape[0], step):
            lse[i: i + step] = torch.logsumexp(z[i: i + step], 1)
        ctx.save_for_backward(z, labels, lse)
        return z.gather(1, labels[:, None])[:, 0] - lse

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, labels, lse = ctx.saved_tensors
        grad = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # -g * softmax, in place
        grad.scatter_add_(1, labels[:, None], g[:, None])
        return grad, None


def pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """One code per row from `[R, K]` logits, on their device: greedy (temperature <= 0), else temperature and
    top-k then a multinomial draw from `generator` (a CPU run draws exactly what the former CPU sampler drew)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


def device_generator(device: torch.device, seed: int | None) -> torch.Generator:
    seed = seed if seed is not None else int(torch.randint(2**31, ()).item())
    return torch.Generator(device=device).manual_seed(seed)
