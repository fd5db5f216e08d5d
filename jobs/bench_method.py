"""Benchmarks of the method core on the embedded world (plain loop, no Ray). Prints and saves JSON.

    python -m jobs.bench_method part=speed out=runs/bench/method
    python -m jobs.bench_method part=learning world=runs/world steps=1000 out=runs/bench/method

speed:    FDP sampling tokens/s with the KV cache vs recomputing the sequence each step; best-of-8 as one
          call (shared prefix, cache repeated) vs 8 calls of N=1. Ratios are measured in one run.
learning: IDP exact match vs training minutes for `gold_sizes` gold pairs; FDP exact / changed-cell
          accuracy with the recognition-weighted loss vs plain CE; best-of-N (N = 1, 2, 4, 8) with the IDP
          as verifier. Each run logs its curve (metric vs train seconds and CPU seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.models.tiny import TinyWorldModel
from dynboot.data.pairs import load_examples
from dynboot.io.rundir import write_json
from dynboot.training.trainer import LoopConfig, TrainLoop
from dynboot.world.augment import world_augmenter
from dynboot.world.generate import WorldConfig, generate_world, load_spec
from dynboot.eval.world_eval import best_of_n_eval, fdp_eval, idp_eval
from dynboot.models.base import TinySize


class BenchConfig(Config):
    """Method benchmarks (speed, learning)."""

    part: str = Field("all", pattern="^(all|speed|learning)$", description="Which benchmarks to run.")
    world: str = Field("runs/world", description="World directory (generated with defaults if missing).")
    out: str = Field("runs/bench/method", description="Where the JSON and model checkpoints go.")
    size: TinySize = Field("xs", description="Tiny model size.")
    steps: int = Field(1000, ge=1, description="Optimiser steps per learning run.")
    gold_sizes: list[int] = Field([500, 2000], description="Gold-set sizes for the IDP learning curves.")
    fdp_gold: int = Field(2000, ge=1, description="Gold pairs for the FDP runs.")
    test: int = Field(500, ge=1, description="Test pairs scored.")
    eval_every: int = Field(250, ge=1, description="Steps between evaluations on the test pairs.")
    ns: list[int] = Field([1, 2, 4, 8], description="Best-of-N values.")
    threads: int = Field(2, ge=1, description="torch threads.")
    speed_repeats: int = Field(3, ge=1, description="Repeats of each speed measurement (best taken).")


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_speed(cfg: BenchConfig, model: TinyWorldModel, test) -> dict:
    before = np.stack([e.before for e in test[:16]])
    actions = [e.action for e in test[:16]]
    L = model.tokenizer.tokens_per_image
    cache_s = _timed(lambda: model.sample(before, actions, n=8, seed=0), cfg.speed_repeats)
    nocache_s = _timed(lambda: model.sample(before, actions, n=8, seed=0, use_cache=False), cfg.speed_repeats)
    one_call_s = _timed(lambda: model.sample(before, actions, n=8, seed=0), cfg.speed_repeats)
    eight_calls_s = _timed(lambda: [model.sample(before, actions, n=1, seed=s) for s in range(8)], cfg.speed_repeats)
    tokens = len(before) * 8 * L
    return {
        "batch": len(before), "n": 8, "tokens_per_image": L,
        "kv_cache_tokens_per_s": round(tokens / cache_s, 1),
        "no_cache_tokens_per_s": round(tokens / nocache_s, 1),
        "kv_cache_speedup": round(nocache_s / cache_s, 2),
        "n8_one_call_s": round(one_call_s, 4), "n8_eight_calls_s": round(eight_calls_s, 4),
        "one_call_speedup": round(eight_calls_s / one_call_s, 2),
    }


def _train(cfg: BenchConfig, spec, task: str, examples, test, weighting: str = "relative") -> tuple[TinyWorldModel, list]:
    model = TinyWorldModel.create(spec, size=cfg.size, seed=0)
    loop_cfg = LoopConfig(task=task, steps=cfg.steps, weighting=weighting, eval_every=cfg.eval_every, threads=cfg.threads)
    evaluate = (lambda s: {"idp": idp_eval(model, test, spec)}) if task == "idp" else (lambda s: {"fdp": fdp_eval(model, test, spec)})
    curve = []

    def log(rec: dict) -> None:
        if task in rec:
            m = rec[task]
            point = {"step": rec["step"], "train_min": round(rec["train_s"] / 60, 2), "cpu_min": round(rec["cpu_s"] / 60, 2),
                     "loss": round(rec["loss"], 4), "exact": round(m["exact"], 4)}
            if task == "fdp":
                point |= {"changed_cell_acc": round(m["changed_cell_acc"], 4), "copy_rate": round(m["copy_rate"], 4)}
            curve.append(point)
            print(f"  {task} step {rec['step']}: {point}", flush=True)

    TrainLoop(model, loop_cfg, examples, augment=world_augmenter(spec)).run(on_eval=evaluate, log=log)
    return model, curve


def bench_learning(cfg: BenchConfig, spec, gold_all, test) -> dict:
    out: dict = {"idp": {}, "fdp": {}}
    idp_best = None
    for n in cfg.gold_sizes:
        print(f"IDP on {n} gold pairs", flush=True)
        model, curve = _train(cfg, spec, "idp", gold_all[:n], test)
        out["idp"][str(n)] = {"curve": curve, "final": idp_eval(model, test, spec)}
        model.save(Path(cfg.out) / f"idp_{n}")
        idp_best = model
    for weighting in ("relative", "none"):
        print(f"FDP on {cfg.fdp_gold} gold pairs, weighting={weighting}", flush=True)
        model, curve = _train(cfg, spec, "fdp", gold_all[: cfg.fdp_gold], test, weighting)
        res = {"curve": curve, "final": fdp_eval(model, test, spec)}
        res["best_of_n"] = best_of_n_eval(model, idp_best, test, spec, tuple(cfg.ns))
        out["fdp"][weighting] = res
        model.save(Path(cfg.out) / f"fdp_{weighting}")
    return out


def run(cfg: BenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    if not (Path(cfg.world) / "world.json").is_file():
        generate_world(WorldConfig(out=cfg.world))
    spec = load_spec(cfg.world)
    test = load_examples(Path(cfg.world) / "test" / "test.json", limit=cfg.test)
    result: dict = {"config": cfg.model_dump(), "torch_threads": torch.get_num_threads()}
    if cfg.part in ("all", "speed"):
        result["speed"] = bench_speed(cfg, TinyWorldModel.create(spec, size=cfg.size).eval(), test)
        print(json.dumps(result["speed"], indent=2), flush=True)
    if cfg.part in ("all", "learning"):
        gold = load_examples(Path(cfg.world) / "gold" / "train.json", limit=max(max(cfg.gold_sizes), cfg.fdp_gold))
        result["learning"] = bench_learning(cfg, spec, gold, test)
    path = write_json(Path(cfg.out) / f"bench_method_{cfg.part}.json", result)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    raise SystemExit(job_main(BenchConfig, run, doc=__doc__))
