"""CPU memory benchmark of the model paths at the real vocabularies and sequence lengths (issue 17).

For each backend it writes a `dynboot init-model size=shapes` checkpoint (the real vocabulary, image size and
codes per image -- Liquid 264192 tokens / 1024 codes, Anole 65536 / 1024, Janus 102400 + 16384 codes / 576 --
around a 2-layer, 64-wide transformer), then measures, each in a fresh subprocess, the peak memory of
- `score`: `action_logprob` of B (before, after, action) rows (the verifier / relabel path),
- `loss`: the FDP `loss` + backward of B pairs (recognition-weighted, activation checkpointing on after),
- `sample`: `sample` of B prompts, n = 1, L codes each,
for "after" (this code) and "before": the pre-issue-17 code path, kept here as a faithful reference (full
logits at every position, fp32 copy, full log-softmax / cross-entropy; sampling computes full-vocabulary
logits at every prompt position and step). "before" runs at small B only (at B = 8 Liquid's logits alone are
~18 GB, ~35 GB with the log-softmax), and its B = 8 figure is extrapolated from the measured per-row slope
(flagged `extrapolated`).

How memory is measured: Linux's peak resident set (VmHWM), reset through /proc/self/clear_refs once the model and
the inputs are resident, so `transient` is what the operation itself allocates; `base` is the RSS after the
imports (Python, torch, transformers), `static` = resident model + tokenizers + inputs above it. The theoretical
minimum of an operation = static + what it cannot avoid: scoring, one chunk of logits [rows, V] (fp32); loss,
the weights' gradients + one chunk (its gradient can overwrite it); sampling, the KV cache + [rows, K] logits
and probabilities.
`ratio_to_min` = (static + transient) / minimum. Figures depend on the allocator (glibc returns large blocks).

    python -m jobs.bench_model_memory                               # all backends (~30 min on 2 shared cores)
    python -m jobs.bench_model_memory backends=[anole] ops=[score]   # one slice
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config

Op = Literal["score", "loss", "sample"]
ACTION = "move the red circle to the left of the blue square"
FULL_LOGIT_COPIES = {"score": 2, "loss": 4, "sample": 1}  # [B, S, V] fp32 tensors alive at once in the old path
SHAPES = {"liquid": (264192, 2079), "anole": (65536, 2079), "janus": (102400, 1183)}  # V, sequence length


class BenchMemoryConfig(Config):
    """Settings of the CPU memory benchmark (jobs/bench_model_memory.py)."""

    backends: list[Literal["liquid", "anole", "janus"]] = Field(["liquid", "anole", "janus"], description="Backends.")
    ops: list[Op] = Field(["score", "loss", "sample"], description="Operations measured.")
    after_batches: list[int] = Field([1, 2, 8], description="Batch sizes measured with this code.")
    before_batches: list[int] = Field([1, 2], description="Batch sizes measured with the pre-issue-17 path.")
    target_batch: int = Field(8, ge=1, description="The batch the goal is stated at (before: extrapolated).")
    before_limit_gb: float = Field(6.0, gt=0, description="Skip a 'before' measurement whose full-vocabulary tensors "
                                   "(B x S x V fp32, x2 scoring, x4 loss) would exceed this: the machine is shared.")
    threads: int = Field(2, ge=1, description="torch threads per measurement.")
    models: str = Field("runs/bench_memory/models", description="Where the size=shapes checkpoints are written.")
    out: str = Field("bench/results/model_memory.json", description="JSON results file.")
    capacity: bool = Field(True, description="Also compute the largest batches on 48 / 80 GB GPUs (capacity()).")
    measure: str = Field("", description="Internal: one measurement as JSON {backend, op, variant, batch, model}.")


# ---- one measurement (in its own process) ----------------------------------------------------------------------
def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _mb(kib: int) -> float:
    return round(kib / 1024, 1)


def _inputs(model, B: int):
    import numpy as np
    import torch

    tok, rng = model.tokenizer, np.random.default_rng(0)
    if model.backend == "janus":  # reads pixels: images of its size (codes would go through the VQ decoder first)
        s = tok.image_size
        img = lambda: rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8)  # noqa: E731
        return img(), img(), [ACTION] * B
    codes = lambda: torch.from_numpy(rng.integers(0, tok.codebook_size, (B, tok.tokens_per_image)))  # noqa: E731
    return codes(), codes(), [ACTION] * B


def _fdp_batch(model, before, after, actions):
    """`collate` of FDP pairs given as codes (causal) or images (janus), recognition-like weights on the codes."""
    import torch

    batch = model._fdp_batch(before, [model.text_ids(a) for a in actions], after, False)
    w = torch.linspace(0.05, 4.0, model.tokenizer.tokens_per_image).expand(len(actions), -1)
    on_b = (batch["image_of"] == 1) & batch["target"]
    batch["target_weights"] = torch.where(on_b, torch.gather(w, 1, batch["cell_of"].clamp(min=0)), batch["target"].float())
    return batch


# the pre-issue-17 code path, faithful: full logits everywhere, fp32 copies, full log-softmax / cross-entropy
def _before_logits(model, net, batch, head: str = "lm"):
    if head == "generation":  # janus FDP: the generation head at every position
        base = net
        h = base.backbone(**model._net_inputs(batch)).last_hidden_state
        return base.model.generation_head(h)
    return net(**model._net_inputs(batch)).logits


def before_score(model, before, after, actions):
    import torch

    batch = model._idp_batch(before, after, [model.text_ids(a) for a in actions], False)
    logits = _before_logits(model, model.net, batch).float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    tok = torch.gather(logp, 2, batch["input_ids"][:, 1:, None])[..., 0]
    m = batch["target"][:, 1:].float()
    return (tok * m).sum(1) / m.sum(1)


def before_loss(model, batch):
    import torch.nn.functional as F

    janus = model.backend == "janus"
    logits = _before_logits(model, model.net, batch, "generation" if janus else "lm")[:, :-1].float()
    labels = (batch["gen_codes"] if janus else batch["input_ids"])[:, 1:]
    w = batch["target_weights"][:, 1:]
    if janus:  # the old Janus FDP loss: image codes only
        w = w * batch["gen_mask"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return (ce * w.reshape(-1)).sum() / w.sum()


def before_sample(model, before, actions, seed: int = 0):
    import torch
    from transformers import DynamicCache

    from dynboot.models.heads import pick

    L = model.tokenizer.tokens_per_image
    batch = model._fdp_batch(before, [model.text_ids(a) for a in actions], None, True)
    inputs = model._net_inputs(batch)
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    janus = model.backend == "janus"
    if janus:  # the old Janus sampler already read the last hidden state only
        base = model.net
        h = base.backbone(**inputs, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        logits = base.model.generation_head(h).float()
    else:
        logits = model.net(**inputs, past_key_values=cache, use_cache=True).logits[:, -1].float()
    R = len(actions)
    codes = torch.empty((R, L), dtype=torch.long)
    mask, pos = inputs["attention_mask"], inputs["position_ids"][:, -1:]
    rows = torch.arange(R)
    for t in range(L):
        img = logits if janus else model.image_logits(logits).cpu()
        codes[:, t] = pick(img, 1.0, 0, gen)
        if t == L - 1:
            break
        mask = torch.cat([mask, torch.ones((R, 1), dtype=mask.dtype)], 1)
        pos = pos + 1
        step = model._image_step(codes[:, t], t, batch, rows)
        if janus:
            h = base.backbone(**step, attention_mask=mask, position_ids=pos, past_key_values=cache,
                              use_cache=True).last_hidden_state[:, -1]
            logits = base.model.generation_head(h).float()
        else:
            logits = model.net(**step, attention_mask=mask, position_ids=pos, past_key_values=cache,
                               use_cache=True).logits[:, -1].float()
    return codes


def _minimum(model, op: str, batch: dict, B: int) -> tuple[int, dict]:
    """Bytes an ideal implementation must hold beyond the resident model and inputs, and its parts."""
    V = model.net.config.get_text_config().vocab_size
    K, L = model.tokenizer.codebook_size, model.tokenizer.tokens_per_image
    per_chunk = lambda rows, width: min(rows, max(1, model.logit_chunk // width)) * width * 4  # noqa: E731
    if op == "score":
        n = int(batch["target"][:, 1:].sum())
        return per_chunk(n, V), {"logit_chunk": per_chunk(n, V)}
    if op == "loss":
        grads = sum(p.numel() * p.element_size() for p in model.net.parameters() if p.requires_grad)
        text = int(((batch["target_weights"][:, 1:] > 0) & (batch["label_codes"][:, 1:] < 0)).sum())
        chunk = max(per_chunk(text, V), per_chunk(B * L, K))  # one chunk (its gradient can overwrite it)
        return grads + chunk, {"gradients": grads, "logit_chunk": chunk}
    cfg = model.net.config.get_text_config()
    kv_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) * cfg.num_key_value_heads
    kv = B * (batch["input_ids"].shape[1] + L) * cfg.num_hidden_layers * 2 * kv_dim * 4
    return kv + 2 * B * K * 4, {"kv_cache": kv, "logits": 2 * B * K * 4}


def measure(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from dynboot.models.registry import load_model

    base_kib = _kib("VmRSS")
    model = load_model(spec["model"]).eval()
    op, variant, B = spec["op"], spec["variant"], spec["batch"]
    before, after, actions = _inputs(model, B)
    ids = [model.text_ids(a) for a in actions]
    batch = {"loss": lambda: _fdp_batch(model, before, after, actions),
             "score": lambda: model._idp_batch(before, after, ids, False),
             "sample": lambda: model._fdp_batch(before, ids, None, True)}[op]()
    if op == "loss":
        model.train()
        if variant == "after":
            model.gradient_checkpointing(True)
    minimum, parts = _minimum(model, op, batch, B)
    ready_kib = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is the operation's
    t0 = time.perf_counter()
    if op == "score":
        with torch.inference_mode():
            out = model.action_logprob(before, after, actions) if variant == "after" else before_score(model, before, after, actions)
        value = float(out.mean())
    elif op == "loss":
        loss = model.loss(batch) if variant == "after" else before_loss(model, batch)
        loss.backward()
        value = float(loss.detach())
    else:
        with torch.inference_mode():
            codes = model.sample(before, actions, n=1, seed=0)[:, 0] if variant == "after" else before_sample(model, before, actions)
        value = int(codes.sum())
    seconds = time.perf_counter() - t0
    peak_kib = _kib("VmHWM")
    static_mb, transient_mb = _mb(ready_kib - base_kib), _mb(peak_kib - ready_kib)
    minimum_mb = static_mb + minimum / 2**20
    return {**{k: spec[k] for k in ("backend", "op", "variant", "batch")}, "seconds": round(seconds, 2),
            "base_mb": _mb(base_kib), "static_mb": static_mb, "transient_mb": transient_mb,
            "peak_mb": round(static_mb + transient_mb, 1), "minimum_mb": round(minimum_mb, 1),
            "ratio_to_min": round((static_mb + transient_mb) / minimum_mb, 3),
            "minimum_parts_mb": {k: round(v / 2**20, 1) for k, v in parts.items()},
            "seq_len": int(batch["input_ids"].shape[1]), "value": value}


# ---- the driver --------------------------------------------------------------------------------------------------
def _checkpoint(cfg: BenchMemoryConfig, backend: str) -> str:
    from dynboot.models.init_model import InitModelConfig, init_model

    path = Path(cfg.models) / f"{backend}-shapes"
    if not (path / "dynboot.json").is_file():
        init_model(InitModelConfig(backend=backend, out=str(path), size="shapes", seed=0))
    return str(path)


def _run_one(spec: dict, threads: int) -> dict:
    arg = json.dumps(json.dumps(spec))  # a quoted YAML string, so the override parser keeps it text
    proc = subprocess.run([sys.executable, "-m", "jobs.bench_model_memory", f"measure={arg}", f"threads={threads}"],
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def _extrapolate(rows: list[dict], target: int) -> dict | None:
    """The `target`-batch figure from the per-row slope of the two largest measured batches; from one batch, the
    old path's memory is taken as linear through the static part (its [B, S, V] tensors have no other term)."""
    rows = sorted((r for r in rows if "error" not in r), key=lambda r: r["batch"])
    if not rows:
        return None
    if len(rows) == 1:
        r = rows[0]
        per_row = r["transient_mb"] / r["batch"]
        minimum = r["static_mb"] + (r["minimum_mb"] - r["static_mb"]) * target / r["batch"]
        peak = r["static_mb"] + per_row * target
        return {**{k: r[k] for k in ("backend", "op", "variant")}, "batch": target, "extrapolated": f"from B={r['batch']}",
                "peak_mb": round(peak, 1), "per_row_mb": round(per_row, 1), "minimum_mb": round(minimum, 1),
                "ratio_to_min": round(peak / minimum, 3)}
    a, b = rows[-2], rows[-1]
    per_row = (b["peak_mb"] - a["peak_mb"]) / (b["batch"] - a["batch"])
    peak = b["peak_mb"] + per_row * (target - b["batch"])
    per_row_min = (b["minimum_mb"] - a["minimum_mb"]) / (b["batch"] - a["batch"])
    minimum = b["minimum_mb"] + per_row_min * (target - b["batch"])
    return {**{k: b[k] for k in ("backend", "op", "variant")}, "batch": target,
            "extrapolated": f"from B={a['batch']},{b['batch']}",
            "peak_mb": round(peak, 1), "per_row_mb": round(per_row, 1), "minimum_mb": round(minimum, 1),
            "ratio_to_min": round(peak / minimum, 3)}


