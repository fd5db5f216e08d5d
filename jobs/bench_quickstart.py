"""The quickstart's FDP stage (stage 4) the old way and the new way, in one process and one Ray session.

    nice -n 10 python -m jobs.bench_quickstart run=runs/quickstart out=runs/bench/quickstart fdp_steps=90

Needs a quickstart run directory with its world/ and filter/ (`run=`). Trains the stage's three FDP runs (gold,
gold + pseudo, the weighting ablation) into `out/<variant>/` for each variant, `fdp_steps` steps each, with the
quickstart's settings otherwise: `sequential_exact` = one after another with greedy exact match at every training
evaluation (the quickstart before issue 19), `parallel` = the three at once with one thread each, held-out loss
only, `sequential` = one after another with two threads each, held-out loss only (the default now). Prints and
saves the wall seconds of each and their ratios to `result=`, with the machine's load average.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.io.ray_session import ray_session
from dynboot.io.rundir import write_json

from jobs.train_config import gold_plus
from jobs.quickstart import QuickstartConfig, train_fdp_runs

VARIANTS = {"sequential_exact": {"fdp_parallel": False, "train_exact": True},
            "parallel": {"fdp_parallel": True, "train_exact": False},
            "sequential": {"fdp_parallel": False, "train_exact": False}}


class BenchQuickstartConfig(Config):
    run: str = Field("runs/quickstart", description="A quickstart run directory with world/ and filter/.")
    out: str = Field("runs/bench/quickstart", description="Where the benchmark's FDP runs go (one folder per variant).")
    fdp_steps: int = Field(90, ge=1, description="Steps of each FDP run.")
    variants: list[Literal["sequential_exact", "parallel", "sequential"]] = Field(["sequential", "parallel"], description=f"Variants to time, in order: {', '.join(VARIANTS)}.")
    num_cpus: int = Field(4, ge=1, description="Logical CPUs of the local Ray cluster (the quickstart's).")
    result: str = Field("bench/results/bench_quickstart.json", description="JSON written here.")


def run(cfg: BenchQuickstartConfig) -> dict:
    src = Path(cfg.run)
    kept = json.loads((src / "filter" / "summary.json").read_text())["pairs_kept"]
    gold = json.loads((src / "world" / "summary.json").read_text())["gold_pairs"]
    out: dict = {"config": cfg.model_dump(mode="json"), "load_before": os.getloadavg(), "seconds": {}}
    with ray_session(num_cpus=cfg.num_cpus):
        for name in cfg.variants:
            qcfg = QuickstartConfig(out=str(src), fdp_steps=cfg.fdp_steps, **VARIANTS[name])
            gold_src = {"path": str(src / "world" / "gold"), "weight": float(gold)}
            pseudo_src = {"path": str(src / "filter" / "shards"), "weight": float(kept)}
            root = Path(cfg.out) / name
            boot = gold_plus(gold_src, [pseudo_src], qcfg.balance_classes)  # the quickstart's own gold + pseudo mixture
            runs = [(root / "fdp_gold", [gold_src], qcfg.weighting), (root / "fdp_boot", boot, qcfg.weighting),
                    (root / "fdp_ablation", boot, qcfg.ablation_weighting)]
            t = time.time()
            train_fdp_runs(qcfg, runs)
            out["seconds"][name] = round(time.time() - t, 1)
            out[f"load_after_{name}"] = os.getloadavg()
            print(f"{name}: {out['seconds'][name]} s", flush=True)
    sec = out["seconds"]
    out["ratios"] = {f"{a}/{b}": round(sec[a] / sec[b], 2) for a in sec for b in sec if a < b}
    write_json(cfg.result, out)
    print(json.dumps(sec) + "  " + ", ".join(f"{k} {v}x" for k, v in out["ratios"].items()))
    return out


if __name__ == "__main__":
    raise SystemExit(job_main(BenchQuickstartConfig, run, doc=__doc__))
