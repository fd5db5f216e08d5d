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
    fdp_ablation/  FDP on gold + pseudo with `ablation_weighting` (causal_spread, the best recognition weighting
                measured on the world; `relative` = the paper's; the weighting row; `ablation=false` skips it)
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
from typing import ClassVar

from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.eval.back_translation import BackTranslation
from dynboot.io.console import duration, say
from dynboot.io.ray_session import ray_session
from dynboot.io.rundir import ResumeMode, RunDir
from dynboot.io.tracking import TrackingKind, open_tracker
from dynboot.method.weights import Strategy
from dynboot.models.base import TinySize

from jobs.bootstrap import relabel_and_filter
from jobs.quickstart_eval import evaluate_stage, write_quickstart_report
from jobs.train_config import gold_plus

__all__ = ["QuickstartConfig", "run", "train_fdp_runs"]


STAGE_DIRS = ("world", "idp", "relabel", "filter", "fdp_gold", "fdp_boot", "fdp_ablation", "eval", "rollout", "rounds")


class QuickstartConfig(Config):
    """The whole loop on the embedded world. Defaults are sized for 2 CPU cores."""

    rerun_may_change: ClassVar[frozenset[str]] = frozenset({
        "rounds", "num_cpus", "port", "clients", "fdp_parallel", "progress_every_s", "tracking", "tracking_uri",
        "tracking_project"})

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
    balance_classes: bool = Field(True, description="Train on gold + pseudo with every action class at its gold share "
                                  "(dynboot.data.mixture.class_balanced): the filter keeps almost no pseudo pair of "
                                  "the IDP's weak class (add), and a plain mixture diluted it from 20 % to 6 % of the "
                                  "draws; balanced, its gold pairs are drawn more often instead.")
    min_score: float = Field(-0.05, description="Filter: keep pseudo pairs whose IDP mean per-token log-prob is at "
                             "least this (-0.05 = the IDP gave its caption ~95% per token). On the world the wrong "
                             "captions score below -0.12 and the right ones above -0.005 (90% of each).")
    weighting: Strategy = Field(
        "none", description="FDP loss of the gold and gold + pseudo runs (dynboot/method/weights.py). Plain CE by default: "
        "on the embedded world the tiny model has a copy feature, so it does not over-copy, and the recognition "
        "weights (which depend on the target) tilt it towards changing cells that should stay; the ablation row "
        "measures this every run. The paper's loss, for real images, is `relative`.")
    ablation_weighting: Strategy = Field(
        "causal_spread", description="Loss of the third FDP run (gold + pseudo), which the weighting row compares "
        "with `weighting`: the best of the recognition weightings measured on the world (`python -m "
        "jobs.bench_weighting`, the README's weighting table: causal_spread, label-independent); `relative` is the "
        "paper's Eq. 2 (0.000 exact here: it over-edits).")
    ablation: bool = Field(True, description="Also train FDP on gold + pseudo with `ablation_weighting` (the weighting row).")
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
    fdp_parallel: bool = Field(False, description="Train the FDP runs at the same time (one thread each) rather than "
                               "one after another (two threads each). Off: on 2 cores three runs at once made 200 "
                               "samples/s together, one run alone 359 (the ingest and Ray overheads of three runs "
                               "compete for the same cores), so one after another finishes sooner.")
    rollout_episodes: int = Field(32, ge=0, description="Held-out episodes the gold + pseudo FDP rolls forward "
                                  "`rollout_steps` actions (N=1 and the largest of `ns`, IDP verifier) for the report's "
                                  "rollout strip and exact match at step 1..k (`dynboot rollout`; 0 = skip).")
    rollout_steps: int = Field(4, ge=1, le=32, description="Actions per rollout episode.")
    rounds: int = Field(1, ge=1, description="Bootstrapping rounds (`dynboot bootstrap`): 1 = the loop once; K > 1 "
                        "goes on in rounds/ with rounds 1..K-1 (back-translation by this run's models, IDP and FDP "
                        "trained again, the stop rule on a validation split), this run's stages reused as round 0.")
    back_translation: BackTranslation = Field(default_factory=BackTranslation, description="rounds > 1: the "
                                              "generated + IDP-verified pairs each next round's IDP also trains on.")
    progress_every_s: float = Field(5.0, gt=0, description="Seconds between the training stages' progress lines.")
    tracking: TrackingKind = Field("none", description="Experiment tracker (as HF Trainer's report_to): none, mlflow "
                                   "or wandb; each training stage is a run, and the quickstart's results one more.")
    tracking_uri: str = Field("", description="MLflow tracking URI (empty = MLFLOW_TRACKING_URI, else MLflow's default).")
    tracking_project: str = Field("dynboot-quickstart", description="MLflow experiment / W&B project.")
    resume: ResumeMode = Field("auto", description="auto: continue the run in `out` (finished stages are skipped) "
                               "if its config matches but for rounds and operational fields; force: despite "
                               "differences; off: set the old run's stages aside and start over.")


def _done(stage: Path) -> bool:
    return (stage / "summary.json").is_file()


def _stage(name: str, t_all: float) -> float:
    say(f"[{duration(time.time() - t_all):>6}] {name}")
    return time.time()


def _train(cfg: QuickstartConfig, out: Path, task: str, data: list[dict], steps: int, weighting: str = "none",
           share: int = 1) -> None:
    """One `dynboot train` run in this Ray session (`share`: jobs.train_config.world_train_config)."""
    from jobs.train import run as train
    from jobs.train_config import world_train_config

    if _done(out):
        say(f"  {out.name}: done in an earlier run ({out / 'summary.json'})")
        return
    train(world_train_config(
        task, data, str(out), steps, str(Path(cfg.out) / "world" / "test"), share=share, batch_size=cfg.batch_size,
        size=cfg.size, weighting=weighting, zero_stage=cfg.zero_stage, eval_limit=128, eval_generate=cfg.train_exact,
        name=out.name, progress_every_s=cfg.progress_every_s, tracking=cfg.tracking, tracking_uri=cfg.tracking_uri,
        tracking_project=cfg.tracking_project))


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


def _rounds(cfg: QuickstartConfig, world: Path, first_round: dict[str, Path]) -> dict:
    """`dynboot bootstrap` in <out>/rounds on this run's world, with this run's stages as round 0; its table."""
    from jobs.bootstrap import BootstrapConfig, run as bootstrap

    summary = bootstrap(BootstrapConfig(
        out=str(Path(cfg.out) / "rounds"), rounds=cfg.rounds, world=str(world), val=max(10, min(100, cfg.test // 3)),
        seed=cfg.seed, size=cfg.size,
        idp_steps=cfg.idp_steps, fdp_steps=cfg.fdp_steps, batch_size=cfg.batch_size, min_score=cfg.min_score,
        weighting=cfg.weighting, balance_classes=cfg.balance_classes, ns=cfg.ns, zero_stage=cfg.zero_stage,
        num_cpus=cfg.num_cpus,
        back_translation=cfg.back_translation), first_round)
    say(f"  rounds: {summary['rounds_run']} run, best round {summary['best_round']}"
        f"{'; stopped: ' + summary['stopped'] if summary['stopped'] else ''}")
    return {k: summary[k] for k in ("rounds_run", "best_round", "stopped", "table")}


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
    with RunDir(cfg.out).open(cfg, resume=cfg.resume, set_aside=STAGE_DIRS + ("report.md",)) as root:
        return _run(cfg, root)


def _run(cfg: QuickstartConfig, root: RunDir) -> dict:
    from dynboot.world.generate import WorldConfig, generate_world

    t_all = time.time()
    world, idp, relabel, filt = (root.path(p) for p in ("world", "idp", "relabel", "filter"))
    fdp = {k: root.path(f"fdp_{k}") for k in ("gold", "boot", "ablation")}
    times: dict[str, float] = {}
    stage_dirs = {"world": [world], "idp": [idp], "relabel": [relabel, filt], "fdp": list(fdp.values())[: 3 if cfg.ablation else 2]}
    done_before = [k for k, dirs in stage_dirs.items() if all(_done(d) for d in dirs)]

    def finished(stage: str, t: float) -> None:  # a stage's seconds, in the summary and a metrics row
        times[stage] = time.time() - t
        root.log(stage=stage, seconds=round(times[stage], 1))

    n = 7 if cfg.rounds > 1 else 6
    t = _stage(f"1/{n} world: gold pairs, unlabelled videos, test split", t_all)
    if not _done(world):
        generate_world(WorldConfig(out=str(world), gold=cfg.gold, videos=cfg.videos, test=cfg.test, seed=cfg.seed))
    finished("world", t)

    with ray_session(num_cpus=cfg.num_cpus):  # one Ray session for every stage (joined under `ray job submit`)
        gold_src = {"path": str(world / "gold"), "weight": float(cfg.gold)}  # weights are per-source shares
        t = _stage(f"2/{n} train IDP on {cfg.gold} gold pairs ({cfg.idp_steps} steps)", t_all)
        _train(cfg, idp, "idp", [gold_src], cfg.idp_steps)  # (weighting touches FDP targets only)
        finished("idp", t)

        t = _stage(f"3/{n} relabel the unlabelled videos with the IDP, then filter", t_all)
        relabel_and_filter(world, idp, relabel, filt, cfg.min_score)
        finished("relabel", t)

        kept = json.loads((filt / "summary.json").read_text())["pairs_kept"]
        written = json.loads((relabel / "summary.json").read_text())
        say(f"  relabel: {written['pairs_total']} pseudo-labelled pairs from {written['videos_total']} videos "
            f"({written['quarantine_total']} quarantined); the filter kept {kept}  [{duration(times['relabel'])}]")
        if kept == 0:
            raise SystemExit(f"the filter kept no pseudo pairs (min_score={cfg.min_score}): the IDP is too weak for "
                             f"the threshold; train it longer (idp_steps=) or lower min_score=, then rerun (finished "
                             f"stages are kept; delete {filt} to refilter)")
        pseudo_src = {"path": str(filt / "shards"), "weight": cfg.pseudo_ratio * kept}
        boot_data = gold_plus(gold_src, [pseudo_src], cfg.balance_classes)
        other = cfg.ablation_weighting
        t = _stage(f"4/{n} train FDP ({cfg.weighting}): gold only, gold + pseudo"
                   f"{f'; gold + pseudo with {other}' if cfg.ablation else ''}", t_all)
        runs = [(fdp["gold"], [gold_src], cfg.weighting), (fdp["boot"], boot_data, cfg.weighting)]
        train_fdp_runs(cfg, runs + ([(fdp["ablation"], boot_data, other)] if cfg.ablation else []))
        finished("fdp", t)

        t = _stage(f"5/{n} evaluate: best-of-N (N={cfg.ns}) through the serve app, greedy metrics of every model"
                   f"{f', {cfg.rollout_steps}-step rollouts' if cfg.rollout_episodes else ''}", t_all)
        results = evaluate_stage(cfg, world, idp, relabel, fdp)
        finished("eval", t)

        if cfg.rounds > 1:
            t = _stage(f"6/{n} bootstrapping rounds 1..{cfg.rounds - 1} (back-translation, IDP, relabel, FDP)", t_all)
            results["rounds"] = _rounds(cfg, world, {"idp": idp, "relabel": relabel, "filter": filt, "fdp": fdp["boot"]})
            finished("rounds", t)

    t = _stage(f"{n}/{n} report", t_all)
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
