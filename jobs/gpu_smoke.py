"""GPU smoke test of the real backends at realistic sizes: random weights, no downloads, real token counts.

For each backend it builds the network directly on the GPU (bf16) at the released shapes (anole = Chameleon-7B
with the 512 px / 1024-code VQ-GAN, liquid = Gemma-7B + 8192 codes at 256000, janus = Janus-Pro-1B or -7B at
384 px / 576 codes), with an offline tokenizer of the real vocabulary size, and times on 512x512 frames of the
embedded world (8x8 grid, 64 px cells): image encode + decode, caption, scoring N candidates given as codes,
sampling N candidates (with and without classifier-free guidance), and one LoRA training step (FDP loss with
recognition weights). It prints a table with timings and peak GPU memory and writes them to the run directory
(`summary.json`, one line per stage in `metrics.jsonl`). Not part of CI: on a machine without CUDA it says so
and exits 0, unless `allow_cpu=true` (with `size=tiny`, a plumbing check that runs anywhere).

    python -m jobs.gpu_smoke                                      # all backends, realistic sizes, on a GPU
    python -m jobs.gpu_smoke jobs/configs/gpu_smoke.yaml backends=[janus] janus_size=7b
    python -m jobs.gpu_smoke size=tiny allow_cpu=true out=/tmp/smoke   # plumbing check on CPU
    ray job submit --working-dir . -- python -m jobs.gpu_smoke out=/mnt/shared/gpu_smoke
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config, save_config
from dynboot.models.base import Example
from dynboot.models.registry import backend_class
from dynboot.rundir import RunDir
from dynboot.weights import recognition_weights
from dynboot.world import WorldSpec, apply_action, random_scene, render
from dynboot.world.actions import random_action

REALISTIC = {"anole": "7b", "liquid": "7b"}


class GpuSmokeConfig(Config):
    """Settings of the GPU smoke test (jobs/gpu_smoke.py)."""

    backends: list[Literal["anole", "liquid", "janus"]] = Field(
        ["janus", "anole", "liquid"], description="Backends to build and time, one after another.")
    size: Literal["realistic", "tiny"] = Field(
        "realistic", description="'realistic' = released shapes; 'tiny' = the test configs.")
    janus_size: Literal["1b", "7b"] = Field("1b", description="Janus-Pro size when size=realistic.")
    batch: int = Field(2, ge=1, description="Pairs per caption / sample call.")
    n: int = Field(4, ge=1, description="Candidates per prompt (sampling) and candidates scored.")
    top_k: int = Field(0, ge=0, description="Top-k when sampling (0 = full distribution).")
    guidance_scale: float = Field(3.0, description="Classifier-free guidance scale of the guided sampling run.")
    caption_tokens: int = Field(16, ge=1, description="New tokens per caption.")
    train_batch: int = Field(1, ge=1, description="Pairs per training step.")
    lora_rank: int = Field(16, ge=1, description="LoRA rank of the training step (alpha = 2 x rank).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights dtype on the GPU.")
    seed: int = Field(0, description="Seed of weights, frames and sampling.")
    out: str = Field("runs/gpu_smoke", description="Run directory (config.yaml, metrics.jsonl, summary.json).")
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
    def stage(self, name: str, **info):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        row = {"backend": self.backend, "stage": name, "seconds": round(time.perf_counter() - t0, 3), **info}
        if self.device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.rows.append(row)
        self.run.log(**row)
        print(f"  {name:<22} {row['seconds']:>8.2f} s  " + "  ".join(f"{k}={v}" for k, v in row.items()
                                                                  if k not in ("backend", "stage", "seconds")), flush=True)


def smoke_backend(name: str, cfg: GpuSmokeConfig, device: torch.device, run: RunDir) -> list[dict]:
    watch = Stopwatch(device, run, name)
    size = "tiny" if cfg.size == "tiny" else (cfg.janus_size if name == "janus" else REALISTIC[name])
    with watch.stage("build", size=size):
        model = backend_class(name).create(size, seed=cfg.seed, device=str(device), dtype=cfg.dtype).eval()
    tok = model.tokenizer
    watch.rows[-1]["params_b"] = round(sum(p.numel() for p in model.net.parameters()) / 1e9, 3)
    before, after, actions = world_pairs(max(cfg.batch, cfg.train_batch), cfg.seed)
    b, a, acts = before[: cfg.batch], after[: cfg.batch], actions[: cfg.batch]
    print(f"{name} ({size}): {watch.rows[-1]['params_b']} B params, {tok.tokens_per_image} codes per "
          f"{tok.image_size}px image, codebook {tok.codebook_size}", flush=True)
    with watch.stage("encode", images=len(b)):
        codes = tok.encode(b)
    with watch.stage("decode", images=len(b)):
        tok.decode(codes)
    with watch.stage("caption", pairs=len(b), new_tokens=cfg.caption_tokens):
        captions = model.caption(b, a, max_new_tokens=cfg.caption_tokens)
    cands = torch.cat([tok.encode(a[:1])] * cfg.n)
    with watch.stage("score", candidates=cfg.n):
        model.action_logprob(np.repeat(b[:1], cfg.n, 0), cands, [acts[0]] * cfg.n)
    for scale in (1.0, cfg.guidance_scale):
        with watch.stage(f"sample cfg={scale:g}", prompts=len(b), n=cfg.n, tokens=len(b) * cfg.n * tok.tokens_per_image):
            out = model.sample(b, acts, n=cfg.n, temperature=1.0, top_k=cfg.top_k, seed=cfg.seed, guidance_scale=scale)
        assert out.shape == (len(b), cfg.n, tok.tokens_per_image)
        watch.rows[-1]["tokens_per_s"] = round(watch.rows[-1]["tokens"] / watch.rows[-1]["seconds"], 1)
    model.net = get_peft_model(model.net, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.05,
                                                      target_modules=model.lora_target_modules()))
    model.train()
    opt = torch.optim.AdamW([p for p in model.net.parameters() if p.requires_grad], lr=1e-4)
    tb, ta, tacts = before[: cfg.train_batch], after[: cfg.train_batch], actions[: cfg.train_batch]
    examples = [Example(tb[i], ta[i], tacts[i]) for i in range(len(tb))]
    weights = recognition_weights(tok, tb, ta)
    batch = model.collate(examples, "fdp", weights)
    with watch.stage("train step fdp", pairs=len(tb), seq=int(batch["input_ids"].shape[1])):
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
    save_config(cfg, run.root)
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
            "torch": torch.__version__, "dtype": cfg.dtype, "size": cfg.size}
    summary = {**info, "stages": rows, "errors": errors}
    run.write_summary(summary)
    print(f"gpu_smoke: {len(rows)} stages, {len(errors)} failed backends; summary in {run.path('summary.json')}")
    return summary


if __name__ == "__main__":
    raise SystemExit(job_main(GpuSmokeConfig, main, doc=__doc__))
