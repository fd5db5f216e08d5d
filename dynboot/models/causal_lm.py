"""The causal-lm backend (Liquid-style): any transformers causal LM whose vocabulary holds text tokens
followed by image codes at an offset, plus an image tokenizer.

Constrained decoding: the FDP sampler emits only image tokens, exactly L of them; the IDP captioner emits
only text tokens (optionally only strings from a per-pair candidate set, a trie over token ids).
Sampling computes the shared prompt once, then repeats its KV cache N times for the N candidates.
Optional classifier-free guidance (`guidance_scale` != 1) decodes an unconditional row per candidate in the
same batch: the FDP prompt with the action dropped but the before image kept.

Subclasses whose image codes do not sit at one contiguous offset (Chameleon's BPE image tokens) override
`codes_to_ids`, `image_logits` and `_text_vocab`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from dynboot.models.base import Example, ImageTokenizer, Task, UnifiedModel
from dynboot.prompts import Layout, Specials, fdp_layout, idp_layout
from dynboot.rundir import write_json

CandidateFn = Callable[[np.ndarray], list[str]]  # before-image codes [L] -> admissible action strings


class CausalLMModel(UnifiedModel):
    backend = "causal-lm"

    def __init__(self, net, text_tokenizer, image_tokenizer: ImageTokenizer, image_offset: int, specials: Specials,
                 candidates: CandidateFn | None = None, source: str = "scratch", guidance_scale: float = 1.0):
        self.net = net
        self.text_tokenizer = text_tokenizer
        self.tokenizer = image_tokenizer
        self.image_offset = image_offset
        self.specials = specials
        self.candidates = candidates
        self.source = source
        self.guidance_scale = guidance_scale
        self._world_features = bool(getattr(self._config(), "cell_embeddings", False))

    # ---- helpers ---------------------------------------------------------------------------------
    def _config(self):
        return getattr(self.net, "config", None)

    def text_ids(self, text: str) -> list[int]:
        return list(self.text_tokenizer(text, add_special_tokens=False)["input_ids"])

    def _codes(self, images_or_codes) -> torch.Tensor:
        if isinstance(images_or_codes, torch.Tensor) and images_or_codes.dtype == torch.int64:
            return images_or_codes.reshape(-1, self.tokenizer.tokens_per_image).cpu()
        return self.tokenizer.encode(np.asarray(images_or_codes)).cpu()

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Image codes -> vocabulary ids."""
        return codes + self.image_offset

    def image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., vocab] -> [..., codebook]: the logits of the image tokens, in code order."""
        return logits[..., self.image_offset: self.image_offset + self.tokenizer.codebook_size]

    def _vocab(self, codes: torch.Tensor) -> list[int]:
        return self.codes_to_ids(codes).tolist()

    def _batch(self, layouts: list[Layout], left_pad: bool = False) -> dict[str, torch.Tensor]:
        return pad_layouts(layouts, self.specials.pad, left_pad)

    def _diff_flags(self, b: dict[str, torch.Tensor], a_codes: torch.Tensor, b_codes: torch.Tensor | None) -> torch.Tensor:
        """1 + [A[i] != B[i]] at the image tokens of cell i of both images; 0 elsewhere / without B."""
        flags = torch.zeros_like(b["input_ids"])
        if b_codes is None:
            return flags
        changed = (a_codes != b_codes).long() + 1  # [B, L]
        is_img = b["cell_of"] >= 0
        cell = b["cell_of"].clamp(min=0)
        flags = torch.where(is_img, torch.gather(changed, 1, cell), flags)
        return flags

    def _before_codes(self, b: dict[str, torch.Tensor], a_codes: torch.Tensor) -> torch.Tensor:
        """1 + A[k] at the inputs that predict cell k of the generated image (FDP), 0 elsewhere."""
        predicts = (b["cell_in"] >= 0) & (b["image_of"] != 0)
        return torch.where(predicts, torch.gather(a_codes, 1, b["cell_in"].clamp(min=0)) + 1, 0)

    def _forward(self, net, b: dict[str, torch.Tensor], diff: torch.Tensor | None = None, **kw):
        dev = self.device
        args = {"input_ids": b["input_ids"].to(dev), "attention_mask": b["attention_mask"].to(dev),
                "position_ids": b["position_ids"].to(dev), **kw}
        if self._world_features:
            args["cell_ids"] = b["cell_in"].to(dev)
            args["diff_flags"] = (diff if diff is not None else torch.zeros_like(b["input_ids"])).to(dev)
            if "before_codes" in b:
                args["before_codes"] = b["before_codes"].to(dev)
        return net(**args)

    # ---- training --------------------------------------------------------------------------------
    def collate(self, examples: list[Example], task: Task, token_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        a = self._codes(np.stack([e.before for e in examples]))
        b = self._codes(np.stack([e.after for e in examples]))
        layouts = []
        for i, e in enumerate(examples):
            act = self.text_ids(e.action)
            if task == "idp":
                layouts.append(idp_layout(self.specials, self._vocab(a[i]), self._vocab(b[i]), act))
            else:
                layouts.append(fdp_layout(self.specials, self._vocab(a[i]), act, self._vocab(b[i])))
        batch = self._batch(layouts)
        weights = batch.pop("target").float()
        if task == "fdp" and token_weights is not None:
            on_b = (batch["image_of"] == 1) & (weights > 0)
            w = torch.gather(token_weights.float(), 1, batch["cell_of"].clamp(min=0))
            weights = torch.where(on_b, w, weights)
        batch["target_weights"] = weights
        batch["diff_flags"] = self._diff_flags(batch, a, b) if task == "idp" else torch.zeros_like(batch["input_ids"])
        if task == "fdp" and self._world_features:
            batch["before_codes"] = self._before_codes(batch, a)
        return batch

    def loss(self, batch: dict[str, torch.Tensor], net: torch.nn.Module | None = None) -> torch.Tensor:
        logits = self._forward(net or self.net, batch, diff=batch.get("diff_flags")).logits
        w = batch["target_weights"][:, 1:].to(logits.device)
        labels = batch["input_ids"][:, 1:].to(logits.device)
        logits = logits[:, :-1].float()
        if "image_logit_offsets" in batch:  # [B, L, K] added to the code logits that predict `after` (dynboot.weights)
            logits = self._offset_image_logits(logits, batch["image_of"][:, 1:] == 1, batch["image_logit_offsets"])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return (ce * w.reshape(-1)).sum() / w.sum().clamp(min=1e-8)

    def _offset_image_logits(self, logits: torch.Tensor, predicts_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """logits [B, T, V] (out of place) + offsets [B, L, K] at the image-code columns of the positions that
        predict the L codes of `after` (row-major, as `image_logprobs` reads them)."""
        rows = predicts_b.nonzero().to(logits.device)  # [B*L, 2]
        ids = self.codes_to_ids(torch.arange(offsets.shape[-1])).to(logits.device)
        index = (rows[:, :1].expand(-1, len(ids)), rows[:, 1:].expand(-1, len(ids)), ids[None].expand(len(rows), -1))
        return logits.index_put(index, offsets.reshape(len(rows), -1).to(logits), accumulate=True)

    # ---- IDP -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def action_logprob(self, before, after, actions: list[str]) -> torch.Tensor:
        a, b = self._codes(before), self._codes(after)
        if not (len(a) == len(b) == len(actions)):
            raise ValueError(f"batch sizes differ: {len(a)} before, {len(b)} after, {len(actions)} actions")
        layouts = [idp_layout(self.specials, self._vocab(a[i]), self._vocab(b[i]), self.text_ids(t)) for i, t in enumerate(actions)]
        batch = self._batch(layouts)
        logits = self._forward(self.net, batch, diff=self._diff_flags(batch, a, b)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1)
        labels = batch["input_ids"][:, 1:].to(logp.device)
        tok = torch.gather(logp, 2, labels[..., None])[..., 0]
        m = batch["target"][:, 1:].to(logp.device).float()
        return ((tok * m).sum(1) / m.sum(1)).cpu()

    def _text_vocab(self, vocab: int) -> torch.Tensor:
        """Ids that are text (before special-token removal)."""
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[: self.image_offset] = True
        return allowed

    def _text_mask(self, vocab: int) -> torch.Tensor:
        allowed = self._text_vocab(vocab)
        s = self.specials
        for t in [s.bos, s.pad, *( [s.boi] if s.boi is not None else []), *([s.eoi] if s.eoi is not None else [])]:
            allowed[t] = False
        for t in getattr(self.text_tokenizer, "all_special_ids", []):
            allowed[t] = False
        allowed[s.eos] = True
        return allowed

    @torch.inference_mode()
    def caption(self, before, after, max_new_tokens: int = 32) -> list[str]:
        a, b = self._codes(before), self._codes(after)
        layouts = [idp_layout(self.specials, self._vocab(a[i]), self._vocab(b[i]), None) for i in range(len(a))]
        batch = self._batch(layouts, left_pad=True)
        tries = None
        if self.candidates is not None:
            tries = [[self.text_ids(c) + [self.specials.eos] for c in self.candidates(a[i].numpy())] for i in range(len(a))]
        out = self._decode_text(batch, self._diff_flags(batch, a, b), max_new_tokens, tries)
        return [self.text_tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]

    def _decode_text(self, batch, diff, max_new_tokens: int, tries: list[list[list[int]]] | None) -> list[list[int]]:
        cache = DynamicCache()
        out = self._forward(self.net, batch, diff=diff, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        B = logits.shape[0]
        text_ok = self._text_mask(logits.shape[-1]).to(logits.device)
        gen: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        mask = batch["attention_mask"].to(self.device)
        pos = batch["position_ids"][:, -1:].to(self.device)
        for _ in range(max_new_tokens):
            allowed = text_ok.expand(B, -1).clone()
            if tries is not None:
                allowed[:] = False
                for i in range(B):
                    t = len(gen[i])
                    nxt = {c[t] for c in tries[i] if len(c) > t and c[:t] == gen[i]}
                    allowed[i, list(nxt) or [self.specials.eos]] = True
            tok = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
            tok = torch.where(done.to(tok.device), torch.full_like(tok, self.specials.pad), tok)
            for i in range(B):
                if not done[i]:
                    if tok[i].item() == self.specials.eos:
                        done[i] = True
                    else:
                        gen[i].append(tok[i].item())
            if done.all():
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=mask.device)], 1)
            pos = pos + 1
            step = {"input_ids": tok[:, None].cpu(), "attention_mask": mask.cpu(), "position_ids": pos.cpu(),
                    "cell_in": torch.full((B, 1), -1)}
            logits = self._forward(self.net, step, past_key_values=cache, use_cache=True).logits[:, -1].float()
        return gen

    # ---- FDP -------------------------------------------------------------------------------------
    @torch.no_grad()  # no_grad, not inference_mode: the result may become a loss weight in a training step
    def image_logprobs(self, before, actions: list[str], after) -> torch.Tensor:
        """[B, L, K] teacher-forced FDP log-probs over the K image codes at each cell of `after` (images or
        codes [B, L]): row l is log p(. | before, action, after[<l]), so it never depends on after[l]."""
        a, b = self._codes(before), self._codes(after)
        if not (len(a) == len(b) == len(actions)):
            raise ValueError(f"batch sizes differ: {len(a)} before, {len(b)} after, {len(actions)} actions")
        layouts = [fdp_layout(self.specials, self._vocab(a[i]), self.text_ids(t), self._vocab(b[i])) for i, t in enumerate(actions)]
        batch = self._batch(layouts)
        if self._world_features:
            batch["before_codes"] = self._before_codes(batch, a)
        logits = self._forward(self.net, batch).logits[:, :-1]
        predicts_b = (batch["image_of"][:, 1:] == 1).to(logits.device)  # the next token is a code of `after`
        img = self.image_logits(logits[predicts_b]).float()  # row-major: each row's L cells in order
        return torch.log_softmax(img, -1).reshape(len(a), self.tokenizer.tokens_per_image, -1).cpu()

    @torch.inference_mode()
    def sample(self, before, actions: list[str], n: int = 1, temperature: float = 1.0, top_k: int = 0,
               seed: int | None = None, use_cache: bool = True, guidance_scale: float | None = None) -> torch.Tensor:
        a = self._codes(before)
        if len(a) != len(actions):
            raise ValueError(f"{len(a)} images but {len(actions)} actions")
        cfg = self.guidance_scale if guidance_scale is None else guidance_scale
        layouts = [fdp_layout(self.specials, self._vocab(a[i]), self.text_ids(t), None) for i, t in enumerate(actions)]
        if cfg != 1.0:  # unconditional rows: same before image, no action
            layouts += [fdp_layout(self.specials, self._vocab(a[i]), [], None) for i in range(len(a))]
        batch = self._batch(layouts, left_pad=True)
        B, L = len(a), self.tokenizer.tokens_per_image
        R = len(layouts) * n  # rows decoded together
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ()).item()))
        a_prompts = a if cfg == 1.0 else torch.cat([a, a])  # the before codes of each prompt (CFG: twice)
        a_rows = a_prompts.repeat_interleave(n, 0)  # ... and of each decoded row
        if self._world_features:
            batch["before_codes"] = self._before_codes(batch, a_prompts)
        rep = {k: v.repeat_interleave(n, 0) for k, v in batch.items()}
        codes = torch.empty((B * n, L), dtype=torch.long)
        if use_cache:
            cache = DynamicCache()
            # the shared prompt is computed once per request, then its cache is repeated for the n samples
            logits = self._forward(self.net, batch, past_key_values=cache, use_cache=True).logits[:, -1].float()
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, 0)
        mask, pos = rep["attention_mask"], rep["position_ids"][:, -1:]
        ids = rep["input_ids"]
        for t in range(L):
            if not use_cache:  # reference path for the benchmark: recompute the whole sequence each step
                full = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                        "cell_in": torch.cat([rep["cell_in"], torch.arange(1, t + 1).expand(R, t)], 1)}
                if self._world_features:
                    full["before_codes"] = torch.cat([rep["before_codes"], a_rows[:, 1: t + 1] + 1], 1)
                logits = self._forward(self.net, full).logits[:, -1].float()
            img = self.image_logits(logits).cpu()
            if cfg != 1.0:
                img = img[B * n:] + cfg * (img[: B * n] - img[B * n:])
            codes[:, t] = _pick(img, temperature, top_k, gen)
            if t == L - 1:
                break
            nxt = self.codes_to_ids(codes[:, t: t + 1])
            nxt = nxt.repeat(R // (B * n), 1)  # the unconditional rows continue with the same codes
            mask = torch.cat([mask, torch.ones((R, 1), dtype=mask.dtype)], 1)
            pos = pos + 1
            if use_cache:
                step = {"input_ids": nxt, "attention_mask": mask, "position_ids": pos,
                        "cell_in": torch.full((R, 1), t + 1)}  # code t goes in, code t+1 comes out
                if self._world_features:
                    step["before_codes"] = a_rows[:, t + 1: t + 2] + 1
                logits = self._forward(self.net, step, past_key_values=cache, use_cache=True).logits[:, -1].float()
            else:
                ids = torch.cat([ids, nxt], 1)
        return codes.reshape(B, n, L)

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.net.save_pretrained(path)
        self.text_tokenizer.save_pretrained(path)
        write_json(path / "dynboot.json", self.describe())
        return path

    def describe(self) -> dict:
        """What `load` needs besides the HF files (written as dynboot.json)."""
        s = self.specials
        return {"backend": self.backend, "image_offset": self.image_offset,
                "specials": {"bos": s.bos, "eos": s.eos, "sep": s.sep, "pad": s.pad, "boi": s.boi, "eoi": s.eoi,
                             "instruction_idp": s.instruction_idp, "instruction_fdp": s.instruction_fdp,
                             "action_pad_to": s.action_pad_to}}

    @staticmethod
    def read_description(path: str | Path) -> dict:
        p = Path(path) / "dynboot.json"
        if not p.is_file():
            raise FileNotFoundError(f"{path} has no dynboot.json: not a dynboot checkpoint directory")
        return json.loads(p.read_text())


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
    out = {"input_ids": ids, "attention_mask": mask, "target": target, "cell_of": cells, "cell_in": cells_in, "image_of": images}
    out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return out


def _pick(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
