"""Benchmark of the training job (prints a table, writes <out>/bench_train.json).

    python -m jobs.bench_train world=runs/world                   # a `dynboot world` dir (its gold/ is the data)
    python -m jobs.bench_train world=/tmp/w parts=[streaming] sizes=[1000,10000,100000]

Parts (`parts=`):
- `streaming`: the dataset grows (`sizes` pairs: the world's gold pairs replicated into Parquet pair files with
  unique ids, i.e. cheap rows of real PNGs), the run stays the same (`steps` steps, `num_workers` ranks, ZeRO-0):
  per-rank peak RSS at each size (flat: a rank holds a few decoded batches, never its shard; the figure a rank
  would hold if it decoded its shard, as the job did before, is printed beside it), and, in the same runs, the
  streaming ratio: samples/s of training fed by the ingest ÷ the model's own step rate (the same steps without
  the time spent waiting for data), after the first step (the pipeline's start-up is reported apart). Also the
  ingest alone (a rank's stream through Ray Data, no model) in samples/s, against the model's step rate.
- `plain`: Ray Train + DeepSpeed with 1 worker ÷ the plain single-process loop (dynboot.training.trainer), same model,
  data, plan and seed (goal >= 0.9); the loss curves' largest difference.
- `zero`: ZeRO stage 0 vs 2 vs 3 on 2 workers x 1 thread: samples/s, per-worker peak RSS and the model state a
  rank holds (parameters, fp32 master copies, Adam moments), which is what ZeRO partitions.
`machine_load_1min` is recorded with the result: a shared box's load moves wall-clock figures.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.data.mixture import Source
from dynboot.data.pairs import gold_rows, to_table
from dynboot.io.rundir import RunDir, write_json
from dynboot.models.base import TinySize
from jobs.train import TrainConfig
from jobs.train_worker import plain_reference

Part = Literal["streaming", "plain", "zero"]


class BenchConfig(Config):
    """Streaming ingest at growing sizes; Ray Train + DeepSpeed vs the plain loop; ZeRO stages on 2 workers."""

    world: str = Field("runs/world", description="A `dynboot world` directory (its gold/ is the training data).")
    out: str = Field("runs/bench_train", description="Where the runs, the generated data and bench_train.json go.")
    parts: list[Part] = Field(["streaming", "plain", "zero"], description="What to measure (module doc).")
    task: Literal["idp", "fdp"] = Field("idp", description="Task trained.")
    size: TinySize = Field("xs", description="Tiny model size.")
    steps: int = Field(60, ge=2, description="Steps per run.")
    batch_size: int = Field(32, ge=1, description="Pairs per step per worker.")
    threads: int = Field(2, ge=1, description="torch threads of the plain loop and of the 1-worker Ray job.")
    sizes: list[int] = Field([1000, 10000, 100000], description="Pairs in the dataset of each streaming run.")
    num_workers: int = Field(2, ge=1, description="Ranks of the streaming runs.")
    single_stage: int = Field(0, ge=0, le=3, description="ZeRO stage of the 1-worker Ray job of `plain`.")
    stages: list[int] = Field([0, 2, 3], description="ZeRO stages compared on 2 workers.")


def train_config(cfg: BenchConfig, out: Path, data: list[Source], **kw) -> TrainConfig:
    base = dict(task=cfg.task, size=cfg.size, steps=cfg.steps, batch_size=cfg.batch_size, warmup=max(1, cfg.steps // 10),
                data=data, eval_data="", checkpoint_every=0, resume="off", out=str(out),
                eval_generate=False)
    return TrainConfig(**(base | kw))


def replicated_pairs(world: Path, n: int, rows_per_file: int = 20000) -> Path:
    """`n` pair rows: the world's gold pairs repeated with unique ids, in Parquet files of `rows_per_file` rows, under
    `<world>/bench_pairs/` (inside the world, so that training from scratch finds its world.json)."""
    target = world / "bench_pairs" / f"pairs_{n}"
    if (target / "_done").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    gold = to_table(list(gold_rows(world / "gold" / "train.json")))
    reps = -(-n // len(gold))
    table = pa.concat_tables([gold] * reps).slice(0, n)
    ids = pa.array([f"{i:08d}:{x}" for i, x in enumerate(table.column("id").to_pylist())])
    table = table.set_column(table.schema.get_field_index("id"), "id", ids)
    for k, start in enumerate(range(0, n, rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), target / f"part-{k:05d}.parquet", row_group_size=256)
    (target / "_done").write_text(str(n))
    return target


def ray_run(tcfg: TrainConfig) -> dict:
    from jobs.train import run

    t0 = time.time()
    summary = run(tcfg)
    rd = RunDir(tcfg.out)
    return {"summary": summary, "wall_s": round(time.time() - t0, 1), "metrics": [r for r in rd.metrics() if "loss" in r],
            "workers": json.loads(rd.path("workers.json").read_text())["ranks"]}


def steady_ratio(metrics: list[dict]) -> dict:
    """Samples/s fed by the ingest ÷ the steps' own rate, after step 1 (rank 0's timings)."""
    steady = metrics[1:]
    train = metrics[-1]["train_s"] - metrics[0]["train_s"]
    wait = sum(r["data_wait_s"] for r in steady)
    return {"ratio": round((train - wait) / train, 4) if train > 0 else None, "steady_train_s": round(train, 3),
            "steady_data_wait_s": round(wait, 4), "first_step_data_wait_s": metrics[0]["data_wait_s"],
            "first_step_s": metrics[0]["train_s"]}


def ingest_alone(cfg: BenchConfig, data: Path, out: Path, rows: int) -> float:
    """A rank's stream through Ray Data, no model: decoded samples/s."""
    import ray

    from dynboot.data.data_index import build_index, record_index
    from dynboot.io.images import ImagePolicy
    from dynboot.data.ingest import RankStream
    from dynboot.world.generate import load_spec

    assert ray.is_initialized()
    spec = load_spec(cfg.world)
    index = record_index(build_index([Source(path=str(data))]), str(out / "ingest_index"))
    stream = RankStream(index, 0, cfg.num_workers, ImagePolicy(kind="squash", size=spec.image_px, resample="nearest"),
                        seed=0, window=256, reader="ray", rows_hint=rows)
    stream.next(cfg.batch_size)  # start-up
    t0 = time.perf_counter()
    for _ in range(rows // cfg.batch_size):
        stream.next(cfg.batch_size)
    rate = round((rows // cfg.batch_size) * cfg.batch_size / (time.perf_counter() - t0), 1)
    stream.close()
    return rate


def bench_streaming(cfg: BenchConfig, out: Path) -> dict:
    from dynboot.world.generate import load_spec

    import ray

    px = load_spec(cfg.world).image_px
    runs = {}
    ray.init(include_dashboard=False, num_cpus=4)  # one cluster for every size (each run's ranks are new processes)
    try:
        return _streaming_runs(cfg, out, px, runs)
    finally:
        ray.shutdown()


def _streaming_runs(cfg: BenchConfig, out: Path, px: int, runs: dict) -> dict:
    for n in cfg.sizes:
        data = replicated_pairs(Path(cfg.world).resolve(), n)
        r = ray_run(train_config(cfg, out / f"stream_{n}", [Source(path=str(data))], num_workers=cfg.num_workers,
                                 threads=1, cpus_per_worker=0.5, zero_stage=0))
        runs[str(n)] = {"peak_rss_mb_per_rank": [w["peak_rss_mb"] for w in r["workers"]],
                        "decoded_shard_mb_per_rank_if_held": round(n / cfg.num_workers * 2 * px * px * 3 / 2**20, 1),
                        "samples_per_s": r["summary"]["samples_per_s"], "wall_s": r["wall_s"],
                        **steady_ratio(r["metrics"])}
    model_rate = runs[str(cfg.sizes[-1])]
    step_rate = cfg.batch_size / (model_rate["steady_train_s"] - model_rate["steady_data_wait_s"]) * (cfg.steps - 1)
    alone = ingest_alone(cfg, replicated_pairs(Path(cfg.world).resolve(), cfg.sizes[-1]), out, 40 * cfg.batch_size)
    rss = [max(v["peak_rss_mb_per_rank"]) for v in runs.values()]
    return {"runs": runs, "peak_rss_growth": round(rss[-1] / rss[0], 3), "goal_ratio": 0.95,
            "ingest_alone_samples_per_s": alone, "model_step_samples_per_s_per_rank": round(step_rate, 1)}


def per_cpu(workers: list[dict]) -> float:
    """Samples per CPU-second inside training steps, over all ranks: contention on a shared box stretches
    wall time but barely the CPU time a step needs."""
    return round(sum(w["samples"] for w in workers) / sum(w["cpu_s"] for w in workers), 2)


def bench(cfg: BenchConfig) -> dict:
    if not (Path(cfg.world) / "gold" / "train.json").is_file():
        raise SystemExit(f"{cfg.world}: no gold/train.json; run `dynboot world --out {cfg.world}` first")
    load_start = os.getloadavg()[0]
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gold = [Source(path=str(Path(cfg.world).resolve() / "gold"))]
    result: dict = {"config": cfg.model_dump(mode="json")}
    if "streaming" in cfg.parts:
        result["streaming"] = s = bench_streaming(cfg, out)
        print(f"\nstreaming ingest, {cfg.num_workers} ranks, {cfg.steps} steps x batch {cfg.batch_size} ({cfg.size} {cfg.task}):")
        print(f"  {'pairs':>8}{'peak RSS MiB/rank':>22}{'shard if held MiB':>19}{'ratio':>8}{'first step s':>14}")
        for n, v in s["runs"].items():
            print(f"  {n:>8}{'/'.join(str(x) for x in v['peak_rss_mb_per_rank']):>22}"
                  f"{v['decoded_shard_mb_per_rank_if_held']:>19}{v['ratio']:>8}{v['first_step_s']:>14}")
        print(f"  peak RSS x{s['peak_rss_growth']} for x{cfg.sizes[-1] // cfg.sizes[0]} data; ingest alone "
              f"{s['ingest_alone_samples_per_s']} samples/s vs the model's {s['model_step_samples_per_s_per_rank']} per rank")
    if "plain" in cfg.parts:
        # the plain loop runs while no Ray cluster is up (a starting cluster takes the CPUs for seconds)
        single = train_config(cfg, out / "ray_1worker", gold, num_workers=1, threads=cfg.threads, cpus_per_worker=1,
                              zero_stage=cfg.single_stage)
        plain_before = plain_reference(single)
        one = ray_run(single)
        plain_after = plain_reference(single)
        plain_sps = [plain_before[-1]["samples_per_s"], plain_after[-1]["samples_per_s"]]
        ray_sps = one["summary"]["samples_per_s"]
        n = cfg.steps * cfg.batch_size
        plain_cpu = [round(n / h[-1]["cpu_s"], 2) for h in (plain_before, plain_after)]
        ray_cpu = per_cpu(one["workers"])
        ray_losses = [r["loss"] for r in one["metrics"]]
        result["single_worker"] = s = {
            "plain_samples_per_s": plain_sps, "ray_samples_per_s": ray_sps,
            "ratio": round(ray_sps / float(np.mean(plain_sps)), 3), "goal": 0.9,
            "plain_samples_per_cpu_s": plain_cpu, "ray_samples_per_cpu_s": ray_cpu,
            "ratio_per_cpu_s": round(ray_cpu / float(np.mean(plain_cpu)), 3), "ray_wall_s": one["wall_s"],
            "loss_max_abs_diff": float(np.max(np.abs(np.array(ray_losses) - [r["loss"] for r in plain_before]))),
            "plain_losses": [round(r["loss"], 6) for r in plain_before], "ray_losses": ray_losses}
        print(f"\n1 worker (ZeRO-{cfg.single_stage}) vs plain loop: wall {plain_sps} vs {ray_sps} samples/s -> ratio "
              f"{s['ratio']}; CPU {plain_cpu} vs {ray_cpu} samples/CPU-s -> {s['ratio_per_cpu_s']}; "
              f"loss curves max |diff| {s['loss_max_abs_diff']:.2e}")
    if "zero" in cfg.parts:
        stages = {}
        for stage in cfg.stages:
            r = ray_run(train_config(cfg, out / f"ray_2workers_zero{stage}", gold, num_workers=2, threads=1,
                                     cpus_per_worker=0.5, zero_stage=stage))
            stages[f"zero{stage}"] = {
                "samples_per_s": r["summary"]["samples_per_s"], "samples_per_cpu_s": per_cpu(r["workers"]),
                "final_loss": r["metrics"][-1]["loss"], "wall_s": r["wall_s"],
                "per_worker": [{k: w[k] for k in ("rank", "peak_rss_mb", "peak_gpu_mb", "params_mb", "master_mb", "optimizer_mb")}
                               for w in r["workers"]]}
        result["two_workers"] = stages
        print(f"\n2 workers x 1 thread:\n  {'stage':<7}{'samples/s':>10}{'/CPU-s':>8}{'peak RSS MiB':>16}{'params':>9}{'master':>9}{'Adam':>8}")
        for name, st in stages.items():
            w = st["per_worker"]
            print(f"  {name:<7}{st['samples_per_s']:>10}{st['samples_per_cpu_s']:>8}"
                  f"{'/'.join(str(x['peak_rss_mb']) for x in w):>16}{w[0]['params_mb']:>9}{w[0]['master_mb']:>9}{w[0]['optimizer_mb']:>8}")
    result["machine_load_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    write_json(out / "bench_train.json", result)
    print(f"-> {out / 'bench_train.json'}  (load {result['machine_load_1min']})")
    return result


if __name__ == "__main__":
    raise SystemExit(job_main(BenchConfig, bench, doc=__doc__))
