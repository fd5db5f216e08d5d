"""GPU smoke run of the real backends at their released shapes and the settings of `cluster/`: peak memory and
tokens/s of each stage the cluster runs, random weights, no downloads.

For each backend it builds `dynboot init-model size=full` directly on the GPU in bf16 (anole = Chameleon-7B with
the 512 px / 1024-code VQ-GAN, liquid = Gemma-7B + 8192 codes at 256000, janus = Janus-Pro-7B at 384 px / 576
codes; `janus_size=full-1b` for Janus-Pro-1B), and times on 512x512 frames of the embedded world:
1. caption   `caption_batch` pairs (relabel's batch_size in cluster/k8s/rayjob-relabel.yaml), `caption_tokens` new
             tokens, and the one-pass `caption_scored` relabel calls;
2. score     `score_rows` candidates given as codes (the verifier: 16 requests x n = 4, cluster/k8s/rayservice.yaml);
3. sample    `sample_prompts` prompts (the generator's max_batch_size) x n = 8 candidates, with and without CFG;
4. train     one LoRA step of the FDP loss with recognition weights, `train_batch` pairs (rayjob-train.yaml's
             batch_size), activation checkpointing on (the 7B default), AdamW.
Each stage runs under the model's own token budget (`max_tokens`), so its peak memory is what a replica holds.
It prints a table and writes the run directory (`summary.json`, one line per stage in `metrics.jsonl`) and
`results` (JSON). Without CUDA it says so and exits 0, unless `allow_cpu=true` (with `size=tiny`: the same
stages at the same batch sizes on tiny random models, a plumbing check that runs anywhere, tests/test_gpu_smoke.py).

    python -m jobs.gpu_smoke                                           # all backends, released shapes, on a GPU
    python -m jobs.gpu_smoke jobs/configs/gpu_smoke.yaml backends=[janus] janus_size=full-1b
    python -m jobs.gpu_smoke size=tiny allow_cpu=true out=/tmp/smoke  # plumbing check on CPU
    ray job submit --working-dir . -- python -m jobs.gpu_smoke out=/mnt/shared/gpu_smoke
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from peft import get_peft_model
from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config, save_config
from dynboot.data.example import Example
from dynboot.models.registry import backend_class
from dynboot.io.rundir import RunDir
from dynboot.method.weights import recognition_weights
from dynboot.world import WorldSpec, apply_action, random_scene, render
from dynboot.world.actions import random_action


class GpuSmokeConfig(Config):
    """Settings of the GPU smoke run (jobs/gpu_smoke.py); defaults are the cluster's production settings."""

    backends: list[Literal["anole", "liquid", "janus"]] = Field(
        ["janus", "anole", "liquid"], description="Backends to build and time, one after another.")
    size: Literal["full", "shapes", "tiny"] = Field(
        "full", description="full = released shapes; shapes = real vocabulary, tiny transformer; tiny = test configs.")
    janus_size: Literal["full", "full-1b"] = Field("full", description="Janus-Pro-7B (full) or -1B when size=full.")
    caption_batch: int = Field(16, ge=1, description="Pairs per caption call (relabel batch_size in cluster/).")
    caption_tokens: int = Field(32, ge=1, description="New tokens per caption (caption's max_new_tokens).")
    score_rows: int = Field(64, ge=1, description="Candidates scored in one call (verifier: 16 requests x n=4).")
    sample_prompts: int = Field(4, ge=1, description="Prompts per sample call (the generator's max_batch_size).")
    n: int = Field(8, ge=1, description="Candidates per prompt when sampling.")
    top_k: int = Field(0, ge=0, description="Top-k when sampling (0 = full distribution).")
    guidance_scale: float = Field(3.0, description="Classifier-free guidance scale of the guided sampling run.")
    train_batch: int = Field(4, ge=1, description="Pairs per training step (rayjob-train batch_size).")
    lora_rank: int = Field(16, ge=1, description="LoRA rank of the training step (alpha = 2 x rank).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights dtype on the GPU.")
    seed: int = Field(0, description="Seed of weights, frames and sampling.")
    out: str = Field("runs/gpu_smoke", description="Run directory (config.yaml, metrics.jsonl, summary.json).")
    results: str = Field("bench/results/gpu_smoke.json", description="JSON results file ('' = none).")
    allow_cpu: bool = Field(False, description="Run without CUDA (only sensible with size=tiny).")