def _logit_mb(backend: str, op: str, batch: int) -> float:
    V, S = SHAPES[backend]
    V = 16384 if (backend, op) == ("janus", "loss") else V
    return batch * S * V * 4 / 2**20


def _estimate(rows: list[dict], backend: str, op: str, target: int, after: dict | None) -> dict | None:
    """A 'before' figure too large to run here: the old path's transient per full-vocabulary logit, measured on
    the other backends for the same operation, times this backend's B x S x V (+ its own static part)."""
    coef = [r["transient_mb"] / _logit_mb(r["backend"], op, r["batch"]) for r in rows
            if r["op"] == op and r["variant"] == "before" and "error" not in r and r["backend"] != backend]
    if not coef or after is None:
        return None
    c = max(coef)
    peak = after["static_mb"] + c * _logit_mb(backend, op, target)
    return {"backend": backend, "op": op, "variant": "before", "batch": target,
            "extrapolated": f"estimated: {c:.2f} x B*S*V*4 bytes, the coefficient measured on other backends",
            "peak_mb": round(peak, 1), "per_row_mb": round(c * _logit_mb(backend, op, 1), 1)}


GPUS_GB = (48, 80)  # L40S (relabel actors, serve replicas), H100 (training): cluster/aws.yaml


def capacity(summary: list[dict], backends: list[str]) -> list[dict]:
    """The largest batch each stage fits on 48 and 80 GB, COMPUTED (not measured on a GPU) for the released
    shapes in bf16: weights (parameter count of `init-model size=full`, built on the meta device) + fixed
    buffers (two logit chunks; for training the LoRA parameters, their gradients and AdamW's fp32 state, 16 bytes
    each) + batch x per-row memory. A row's memory = what the 7B network holds per token (KV cache of every
    layer and/or one layer's activations: `hf_core.bytes_per_token`, or, training with activation checkpointing,
    every layer's input + three layers' activations for the recompute) + the per-row memory this benchmark
    measured at size=shapes (the heads, log-sum-exp, bookkeeping: an upper bound, it includes the tiny layers)."""
    import torch

    from dynboot.models.heads import DEFAULT_LOGIT_CHUNK
    from dynboot.models.registry import backend_class

    measured = {(s["backend"], s["op"]): (s["after_per_row_mb"] or 0.0) * 2**20 for s in summary}
    out = []
    for backend in backends:
        model = backend_class(backend).create("full", device="meta", dtype="bfloat16")
        cfg = model.net.config.get_text_config()
        b, h, layers, ffn = 2, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
        head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
        kv = layers * 2 * cfg.num_key_value_heads * head_dim * b  # bytes per token of KV cache
        act = (6 * h + 3 * ffn) * b  # bytes per token of one layer's activations
        weights = sum(p.numel() for p in model.net.parameters()) * b
        lora = sum(16 * (m.in_features + m.out_features) for n, m in model.net.named_modules()
                   if n in set(model.lora_target_modules()))
        S_idp, S_fdp = model.token_cost("score"), model.token_cost("train_fdp")
        P, L = S_fdp - model.tokenizer.tokens_per_image - 2, model.tokenizer.tokens_per_image
        rows = {  # stage -> (bytes per row, what a row is)
            "score": (S_idp * act + measured.get((backend, "score"), 0), "candidate"),
            "caption": ((S_idp + 32) * kv + S_idp * act + measured.get((backend, "score"), 0), "pair"),
            "sample n=8 cfg=3": (16 * (P + L) * kv + 2 * P * act + 16 * measured.get((backend, "sample"), 0), "prompt"),
            "train fdp (LoRA, checkpointing)": (S_fdp * (layers * h * b + 3 * act) + measured.get((backend, "loss"), 0),
                                                "pair"),
        }
        fixed = weights + 2 * DEFAULT_LOGIT_CHUNK * 4
        for stage, (per_row, unit) in rows.items():
            extra = 16 * lora if stage.startswith("train") else 0
            row = {"backend": backend, "stage": stage, "unit": unit, "weights_gb": round(weights / 2**30, 1),
                   "per_row_mb": round(per_row / 2**20, 1)}
            for gb in GPUS_GB:
                usable = 0.92 * (gb - 1.5) * 2**30 - fixed - extra  # CUDA context ~1.5 GB, 8% allocator slack
                row[f"max_batch_{gb}gb"] = max(0, int(usable // per_row))
            out.append(row)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def main(cfg: BenchMemoryConfig) -> dict | None:
    if cfg.measure:
        print(json.dumps(measure({**json.loads(cfg.measure), "threads": cfg.threads})), flush=True)
        return None
    rows: list[dict] = []
    for backend in cfg.backends:
        model = _checkpoint(cfg, backend)
        for op in cfg.ops:
            V, S = SHAPES[backend]
            V = 16384 if (backend, op) == ("janus", "loss") else V  # the old Janus FDP loss used its generation head
            fits = [B for B in cfg.before_batches if B * S * V * 4 * FULL_LOGIT_COPIES[op] <= cfg.before_limit_gb * 2**30]
            for variant, batches in (("after", cfg.after_batches), ("before", fits)):
                for B in batches:
                    row = _run_one({"backend": backend, "op": op, "variant": variant, "batch": B, "model": model}, cfg.threads)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary = []
    for backend in cfg.backends:
        for op in cfg.ops:
            got = {v: [r for r in rows if (r["backend"], r["op"], r["variant"]) == (backend, op, v) and "error" not in r]
                   for v in ("after", "before")}
            after = next((r for r in got["after"] if r["batch"] == cfg.target_batch), None)
            before = next((r for r in got["before"] if r["batch"] == cfg.target_batch), None) or \
                _extrapolate(got["before"], cfg.target_batch) or _estimate(rows, backend, op, cfg.target_batch, after)
            if after and before:
                per_row = _extrapolate(got["after"], cfg.target_batch)
                summary.append({"backend": backend, "op": op, "batch": cfg.target_batch,
                                "after_peak_mb": after["peak_mb"], "after_ratio_to_min": after["ratio_to_min"],
                                "after_per_row_mb": per_row["per_row_mb"] if per_row else None,
                                "before_peak_mb": before["peak_mb"], "before_extrapolated": before.get("extrapolated", False),
                                "before_per_row_mb": before.get("per_row_mb"),
                                "reduction": round(before["peak_mb"] / after["peak_mb"], 1)})
    result = {"what": "peak memory above the process baseline (static model + inputs + transient), CPU, size=shapes",
              "command": "python -m jobs.bench_model_memory " + " ".join(sys.argv[1:]),
              "threads": cfg.threads, "rows": rows, "summary": summary,
              "capacity_computed": capacity(summary, cfg.backends) if cfg.capacity else []}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=1))
    for c in result["capacity_computed"]:
        print(f"{c['backend']:>7} {c['stage']:<32} {c['per_row_mb']:8.1f} MB per {c['unit']}: "
              + ", ".join(f"{gb} GB -> {c[f'max_batch_{gb}gb']}" for gb in GPUS_GB) + " (computed)")
    for s in summary:
        print(f"{s['backend']:>7} {s['op']:<7} B={s['batch']}: after {s['after_peak_mb']:8.1f} MB "
              f"(x{s['after_ratio_to_min']} of the minimum), before {s['before_peak_mb']:9.1f} MB"
              f"{' (extrapolated ' + s['before_extrapolated'] + ')' if s['before_extrapolated'] else ''}: "
              f"{s['reduction']}x less")
    return result


if __name__ == "__main__":
    raise SystemExit(job_main(BenchMemoryConfig, main, doc=__doc__))
