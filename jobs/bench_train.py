"""Benchmark of the training job (prints a table, writes <out>/bench_train.json).

    python -m jobs.bench_train                                   # the world at runs/world (`dynboot world` first)
    python -m jobs.bench_train world=/tmp/w size=xs steps=30 batch_size=32 lora=true

1. Throughput: the Ray Train + DeepSpeed job with 1 worker divided by the plain single-process `TrainLoop`
   (dynboot/trainer.py), same model, data, seed, batch and threads (goal >= 0.9). Both count only the time
   inside training steps (the Ray job's start-up is reported apart). The plain loop runs before and after
   the Ray job (no Ray cluster up during either) and the ratio uses the mean of the two, because a shared
   box's load drifts; `machine_load_1min` is recorded with the result.
   Loss curves: the largest per-step difference between the two runs (they draw the same batches).
   Also samples per CPU-second inside steps (process CPU time), which a shared box's load distorts far less.
2. ZeRO stage 0 (plain data parallel, DDP semantics) vs 2 vs 3 on 2 workers x 1 thread: samples/s and,
   per worker, peak RSS (GPU: peak allocated) and the model state the rank holds (parameters, fp32 master
   copies, Adam moments), which is what ZeRO partitions.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.mixture import Source, gold_only, load_mixture
from dynboot.rundir import RunDir, write_json
from dynboot.trainer import TrainLoop
from jobs.train import TrainConfig


class BenchConfig(Config):
    """Ray Train + DeepSpeed vs the plain loop; ZeRO stages on 2 workers."""

    world: str = Field("runs/world", description="A `dynboot world` directory (its gold/ is the training data).")
    out: str = Field("runs/bench_train", description="Where the runs and bench_train.json go.")
    task: str = Field("idp", pattern="^(idp|fdp)$", description="Task trained.")
    size: str = Field("xs", description="Tiny model size.")
    steps: int = Field(60, ge=2, description="Steps per run.")
    batch_size: int = Field(32, ge=1, description="Pairs per step per worker.")
    threads: int = Field(2, ge=1, description="torch threads of the plain loop and of the 1-worker Ray job.")
    single_stage: int = Field(2, ge=0, le=3, description="ZeRO stage of the 1-worker Ray job.")
    stages: list[int] = Field([0, 2, 3], description="ZeRO stages compared on 2 workers.")
    lora: bool = Field(False, description="LoRA on a saved untrained base (else full training from scratch).")


def train_config(cfg: BenchConfig, out: Path, **kw) -> TrainConfig:
    base = dict(task=cfg.task, size=cfg.size, steps=cfg.steps, batch_size=cfg.batch_size, warmup=max(1, cfg.steps // 10),
                data=[Source(path=str(Path(cfg.world) / "gold"))], eval_data="", checkpoint_every=0, resume=False,
                out=str(out), lora={"enabled": cfg.lora},
                model_path=str(Path(cfg.out) / "base") if cfg.lora else "")
    return TrainConfig(**(base | kw))


def plain_run(tcfg: TrainConfig) -> list[dict]:
    """The plain loop on exactly what the Ray job's rank 0 trains on."""
    from dynboot.world.augment import world_augmenter
    from jobs.train_worker import build_model, world_spec

    tcfg = tcfg.resolved()
    torch.manual_seed(tcfg.seed)
    spec = world_spec(tcfg)
    model = build_model(tcfg, spec, tcfg.use_lora)
    pool = load_mixture(tcfg.data, tcfg.task)
    return TrainLoop(model, tcfg, pool.examples, augment=gold_only(world_augmenter(spec)),
                     mixture_weights=pool.sampling_weights(tcfg.data)).run()


def ray_run(tcfg: TrainConfig) -> dict:
    from jobs.train import run

    t0 = time.time()
    summary = run(tcfg)
    run_dir = RunDir(tcfg.out)
    return {"summary": summary, "wall_s": round(time.time() - t0, 1),
            "losses": [r["loss"] for r in run_dir.metrics() if "loss" in r],
            "workers": json.loads(run_dir.path("workers.json").read_text())["ranks"]}


def per_cpu(workers: list[dict]) -> float:
    """Samples per CPU-second inside training steps, over all ranks: contention on a shared box stretches
    wall time but barely the CPU time a step needs."""
    return round(sum(w["samples"] for w in workers) / sum(w["cpu_s"] for w in workers), 2)


