"""`dynboot quickstart`: the whole bootstrapping loop on the embedded world, measured, on a laptop.

    dynboot quickstart --out runs/quickstart
    python -m jobs.quickstart out=runs/quickstart idp_steps=600 fdp_steps=600      # a shorter run
    ray job submit --working-dir . -- python -m jobs.quickstart out=/shared/runs/quickstart

Stages (one local Ray cluster for all of them; each stage's outputs in its own folder, a finished stage —
one with a summary.json — is not redone when the command is rerun):
  1 world/      gold pairs, unlabelled videos (true actions kept aside), test split     `dynboot world`
  2 idp/        IDP trained on the gold pairs                                           `dynboot train task=idp`
  3 relabel/    the IDP captions the videos' key-frame pairs -> Parquet shards          `dynboot relabel`
    filter/     score threshold + stratified top-K                                      `dynboot filter`
  4 fdp_gold/   FDP on gold only (loss: `weighting`)                                    `dynboot train task=fdp`
    fdp_boot/   FDP on gold + pseudo (loss: `weighting`)
    fdp_ablation/  FDP on gold + pseudo with the other loss: recognition-weighted if `weighting=none`, else
                plain CE (the weighting row; `ablation=false` skips it)
  5 eval/       best-of-N for N = 1, 2, 4, 8 through the served generator (fdp_boot) + verifier (idp), one
                HTTP request per test pair returning all max(N) candidates and their verifier scores; greedy
                exact metrics of every model; pseudo-label accuracy against videos_truth.jsonl
  6 report.md   the paper's four effects, each a row with its numbers, + PNGs; the table is printed
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config, save_config
from dynboot.io.console import duration, say
from dynboot.io.ray_session import ray_session
from dynboot.io.rundir import RunDir
from dynboot.io.tracking import TrackingKind, open_tracker
from dynboot.models.base import TinySize

from jobs.quickstart_eval import ablation_weighting, evaluate_stage, write_quickstart_report

__all__ = ["QuickstartConfig", "run", "train_fdp_runs"]


class QuickstartConfig(Config):
    """The whole loop on the embedded world. Defaults are sized for 2 CPU cores."""

    out: str = Field("runs/quickstart", description="Run directory; each stage writes a sub-folder.")
    gold: int = Field(1000, ge=10, description="Gold (labelled) pairs.")
    videos: int = Field(400, ge=1, description="Unlabelled episode videos (8 key-frame pairs each).")
    test: int = Field(300, ge=10, description="Held-out test pairs.")
    seed: int = Field(0, description="World seed.")
    size: TinySize = Field("xs", description="Tiny model size (xxs, xs, s, m).")
    idp_steps: int = Field(900, ge=1, description="IDP optimiser steps.")
    fdp_steps: int = Field(450, ge=1, description="Optimiser steps of each FDP run.")
    batch_size: int = Field(64, ge=1, description="Pairs per step.")
    pseudo_ratio: float = Field(1.0, gt=0, description="Weight of the pseudo source against gold in the FDP mixture "
                                "(per pair: 1.0 = every pair drawn equally often).")
    min_score: float = Field(-0.05, description="Filter: keep pseudo pairs whose IDP mean per-token log-prob is at "
                             "least this (-0.05 = the IDP gave its caption ~95% per token). On the world the wrong "
                             "captions score below -0.12 and the right ones above -0.005 (90% of each).")
    weighting: Literal["relative", "floor", "none"] = Field(
        "none", description="FDP loss of the gold and gold + pseudo runs (dynboot/method/weights.py). Plain CE by default: "
        "on the embedded world the tiny model has a copy feature, so it does not over-copy, and the recognition "
        "weights (which depend on the target) tilt it towards changing cells that should stay; the ablation row "
        "measures this every run. The paper's loss, for real images, is `relative`.")
    ablation: bool = Field(True, description="Also train FDP on gold + pseudo with the other loss (the weighting row).")
    ns: list[int] = Field([1, 2, 4, 8], description="Best-of-N values evaluated through the serve app.")
    temperature: float = Field(1.0, ge=0, description="FDP sampling temperature for best-of-N.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage of the train jobs (0 = plain data "
                            "parallel: no DeepSpeed op build on a fresh laptop).")
    num_cpus: int = Field(4, ge=1, description="Logical CPUs of the local Ray cluster (oversubscribing 2 cores is "
                          "fine: every actor asks for a fraction).")
    port: int = Field(0, ge=0, le=65535, description="Loopback port of the serve app during evaluation (0 = a free "
                      "one: a port in use must not fail the run after the training).")
    clients: int = Field(4, ge=1, description="Concurrent HTTP clients during evaluation.")
    train_exact: bool = Field(False, description="Also greedy exact match at each training evaluation (off: held-out "
                              "loss only; stage 5 measures every model on the whole test split, and greedy FDP "
                              "generation during training cost more than the training itself on 2 cores).")
    fdp_parallel: bool = Field(True, description="Train the FDP runs at the same time (one thread each) rather than "
                               "one after another: the same steps, less waiting for start-ups.")
    progress_every_s: float = Field(5.0, gt=0, description="Seconds between the training stages' progress lines.")
    tracking: TrackingKind = Field("none", description="Experiment tracker (as HF Trainer's report_to): none, mlflow "
                                   "or wandb; each training stage is a run, and the quickstart's results one more.")
    tracking_uri: str = Field("", description="MLflow tracking URI (empty = MLFLOW_TRACKING_URI, else MLflow's default).")
    tracking_project: str = Field("dynboot-quickstart", description="MLflow experiment / W&B project.")


def _done(stage: Path) -> bool:
    return (stage / "summary.json").is_file()


def _stage(name: str, t_all: float) -> float:
    say(f"[{duration(time.time() - t_all):>6}] {name}")
    return time.time()


def _train(cfg: QuickstartConfig, out: Path, task: str, data: list[dict], steps: int, weighting: str = "none",
           share: int = 1) -> None:
    """One `dynboot train` run in this Ray session. `share` runs at once (the FDP stage): each reserves 1/share of
    the CPUs and trains with one thread, so that they fill the 2 cores together instead of oversubscribing them."""
    from jobs.train import TrainConfig, run as train

    if _done(out):
        say(f"  {out.name}: done in an earlier run ({out / 'summary.json'})")
        return
    train(TrainConfig.model_validate({
        "task": task, "data": data, "out": str(out), "steps": steps, "batch_size": cfg.batch_size,
        "size": cfg.size, "weighting": weighting, "num_workers": 1, "cpus_per_worker": 1.0 / share,
        "ingest_cpus": 0.5 / share, "threads": 2 if share == 1 else 1,
        "zero_stage": cfg.zero_stage, "eval_data": str(Path(cfg.out) / "world" / "test"), "eval_limit": 128,
        "eval_generate": cfg.train_exact, "eval_every": max(steps // 4, 1), "checkpoint_every": max(steps // 2, 1),
        "name": out.name, "progress_every_s": cfg.progress_every_s, "tracking": cfg.tracking,
        "tracking_uri": cfg.tracking_uri, "tracking_project": cfg.tracking_project,
    }))


def train_fdp_runs(cfg: QuickstartConfig, runs: list[tuple[Path, list[dict], str]]) -> None:
    """The FDP runs, all at once (`fdp_parallel`: one Ray Train start-up's wait instead of three, and the cores
    kept busy while a run starts, checkpoints or exports) or one after another."""
    if not cfg.fdp_parallel:
        for out, data, weighting in runs:
            _train(cfg, out, "fdp", data, cfg.fdp_steps, weighting)
        return
    with ThreadPoolExecutor(len(runs), thread_name_prefix="dynboot-fdp") as pool:
        futures = [pool.submit(_train, cfg, out, "fdp", data, cfg.fdp_steps, weighting, len(runs))
                   for out, data, weighting in runs]
        for f in futures:
            f.result()  # the first failure is raised (the others finish: a rerun resumes them)


def _with_earlier_times(root: Path, times: dict[str, float], done_before: list[str]) -> dict[str, float]:
    """On a resumed run, the stages skipped keep the seconds of the run that did them (the total adds them)."""
    earlier_path = root / "summary.json"
    if not done_before or not earlier_path.is_file():
        return times
    earlier = json.loads(earlier_path.read_text()).get("seconds", {})
    reused = {k: earlier[k] for k in done_before if k in earlier}
    total = times["total"] + sum(v - times.get(k, 0.0) for k, v in reused.items())
    return times | reused | {"total": total, "this_run": times["total"]}


def run(cfg: QuickstartConfig) -> dict:
    from dynboot.world.generate import WorldConfig, generate_world

    t_all = time.time()
    root = RunDir(cfg.out)
    save_config(cfg, root.root)
    world, idp, relabel, filt = (root.path(p) for p in ("world", "idp", "relabel", "filter"))
    fdp = {k: root.path(f"fdp_{k}") for k in ("gold", "boot", "ablation")}
    times: dict[str, float] = {}
    stage_dirs = {"world": [world], "idp": [idp], "relabel": [relabel, filt], "fdp": list(fdp.values())[: 3 if cfg.ablation else 2]}
    done_before = [k for k, dirs in stage_dirs.items() if all(_done(d) for d in dirs)]

    t = _stage("1/6 world: gold pairs, unlabelled videos, test split", t_all)
    if not _done(world):
        generate_world(WorldConfig(out=str(world), gold=cfg.gold, videos=cfg.videos, test=cfg.test, seed=cfg.seed))
    times["world"] = time.time() - t

    with ray_session(num_cpus=cfg.num_cpus):  # one Ray session for every stage (joined under `ray job submit`)
        gold_src = {"path": str(world / "gold"), "weight": float(cfg.gold)}  # weights are per-source shares
        t = _stage(f"2/6 train IDP on {cfg.gold} gold pairs ({cfg.idp_steps} steps)", t_all)
        _train(cfg, idp, "idp", [gold_src], cfg.idp_steps)  # (weighting touches FDP targets only)
        times["idp"] = time.time() - t

        t = _stage("3/6 relabel the unlabelled videos with the IDP, then filter", t_all)
        from jobs.filter import FilterConfig, run as filter_run
        from jobs.relabel import RelabelConfig, run as relabel_run

        if not _done(relabel):
            relabel_run(RelabelConfig(videos=str(world / "videos"), out=str(relabel), model_path=str(idp / "model"),
                                      backend="", idp_cpus=1.0, batch_size=64, videos_per_batch=16,
                                      keyframes={"strategy": "stills"}))  # the world's key states are its stills
        if not _done(filt):
            filter_run(FilterConfig(shards=str(relabel), out=str(filt), mode="enable", min_score=cfg.min_score, top_k=0))
        times["relabel"] = time.time() - t

        kept = json.loads((filt / "summary.json").read_text())["pairs_kept"]
        written = json.loads((relabel / "summary.json").read_text())
        say(f"  relabel: {written['pairs_total']} pseudo-labelled pairs from {written['videos_total']} videos "
            f"({written['quarantine_total']} quarantined); the filter kept {kept}  [{duration(times['relabel'])}]")
        if kept == 0:
            raise SystemExit(f"the filter kept no pseudo pairs (min_score={cfg.min_score}): the IDP is too weak for "
                             f"the threshold; train it longer (idp_steps=) or lower min_score=, then rerun (finished "
                             f"stages are kept; delete {filt} to refilter)")
        pseudo_src = {"path": str(filt / "shards"), "weight": cfg.pseudo_ratio * kept}
        other = ablation_weighting(cfg)
        t = _stage(f"4/6 train FDP ({cfg.weighting}): gold only, gold + pseudo"
                   f"{f'; gold + pseudo with {other}' if cfg.ablation else ''}", t_all)
        runs = [(fdp["gold"], [gold_src], cfg.weighting), (fdp["boot"], [gold_src, pseudo_src], cfg.weighting)]
        train_fdp_runs(cfg, runs + ([(fdp["ablation"], [gold_src, pseudo_src], other)] if cfg.ablation else []))
        times["fdp"] = time.time() - t

        t = _stage(f"5/6 evaluate: best-of-N (N={cfg.ns}) through the serve app, greedy metrics of every model", t_all)
        results = evaluate_stage(cfg, world, idp, relabel, fdp)
        times["eval"] = time.time() - t

    t = _stage("6/6 report", t_all)
    times["total"] = time.time() - t_all
    times = _with_earlier_times(root.root, times, done_before)
    summary = {"results": results, "seconds": {k: round(v, 1) for k, v in times.items()}}
    report, table = write_quickstart_report(root.root, cfg, results, summary["seconds"])
    root.write_summary(summary)
    tracker = open_tracker(cfg.tracking, "quickstart", cfg.model_dump(mode="json"), cfg.tracking_uri, cfg.tracking_project)
    tracker.finish(summary)
    say("\n" + table + f"\n\nreport: {report}   (total {duration(times['total'])}; seconds per stage: "
        + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items() if k != "total") + ")")
    return summary


if __name__ == "__main__":
    raise SystemExit(job_main(QuickstartConfig, run, doc=__doc__, console=True))