def world_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n (before, after, action) triples of 512x512 frames from the embedded world."""
    spec, rng = WorldSpec(grid=8, cell_px=64, max_objects=6), np.random.default_rng(seed)
    before, after, actions = [], [], []
    while len(actions) < n:
        scene = random_scene(spec, rng)
        action = random_action(spec, scene, rng)
        if action is not None:
            before.append(render(spec, scene))
            after.append(render(spec, apply_action(spec, scene, action)))
            actions.append(action.text(spec))
    return np.stack(before), np.stack(after), actions


class Stopwatch:
    def __init__(self, device: torch.device, run: RunDir, backend: str):
        self.device, self.run, self.backend, self.rows = device, run, backend, []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str, tokens: int = 0, **info):
        """Time a stage; `tokens` (what it processed) gives tokens/s; peak GPU memory on CUDA."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        seconds = time.perf_counter() - t0
        row = {"backend": self.backend, "stage": name, "seconds": round(seconds, 3), **info}
        if tokens:
            row |= {"tokens": tokens, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
        if self.device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.rows.append(row)
        self.run.log(**row)
        print(f"  {name:<24} {row['seconds']:>8.2f} s  " + "  ".join(f"{k}={v}" for k, v in row.items()
                                                                  if k not in ("backend", "stage", "seconds")), flush=True)


def smoke_backend(name: str, cfg: GpuSmokeConfig, device: torch.device, run: RunDir) -> list[dict]:
    watch = Stopwatch(device, run, name)
    size = cfg.janus_size if (name == "janus" and cfg.size == "full") else cfg.size
    with watch.stage("build", size=size):
        model = backend_class(name).create(size, seed=cfg.seed, device=str(device), dtype=cfg.dtype).eval()
    tok = model.tokenizer
    watch.rows[-1]["params_b"] = round(sum(p.numel() for p in model.net.parameters()) / 1e9, 3)
    watch.rows[-1]["max_tokens"] = model.max_tokens
    pairs = max(cfg.caption_batch, cfg.train_batch, cfg.sample_prompts, 1)
    before, after, actions = world_pairs(pairs, cfg.seed)
    print(f"{name} ({size}): {watch.rows[-1]['params_b']} B params, {tok.tokens_per_image} codes per "
          f"{tok.image_size}px image, codebook {tok.codebook_size}, max_tokens {model.max_tokens}", flush=True)

    cb, ca = before[: cfg.caption_batch], after[: cfg.caption_batch]
    with watch.stage("encode", images=len(cb)):
        codes = tok.encode(ca)
    with watch.stage("decode", images=len(cb)):
        tok.decode(codes)
    new = len(cb) * cfg.caption_tokens  # an upper bound: captions may stop early
    with watch.stage("caption", tokens=new, pairs=len(cb), new_tokens=cfg.caption_tokens):
        captions = model.caption(cb, ca, max_new_tokens=cfg.caption_tokens)
    with watch.stage("caption_scored (relabel)", tokens=new, pairs=len(cb)):
        _, scores = model.caption_scored(cb, ca, max_new_tokens=cfg.caption_tokens)
    watch.rows[-1]["mean_score"] = round(float(scores.float().mean()), 4)

    reps = -(-cfg.score_rows // len(cb))
    s_before = np.concatenate([cb] * reps)[: cfg.score_rows]
    s_codes = torch.cat([codes] * reps)[: cfg.score_rows]
    s_actions = (actions[: len(cb)] * reps)[: cfg.score_rows]
    with watch.stage("score", tokens=cfg.score_rows * model.token_cost("score"), rows=cfg.score_rows):
        model.action_logprob(s_before, s_codes, s_actions)

    sb, sa = before[: cfg.sample_prompts], actions[: cfg.sample_prompts]
    for scale in (1.0, cfg.guidance_scale):
        generated = len(sb) * cfg.n * tok.tokens_per_image
        with watch.stage(f"sample n={cfg.n} cfg={scale:g}", tokens=generated, prompts=len(sb), n=cfg.n):
            out = model.sample(sb, sa, n=cfg.n, temperature=1.0, top_k=cfg.top_k, seed=cfg.seed, guidance_scale=scale)
        assert out.shape == (len(sb), cfg.n, tok.tokens_per_image)

    model.gradient_checkpointing(True)  # the 7B default; also exercised at the small sizes
    model.net = get_peft_model(model.net, model.lora_config(rank=cfg.lora_rank, alpha=2 * cfg.lora_rank))
    model.train()
    opt = torch.optim.AdamW([p for p in model.net.parameters() if p.requires_grad], lr=1e-4)
    tb, ta, tacts = before[: cfg.train_batch], after[: cfg.train_batch], actions[: cfg.train_batch]
    batch = model.collate([Example(tb[i], ta[i], tacts[i]) for i in range(len(tb))], "fdp", recognition_weights(tok, tb, ta))
    tokens = int(batch["attention_mask"].sum())
    with watch.stage("train step fdp (LoRA)", tokens=tokens, pairs=len(tb), seq=int(batch["input_ids"].shape[1])):
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    watch.rows[-1]["loss"] = round(float(loss.detach()), 4)
    print(f"  caption[0]: {captions[0]!r}", flush=True)
    del model, opt, batch, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return watch.rows


def main(cfg: GpuSmokeConfig) -> dict | None:
    if not torch.cuda.is_available() and not cfg.allow_cpu:
        print("gpu_smoke: no CUDA device here; nothing to do (this check needs a GPU; "
              "pass allow_cpu=true size=tiny for a plumbing run on CPU)")
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = RunDir(cfg.out)
    save_config(cfg, cfg.out)
    rows, errors = [], {}
    for name in cfg.backends:
        try:
            rows += smoke_backend(name, cfg, device, run)
        except Exception as err:  # report every backend, even when one fails
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"{name}: FAILED {errors[name]}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": cfg.dtype, "size": cfg.size, "config": cfg.model_dump(mode="json")}
    summary = {**info, "stages": rows, "errors": errors}
    run.write_summary(summary)
    if cfg.results:
        Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.results).write_text(json.dumps(summary, indent=1))
    print(f"gpu_smoke: {len(rows)} stages, {len(errors)} failed backends; summary in {run.uri('summary.json')}")
    return summary


if __name__ == "__main__":
    raise SystemExit(job_main(GpuSmokeConfig, main, doc=__doc__))