def bench(cfg: BenchConfig) -> dict:
    if not (Path(cfg.world) / "gold" / "train.json").is_file():
        raise SystemExit(f"{cfg.world}: no gold/train.json; run `dynboot world --out {cfg.world}` first")
    load_start = os.getloadavg()[0]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.lora:
        from dynboot.models.tiny import TinyWorldModel
        from dynboot.world.generate import load_spec

        TinyWorldModel.create(load_spec(cfg.world), cfg.size, seed=1).save(out / "base")

    # The plain loop runs while no Ray cluster is up (a starting cluster takes the CPUs for seconds), and
    # each Ray job starts and stops its own local cluster, as `dynboot train` does.
    single = train_config(cfg, out / "ray_1worker", num_workers=1, threads=cfg.threads, cpus_per_worker=1,
                          zero_stage=cfg.single_stage)
    plain_before = plain_run(single)
    one = ray_run(single)
    plain_after = plain_run(single)
    stages = {}
    for stage in cfg.stages:
        two = train_config(cfg, out / f"ray_2workers_zero{stage}", num_workers=2, threads=1, cpus_per_worker=0.5,
                           zero_stage=stage)
        r = ray_run(two)
        stages[f"zero{stage}"] = {
            "samples_per_s": r["summary"]["samples_per_s"],
            "samples_per_s_per_worker": round(r["summary"]["samples_per_s"] / 2, 2),
            "samples_per_cpu_s": per_cpu(r["workers"]),
            "final_loss": r["losses"][-1], "wall_s": r["wall_s"],
            "per_worker": [{k: w[k] for k in ("rank", "peak_rss_mb", "peak_gpu_mb", "params_mb", "master_mb", "optimizer_mb")}
                           for w in r["workers"]]}

    plain_sps = [plain_before[-1]["samples_per_s"], plain_after[-1]["samples_per_s"]]
    ray_sps = one["summary"]["samples_per_s"]
    n = cfg.steps * cfg.batch_size
    plain_cpu = [round(n / h[-1]["cpu_s"], 2) for h in (plain_before, plain_after)]
    ray_cpu = per_cpu(one["workers"])
    diffs = np.abs(np.array(one["losses"]) - [r["loss"] for r in plain_before])
    result = {
        "config": cfg.model_dump(mode="json"), "machine_load_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "single_worker": {
            "plain_samples_per_s": plain_sps, "ray_samples_per_s": ray_sps,
            "ratio": round(ray_sps / float(np.mean(plain_sps)), 3), "goal": 0.9,
            "plain_samples_per_cpu_s": plain_cpu, "ray_samples_per_cpu_s": ray_cpu,
            "ratio_per_cpu_s": round(ray_cpu / float(np.mean(plain_cpu)), 3),
            "ray_wall_s": one["wall_s"], "ray_steps_s": one["summary"]["seconds"],
            "loss_max_abs_diff": float(diffs.max()), "plain_losses": [round(r["loss"], 6) for r in plain_before],
            "ray_losses": one["losses"], "plain_rerun_max_abs_diff": float(np.max(np.abs(
                np.array([r["loss"] for r in plain_after]) - [r["loss"] for r in plain_before])))},
        "two_workers": stages,
    }
    write_json(out / "bench_train.json", result)
    s = result["single_worker"]
    print(f"\n1 worker (ZeRO-{cfg.single_stage}) vs plain loop, {cfg.size} {cfg.task} batch {cfg.batch_size}, {cfg.steps} steps:")
    print(f"  wall: plain {plain_sps} samples/s, ray {ray_sps} samples/s -> ratio {s['ratio']} (goal >= 0.9)")
    print(f"  CPU:  plain {plain_cpu} samples/CPU-s, ray {ray_cpu} samples/CPU-s -> ratio {s['ratio_per_cpu_s']}")
    print(f"  loss curves max |diff| {s['loss_max_abs_diff']:.2e}; ray job wall {s['ray_wall_s']} s; "
          f"load {result['machine_load_1min']}")
    print("2 workers x 1 thread:")
    print(f"  {'stage':<7}{'samples/s':>10}{'/worker':>9}{'/CPU-s':>8}{'peak RSS MiB':>16}{'params MiB':>12}{'master MiB':>12}{'Adam MiB':>10}")
    for name, st in stages.items():
        w = st["per_worker"]
        print(f"  {name:<7}{st['samples_per_s']:>10}{st['samples_per_s_per_worker']:>9}{st['samples_per_cpu_s']:>8}"
              f"{'/'.join(str(x['peak_rss_mb']) for x in w):>16}{w[0]['params_mb']:>12}{w[0]['master_mb']:>12}{w[0]['optimizer_mb']:>10}")
    print(f"-> {out / 'bench_train.json'}")
    return result


if __name__ == "__main__":
    raise SystemExit(job_main(BenchConfig, bench, doc=__doc__))
