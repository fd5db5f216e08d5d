"""Relabel's IDP step, two forwards per pair vs one: `caption` then `action_logprob(captions)` (what relabel ran
before issue 17) against `caption_scored` (the captions' own decoding steps give the score), on the quickstart's
tiny IDP (`TinyWorldModel.create(spec, "xs")`) over embedded-world pairs, in relabel's batches. The two are timed
interleaved in one run (the machine is shared: only their ratio means something) and their scores compared.

    python -m jobs.bench_caption_pass                      # prints and writes bench/results/relabel_one_pass.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.models.base import TinySize


class CaptionPassConfig(Config):
    """Settings of the one-pass captioning benchmark (jobs/bench_caption_pass.py)."""

    pairs: int = Field(512, ge=1, description="World pairs labelled per repeat.")
    batch_size: int = Field(32, ge=1, description="Pairs per IDP call (relabel's default batch_size).")
    repeats: int = Field(3, ge=1, description="Interleaved repeats of each method.")
    size: TinySize = Field("xs", description="Tiny model size (the quickstart's IDP is xs).")
    threads: int = Field(2, ge=1, description="torch threads.")
    seed: int = Field(0, description="Seed of the world pairs and the model.")
    out: str = Field("bench/results/relabel_one_pass.json", description="JSON results file.")


def main(cfg: CaptionPassConfig) -> dict:
    from dynboot.models.tiny import TinyWorldModel
    from dynboot.world import WorldSpec, render
    from dynboot.world.generate import random_pairs

    torch.set_num_threads(cfg.threads)
    spec = WorldSpec()
    ps = random_pairs(spec, cfg.pairs, np.random.default_rng(cfg.seed), set())
    before = np.stack([render(spec, a) for a, _ in ps])
    after = np.stack([render(spec, b) for _, b in ps])
    model = TinyWorldModel.create(spec, cfg.size, seed=cfg.seed).eval()
    bs = cfg.batch_size

    def two_pass():
        caps, scores = [], []
        for i in range(0, len(before), bs):
            c = model.caption(before[i: i + bs], after[i: i + bs])
            caps += c
            scores.append(model.action_logprob(before[i: i + bs], after[i: i + bs], c))
        return caps, torch.cat(scores)

    def one_pass():
        caps, scores = [], []
        for i in range(0, len(before), bs):
            c, s = model.caption_scored(before[i: i + bs], after[i: i + bs])
            caps += c
            scores.append(s)
        return caps, torch.cat(scores)

    times = {"two_pass": [], "one_pass": []}
    results = {}
    two_pass()  # warm-up (first-call allocations, thread pools)
    for _ in range(cfg.repeats):
        for name, fn in (("two_pass", two_pass), ("one_pass", one_pass)):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    same_captions = results["two_pass"][0] == results["one_pass"][0]
    max_diff = float((results["two_pass"][1] - results["one_pass"][1]).abs().max())
    rate = {k: cfg.pairs / float(np.median(v)) for k, v in times.items()}
    out = {"command": "python -m jobs.bench_caption_pass " + " ".join(sys.argv[1:]), "pairs": cfg.pairs,
           "batch_size": bs, "model": f"tiny-{cfg.size}", "threads": cfg.threads,
           "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
           "pairs_per_s": {k: round(v, 1) for k, v in rate.items()},
           "ratio_one_pass_over_two_pass": round(rate["one_pass"] / rate["two_pass"], 3),
           "same_captions": same_captions, "max_abs_score_diff": max_diff}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(out, indent=1))
    print(f"caption + action_logprob: {rate['two_pass']:.1f} pairs/s; caption_scored: {rate['one_pass']:.1f} pairs/s "
          f"(x{out['ratio_one_pass_over_two_pass']}); same captions: {same_captions}, max |score diff| {max_diff:.2e}")
    return out


if __name__ == "__main__":
    raise SystemExit(job_main(CaptionPassConfig, main, doc=__doc__))
