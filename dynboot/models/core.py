"""The one implementation of the model interface, shared by every backend (tiny, liquid, anole, janus).

Batches come from the prompt layouts (prompts.py); every forward goes through `readouts` (heads.py), so no
path builds full-vocabulary logits: the loss and scoring read log p(label) at target positions only, captioning
reads the last position, sampling reads the image-code rows of the last position. All of it runs on the
model's device; sampling copies the finished codes to the host once per call.

Memory is bounded by the model itself: `max_tokens` (None = unbounded) is the most tokens one forward may hold.
`action_logprob`, `caption_scored` and `sample` split their rows into chunks that fit; `loss` passes the
same budget to the network as `row_chunk` (one backbone call per chunk inside one forward, so gradient
checkpointing and DeepSpeed see a single forward). `token_cost(stage)` tells callers what a row costs, so a
server can batch by rows (Σ cost <= `max_tokens`).

A backend supplies only what is its own:
- `_idp_batch(before, after, actions, left_pad)` / `_fdp_batch(before, actions, after, left_pad)`: its layout of
  images in a sequence (image codes as vocabulary ids; Janus: SigLIP placeholders + pixels, generation codes)
  as padded tensors, with `target` (token predicted), `label_codes` (code at generated-image targets, else -1);
- `_net_inputs(batch)`: the tensors its network reads; `_text_step(tokens)`, `_image_step(codes, t, batch,
  rows)`: the inputs of one decoding step;
- `image_readout(mask, labels)`: its image head (rows of the lm head, or a generation head);
- `fdp_loss_over`: "codes" = the FDP loss normalises image targets over the image codes only (the distribution
  the constrained sampler draws from: training and sampling agree, and the head costs K/V of a full one), or
  "vocab" = over the whole vocabulary (the tiny world model, whose quickstart numbers rest on it). End tokens
  (<eoi>, <eos>) are always normalised over the vocabulary;
- `_text_allowed(vocab)`: which ids a caption may use; `_caption_tries(batch)`: optional grammar constraint.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from transformers import DynamicCache

from dynboot.data.example import Example

from dynboot.models.base import Stage, Task, UnifiedModel
from dynboot.models.heads import DEFAULT_LOGIT_CHUNK, Readout, device_generator, pick
from dynboot.models.prompts import Specials, fdp_layout, idp_layout

TYPICAL_ACTION_TOKENS = 16  # text tokens assumed per action when pricing a row (`token_cost`)


class SequenceModel(UnifiedModel):
    specials: Specials
    text_tokenizer: object
    fdp_loss_over: Literal["codes", "vocab"] = "codes"
    max_tokens: int | None = None
    logit_chunk: int = DEFAULT_LOGIT_CHUNK
    read_tokens: int  # sequence tokens of an image the model reads (IDP images, the FDP before image)

    # ---- backend hooks -------------------------------------------------------------------------------
    def _idp_batch(self, before, after, actions: list[list[int]] | None, left_pad: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _fdp_batch(self, before, actions: list[list[int]], after, left_pad: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _net_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _text_step(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": tokens[:, None]}

    def _image_step(self, codes: torch.Tensor, t: int, batch: dict, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def image_readout(self, mask: torch.Tensor, labels: torch.Tensor | None = None) -> Readout:
        raise NotImplementedError

    def _text_allowed(self, vocab: int) -> torch.Tensor:
        raise NotImplementedError

    def _caption_tries(self, batch: dict) -> list[list[list[int]]] | None:
        return None

    # ---- helpers -------------------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        return list(self.text_tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device
        return {k: v.to(dev) for k, v in batch.items()}

    def _text_mask(self, vocab: int) -> torch.Tensor:
        """Ids a caption may emit: the backend's text ids minus the layout's specials, plus <eos>."""
        allowed = self._text_allowed(vocab)
        s = self.specials
        for t in [s.bos, s.pad, s.boi, s.eoi, *getattr(self.text_tokenizer, "all_special_ids", [])]:
            if t is not None:
                allowed[t] = False
        allowed[s.eos] = True
        return allowed

    # ---- the token budget ------------------------------------------------------------------------------
    def token_cost(self, stage: Stage, n: int = 1, text_tokens: int = TYPICAL_ACTION_TOKENS,
                   max_new_tokens: int = 32, guidance_scale: float | None = None) -> int:
        """Tokens one input of `stage` holds in a forward (its KV cache included): what `max_tokens` bounds."""
        s, L, R = self.specials, self.tokenizer.tokens_per_image, self.read_tokens
        idp = len(idp_layout(s, [0] * R, [0] * R, None).ids)
        fdp = len(fdp_layout(s, [0] * R, [0] * text_tokens, None).ids)
        cfg = self.guidance_scale if guidance_scale is None else guidance_scale
        cost = {"score": idp + text_tokens + 1, "caption": idp + max_new_tokens + 1,
                "sample": (fdp + L) * n * (1 if cfg == 1.0 else 2), "train_idp": idp + text_tokens + 1,
                "train_fdp": fdp + L + 2}
        if stage not in cost:
            raise ValueError(f"unknown stage {stage!r}; one of {sorted(cost)}")
        return cost[stage]

    def rows_per_forward(self, stage: Stage, n: int = 1, **kw) -> int:
        """Inputs of `stage` that fit one forward under `max_tokens` (at least 1)."""
        if self.max_tokens is None:
            return 1 << 30
        return max(1, self.max_tokens // self.token_cost(stage, n, **kw))

    def _row_chunk(self, seq_len: int) -> int | None:
        return None if self.max_tokens is None else max(1, self.max_tokens // max(1, seq_len))

    # ---- training ----------------------------------------------------------------------------------------
    def collate(self, examples: list[Example], task: Task, token_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        before = [e.before for e in examples]
        after = [e.after for e in examples]
        acts = [self.text_ids(e.action) for e in examples]
        batch = self._idp_batch(before, after, acts, False) if task == "idp" else self._fdp_batch(before, acts, after, False)
        weights = batch["target"].float()
        if task == "fdp" and token_weights is not None:
            on_b = (batch["image_of"] == 1) & batch["target"]
            w = torch.gather(token_weights.float(), 1, batch["cell_of"].clamp(min=0))
            weights = torch.where(on_b, w, weights)
        batch["target_weights"] = weights
        return batch

    def _target_readouts(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> tuple[list[Readout], list[torch.Tensor]]:
        """Readouts of every position j whose next token j+1 has weight > 0, and their weights (same order)."""
        w = weights[:, 1:]
        codes = batch["label_codes"][:, 1:]
        image = (codes >= 0) if self.fdp_loss_over == "codes" else torch.zeros_like(codes, dtype=torch.bool)

        def at_positions(sel: torch.Tensor) -> torch.Tensor:  # [B, S-1] over "next token" -> [B, S] read positions
            return torch.cat([sel, torch.zeros_like(sel[:, :1])], 1)

        text_sel, image_sel = (w > 0) & ~image, (w > 0) & image
        ids = torch.cat([batch["input_ids"][:, 1:], torch.zeros_like(codes[:, :1])], 1)
        readouts, ws = [Readout(at_positions(text_sel), ids)], [w[text_sel]]
        if bool(image_sel.any()):
            labels = torch.cat([codes.clamp(min=0), torch.zeros_like(codes[:, :1])], 1)
            readouts.append(self.image_readout(at_positions(image_sel), labels))
            ws.append(w[image_sel])
        return readouts, ws

    def loss(self, batch: dict[str, torch.Tensor], net: torch.nn.Module | None = None) -> torch.Tensor:
        readouts, ws = self._target_readouts(batch, batch["target_weights"])
        out = (net or self.net)(**self._net_inputs(batch), readouts=readouts, use_cache=False,
                                row_chunk=self._row_chunk(batch["input_ids"].shape[1]), logit_chunk=self.logit_chunk)
        nll = -torch.cat(out.readouts)
        w = torch.cat(ws).to(nll.device)
        return (nll * w).sum() / w.sum().clamp(min=1e-8)

    # ---- IDP ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def action_logprob(self, before, after, actions: list[str]) -> torch.Tensor:
        if not (len(before) == len(after) == len(actions)):
            raise ValueError(f"batch sizes differ: {len(before)} before, {len(after)} after, {len(actions)} actions")
        ids = [self.text_ids(t) for t in actions]
        step = self.rows_per_forward("score", text_tokens=max((len(i) for i in ids), default=0))
        out = []
        for i in range(0, len(actions), step):
            batch = self._idp_batch(before[i: i + step], after[i: i + step], ids[i: i + step], False)
            readouts, _ = self._target_readouts(batch, batch["target"].float())
            logp = self.net(**self._net_inputs(batch), readouts=readouts, use_cache=False,
                            logit_chunk=self.logit_chunk).readouts[0]
            counts = batch["target"][:, 1:].sum(1).tolist()
            out += [part.mean() for part in logp.float().split(counts)]
        return torch.stack(out).cpu() if out else torch.zeros(0)

    @torch.inference_mode()
    def image_logprobs(self, before, actions: list[str], after) -> torch.Tensor:
        if not (len(before) == len(actions) == len(after)):
            raise ValueError(f"batch sizes differ: {len(before)} before, {len(actions)} actions, {len(after)} after")
        ids = [self.text_ids(t) for t in actions]
        step = self.rows_per_forward("train_fdp", text_tokens=max((len(i) for i in ids), default=0))
        L, out = self.tokenizer.tokens_per_image, []
        for i in range(0, len(actions), step):
            batch = self._fdp_batch(before[i: i + step], ids[i: i + step], after[i: i + step], False)
            predicts_code = batch["label_codes"][:, 1:] >= 0  # the next token is a code of `after`
            read = torch.cat([predicts_code, torch.zeros_like(predicts_code[:, :1])], 1)
            logits = self.net(**self._net_inputs(batch), readouts=[self.image_readout(read)], use_cache=False,
                              logit_chunk=self.logit_chunk).readouts[0]
            out.append(torch.log_softmax(logits.float(), -1).reshape(-1, L, logits.shape[-1]).cpu())
        return torch.cat(out) if out else torch.zeros(0, L, 0)

    def caption(self, before, after, max_new_tokens: int = 32) -> list[str]:
        return self.caption_scored(before, after, max_new_tokens)[0]

    @torch.inference_mode()
    def caption_scored(self, before, after, max_new_tokens: int = 32) -> tuple[list[str], torch.Tensor]:
        if len(before) != len(after):
            raise ValueError(f"batch sizes differ: {len(before)} before, {len(after)} after")
        step = self.rows_per_forward("caption", max_new_tokens=max_new_tokens)
        texts, scores = [], []
        for i in range(0, len(before), step):
            batch = self._idp_batch(before[i: i + step], after[i: i + step], None, True)
            ids, score = self._decode_text(batch, max_new_tokens, self._caption_tries(batch))
            texts += [self.text_tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
            scores.append(score)
        return texts, torch.cat(scores) if scores else torch.zeros(0)

    def _decode_text(self, batch: dict, max_new_tokens: int, tries) -> tuple[list[list[int]], torch.Tensor]:
        """Greedy text decoding; also the mean log p (full-vocabulary log-softmax, like `action_logprob`) of the
        emitted tokens and the closing <eos> (read after the last token when a caption hits the length limit)."""
        dev, eos, pad = self.device, self.specials.eos, self.specials.pad
        B = batch["input_ids"].shape[0]
        cache = DynamicCache()
        mask = batch["attention_mask"].to(dev)
        pos = batch["position_ids"][:, -1:].to(dev)
        last = torch.zeros_like(mask, dtype=torch.bool)
        last[:, -1] = True
        logits = self.net(**self._net_inputs(batch), readouts=[Readout(last)], past_key_values=cache,
                          use_cache=True).readouts[0]
        ok = self._text_mask(logits.shape[-1]).to(dev)
        gen = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
        total = torch.zeros(B, device=dev)
        count = torch.zeros(B, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        host: list[list[int]] = [[] for _ in range(B)]  # only kept when a grammar constrains the next token
        one = torch.ones((B, 1), dtype=mask.dtype, device=dev)
        step_last = torch.ones((B, 1), dtype=torch.bool, device=dev)
        for t in range(max_new_tokens + 1):
            logp = torch.log_softmax(logits, -1)
            if t == max_new_tokens:  # length limit: the caption's score still closes with log p(<eos>)
                total += torch.where(done, 0.0, logp[:, eos])
                count += (~done).float()
                break
            allowed = ok.expand(B, -1)
            if tries is not None:
                allowed = torch.zeros((B, logits.shape[-1]), dtype=torch.bool, device=dev)
                for i in range(B):
                    nxt = {c[t] for c in tries[i] if len(c) > t and c[:t] == host[i]}
                    allowed[i, list(nxt) or [eos]] = True
            tok = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
            total += torch.where(done, 0.0, logp.gather(1, tok[:, None])[:, 0])
            count += (~done).float()
            ended = tok == eos
            gen[:, t] = torch.where(done | ended, pad, tok)
            if tries is not None:
                for i, v in enumerate(tok.tolist()):
                    host[i].append(v)
            done |= ended
            if bool(done.all()):
                break
            mask = torch.cat([mask, one], 1)
            pos = pos + 1
            step = {**self._text_step(torch.where(done, pad, tok)), "attention_mask": mask, "position_ids": pos}
            logits = self.net(**self._to_device(step), readouts=[Readout(step_last)], past_key_values=cache,
                              use_cache=True).readouts[0]
        gen_host = gen.cpu()
        rows = [[v for v in r if v != pad] for r in gen_host.tolist()]
        return rows, (total / count.clamp(min=1)).cpu()

    # ---- FDP ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, before, actions: list[str], n: int = 1, temperature: float = 1.0, top_k: int = 0,
               seed: int | None = None, guidance_scale: float | None = None, use_cache: bool = True) -> torch.Tensor:
        """[B, n, L] codes. One generator per call, drawn on the model's device; within a chunk (all of the call
        when it fits `max_tokens`) the shared prompt is computed once and its cache repeated for the n samples."""
        if len(before) != len(actions):
            raise ValueError(f"{len(before)} images but {len(actions)} actions")
        cfg = self.guidance_scale if guidance_scale is None else guidance_scale
        gen = device_generator(self.device, seed)
        ids = [self.text_ids(t) for t in actions]
        per_prompt = self.token_cost("sample", 1, text_tokens=max((len(i) for i in ids), default=0), guidance_scale=cfg)
        budget_rows = (1 << 30) if self.max_tokens is None else max(1, self.max_tokens // per_prompt)
        prompts = max(1, budget_rows // n)  # whole prompts per chunk, or one prompt's candidates in groups
        group = n if budget_rows >= n else budget_rows
        out = []
        for i in range(0, len(actions), prompts):
            parts = [self._sample_chunk(before[i: i + prompts], ids[i: i + prompts], min(group, n - j), temperature,
                                        top_k, gen, cfg, use_cache) for j in range(0, n, group)]
            out.append(torch.cat(parts, 1))
        return torch.cat(out).cpu() if out else torch.zeros((0, n, self.tokenizer.tokens_per_image), dtype=torch.long)

    def _sample_chunk(self, before, ids: list[list[int]], n: int, temperature: float, top_k: int,
                      gen: torch.Generator, cfg: float, use_cache: bool) -> torch.Tensor:
        B, L, dev = len(ids), self.tokenizer.tokens_per_image, self.device
        if cfg != 1.0:  # unconditional rows: the same before image, no action
            before = _concat(before, before)
            ids = ids + [[] for _ in ids]
        batch = self._fdp_batch(before, ids, None, True)
        P = len(ids)  # prompts (conditional, then unconditional)
        R = P * n  # decoded rows
        rows = torch.arange(P, device=dev).repeat_interleave(n)  # prompt of each decoded row
        codes = torch.empty((B * n, L), dtype=torch.long, device=dev)
        inputs = self._to_device(self._net_inputs(batch))
        last = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
        last[:, -1] = True
        cache = None
        if use_cache:
            # the shared prompt is computed once per request, then its cache is repeated for the n samples
            cache = DynamicCache()
            logits = self.net(**inputs, readouts=[self.image_readout(last)], past_key_values=cache,
                              use_cache=True).readouts[0]
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, 0)
        full = {k: v.repeat_interleave(n, 0) for k, v in inputs.items()}
        mask, pos = full["attention_mask"], full["position_ids"][:, -1:]
        step_last = torch.ones((R, 1), dtype=torch.bool, device=dev)
        for t in range(L):
            if not use_cache:  # reference path for the benchmark: recompute the whole sequence each step
                full["position_ids"] = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                read = torch.zeros_like(full["attention_mask"], dtype=torch.bool)
                read[:, -1] = True
                logits = self.net(**full, readouts=[self.image_readout(read)], use_cache=False).readouts[0]
            if cfg != 1.0:
                logits = logits[B * n:] + cfg * (logits[: B * n] - logits[B * n:])
            codes[:, t] = pick(logits, temperature, top_k, gen)
            if t == L - 1:
                break
            nxt = codes[:, t].repeat(R // (B * n))  # the unconditional rows continue with the same codes
            mask = torch.cat([mask, torch.ones((R, 1), dtype=mask.dtype, device=dev)], 1)
            pos = pos + 1
            step = self._to_device(self._image_step(nxt, t, batch, rows))
            if use_cache:
                logits = self.net(**step, attention_mask=mask, position_ids=pos, readouts=[self.image_readout(step_last)],
                                  past_key_values=cache, use_cache=True).readouts[0]
            else:
                if not step.keys() <= full.keys():
                    raise RuntimeError(f"decoding step inputs {sorted(step.keys() - full.keys())} are not in the prompt's")
                full = {k: torch.cat([v, step[k]], 1) if k in step else v for k, v in full.items()}
                full["attention_mask"] = mask
        return codes.reshape(B, n, L)


def _concat(a, b):
    """Two batches of the same kind (image arrays, lists of images, code tensors) end to end."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.concatenate([a, b])
    return list(a) + list(b)

