"""`dynboot bootstrap rounds=K`: iterated bootstrapping rounds on the embedded world.

    dynboot bootstrap rounds=3 --out runs/bootstrap
    dynboot bootstrap jobs/configs/bootstrap.yaml
    python -m jobs.bootstrap out=runs/bootstrap rounds=3 idp_steps=600 fdp_steps=300      # a shorter run

Round 0 is the quickstart's loop: IDP on gold -> relabel the unlabelled videos -> filter -> FDP on gold + pseudo.
Round k+1 (k = 0, 1, ...) first back-translates with round k's models (dynboot.eval.back_translation): the round-k FDP
generates an after-frame for an action prompted on each of `back_translation.frames` unlabelled before-frames, the
round-k IDP scores the prompt given (before, generated after), and the pairs whose score reaches a threshold
calibrated on the validation split are kept. Then round k+1's IDP trains (from scratch, `idp_steps`, as round 0's)
on gold + round k's filtered pseudo pairs + those back-translated pairs, relabels the videos, filters, and trains
the FDP (from scratch) on gold + its own pseudo pairs.

Held-out pairs: the world's test split, the first `val` of them the validation split (the stop rule and the
back-translation threshold read it), the rest the test pairs every reported number is measured on.
Per round (round_K/eval/summary.json, one metrics.jsonl row, the table in summary.json and report.md): IDP exact
overall and by action type, pseudo-label accuracy before / after the filter, back-translated pairs before / after
the IDP's threshold, FDP greedy exact (test and validation), best-of-N for `ns` (IDP verifier).
Stop rule: a round whose FDP does not beat the best earlier round's on the validation split by more than
`min_improvement` ends the loop (that round is still reported; `best_round` names the FDP to use).

Layout: <out>/world/ (unless `world=` names one), <out>/round_K/{idp,relabel,filter,fdp,eval,backtranslate}/.
Resumable: a stage with a summary.json is not redone, so a rerun skips finished rounds; a rerun may raise `rounds`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from dynboot.eval.back_translation import BackTranslation
from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.io.rundir import ResumeMode, RunDir, write_json
from dynboot.models.base import TinySize
from jobs.train_config import gold_plus

__all__ = ["BootstrapConfig", "run", "run_rounds", "relabel_and_filter", "round_dirs", "should_stop", "round_row"]

STAGES = ("idp", "relabel", "filter", "fdp", "eval", "backtranslate")


class BootstrapConfig(Config):
    """Iterated bootstrapping rounds on the embedded world. Defaults: a run of ~30 min per round on 2 cores."""

    rerun_may_change: ClassVar[frozenset[str]] = frozenset({"rounds", "num_cpus"})

    out: str = Field("runs/bootstrap", description="Run directory; each round writes round_K/.")
    rounds: int = Field(3, ge=1, description="Rounds at most (round 0 = the quickstart's loop); the stop rule may end sooner.")
    world: str = Field("", description="An existing `dynboot world` directory to use ('' = generate one in out/world).")
    gold: int = Field(1000, ge=10, description="Gold (labelled) pairs of a generated world.")
    videos: int = Field(400, ge=1, description="Unlabelled videos of a generated world (8 key-frame pairs each).")
    test: int = Field(400, ge=20, description="Held-out pairs of a generated world (validation + test).")
    val: int = Field(100, ge=10, description="The first `val` held-out pairs are the validation split (stop rule, "
                     "back-translation threshold); the rest are the test pairs.")
    seed: int = Field(0, description="World seed; round k's prompts and samples use seed + k.")
    size: TinySize = Field("xs", description="Tiny model size (xxs, xs, s, m).")
    idp_steps: int = Field(900, ge=1, description="IDP optimiser steps, every round (each round trains from scratch).")
    fdp_steps: int = Field(450, ge=1, description="FDP optimiser steps, every round.")
    batch_size: int = Field(64, ge=1, description="Pairs per step.")
    min_score: float = Field(-0.05, description="Relabel filter: keep pseudo pairs whose IDP mean per-token log-prob "
                             "is at least this (the quickstart's threshold).")
    weighting: Literal["relative", "floor", "none"] = Field("none", description="FDP loss (dynboot/method/weights.py); plain "
                                                            "CE as the quickstart's method.")
    back_translation: BackTranslation = Field(default_factory=BackTranslation,
                                              description="Generated + verified pairs for the next round's IDP.")
    balance_classes: bool = Field(True, description="Every IDP and FDP mixture of gold + pseudo / back-translated "
                                  "pairs keeps each action class at its gold share (dynboot.data.mixture."
                                  "class_balanced): the classes the IDP is weak on get few pseudo pairs and would "
                                  "otherwise be diluted round after round.")
    ns: list[int] = Field([1, 2, 4, 8], description="Best-of-N values evaluated per round (IDP verifier).")
    min_improvement: float = Field(0.0, ge=0, description="Stop rule: a round must beat the best earlier FDP's "
                                   "validation exact match by more than this to continue the loop.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage of the train jobs.")
    num_cpus: int = Field(4, ge=1, description="Logical CPUs of the local Ray cluster (when the job starts one).")
    resume: ResumeMode = Field("auto", description="auto: continue the run in `out` if its config matches (rounds may "
                               "change); force: despite differences; off: set the old run aside and start over.")


def round_dirs(root: Path, k: int, first_round: dict[str, Path] | None = None) -> dict[str, Path]:
    """Stage folders of round k; `first_round` names round 0's idp / relabel / filter / fdp when a caller (the
    quickstart) already trained them."""
    dirs = {s: root / f"round_{k}" / s for s in STAGES}
    return dirs | (first_round or {}) if k == 0 else dirs


def _done(stage: Path) -> bool:
    return (stage / "summary.json").is_file()


def should_stop(val_exact: list[float], min_improvement: float = 0.0) -> bool:
    """The stop rule after the last round in `val_exact` (FDP validation exact match per round): it did not beat
    the best earlier round by more than `min_improvement`. Round 0 has nothing to beat."""
    return len(val_exact) > 1 and not val_exact[-1] > max(val_exact[:-1]) + min_improvement


def _train(cfg: BootstrapConfig, world: Path, out: Path, task: str, data: list[dict], steps: int) -> None:
    from jobs.train import run as train
    from jobs.train_config import world_train_config

    if _done(out):
        return
    # train-time evaluation (logged only, it selects nothing) reads validation pairs, the first of test.json, and
    # computes held-out loss only: greedy generation there cost more than the training on 2 cores (the quickstart's
    # train_exact=false); each round's eval stage measures exact match
    train(world_train_config(task, data, str(out), steps, str(world / "test"), batch_size=cfg.batch_size, size=cfg.size,
                             weighting=cfg.weighting, zero_stage=cfg.zero_stage, eval_limit=min(cfg.val, 64),
                             eval_generate=False))


def _kept(stage: Path) -> int:
    """Pairs a filter / back-translation stage kept (0 for a stage that did not run)."""
    return int(json.loads((stage / "summary.json").read_text()).get("pairs_kept", 0)) if _done(stage) else 0


def relabel_and_filter(world: Path, idp: Path, relabel: Path, filt: Path, min_score: float) -> None:
    """Stage 3 of the loop on the embedded world (the quickstart's and every round's): the IDP in `idp` labels the
    world's videos into `relabel`, the score threshold keeps what reaches `min_score` in `filt`; a stage with a
    summary.json is not redone."""
    from jobs.filter import FilterConfig, run as filter_run
    from jobs.relabel import RelabelConfig, run as relabel_run

    if not _done(relabel):
        relabel_run(RelabelConfig(videos=str(world / "videos"), out=str(relabel), model_path=str(idp / "model"),
                                  backend="", idp_cpus=1.0, batch_size=64, videos_per_batch=16,
                                  keyframes={"strategy": "stills"}))  # the world's key states are its stills
    if not _done(filt):
        filter_run(FilterConfig(shards=str(relabel), out=str(filt), mode="enable", min_score=min_score, top_k=0))


def _splits(world: Path, val: int):
    from dynboot.data.pairs import load_examples

    held_out = load_examples(world / "test" / "test.json")
    if len(held_out) < val + 10:
        raise SystemExit(f"{world}/test holds {len(held_out)} pairs: too few for a validation split of {val} and a "
                         f"test split of at least 10 (lower val= or generate a world with more test=)")
    return held_out[:val], held_out[val:]


def _evaluate(cfg: BootstrapConfig, world: Path, d: dict[str, Path], k: int, val, test) -> dict:
    from dynboot.models.registry import load_model
    from dynboot.data.pseudo_labels import pseudo_label_accuracy
    from dynboot.world.generate import load_spec
    from dynboot.eval.world_eval import best_of_n_eval, fdp_eval, idp_eval

    if _done(d["eval"]):
        return json.loads((d["eval"] / "summary.json").read_text())
    spec = load_spec(world)
    idp, fdp = load_model(d["idp"] / "model"), load_model(d["fdp"] / "model")
    truth = world / "videos_truth.jsonl"
    fdp_test = fdp_eval(fdp, test, spec, per_pair=True)
    bon = best_of_n_eval(fdp, idp, test, spec, cfg.ns, seed=cfg.seed + k)
    record = {
        "round": k,
        "idp": idp_eval(idp, test, spec),
        "pseudo_labels": pseudo_label_accuracy(d["relabel"], truth),
        "pseudo_labels_kept": pseudo_label_accuracy(d["filter"], truth),
        "pairs_kept": _kept(d["filter"]),
        "fdp_test": fdp_test,
        "fdp_val": fdp_eval(fdp, val, spec),
        "best_of_n": bon["by_n"], "oracle_all": bon["oracle_all"],
        "test_pairs": len(test), "val_pairs": len(val),
    }
    write_json(d["eval"] / "summary.json", record)
    return record


def _back_translate(cfg: BootstrapConfig, world: Path, d: dict[str, Path], k: int, val) -> dict:
    """Round k's models generate + verify pairs for round k+1's IDP (dynboot.eval.back_translation)."""
    from dynboot.eval.back_translation import calibrate_threshold, generate, prompt_actions, world_correct
    from dynboot.io.images import decode_image
    from dynboot.models.registry import load_model
    from dynboot.data.pairs import make_row, read_pairs, to_table
    from dynboot.io.partitions import commit_partition, mark_dataset, partition_id
    from dynboot.world.generate import load_spec

    out, bt = d["backtranslate"], cfg.back_translation
    if _done(out):
        return json.loads((out / "summary.json").read_text())
    spec = load_spec(world)
    idp, fdp = load_model(d["idp"] / "model"), load_model(d["fdp"] / "model")
    seed = cfg.seed + k
    # the threshold: chosen on the validation split, where the truth of each generated after is known
    cal_gen = generate(fdp, idp, [e.before for e in val], [e.action for e in val], bt, seed=10_000 + seed)
    cal_ok = [g.image is not None for g in cal_gen]
    cal_correct = world_correct(spec, [e.before for e, ok in zip(val, cal_ok) if ok],
                                [e.action for e, ok in zip(val, cal_ok) if ok], [g.image for g in cal_gen if g.image is not None])
    calibration = calibrate_threshold([g.score for g in cal_gen if g.image is not None], cal_correct, bt.precision)
    threshold = calibration["threshold"] if bt.threshold is None else bt.threshold

    # unlabelled before-frames: the before images of the videos' key-frame pairs, a seeded sample
    frames = read_pairs(d["relabel"], columns=["id", "video_id", "frame_a", "before"])
    rng = np.random.default_rng([cfg.seed, 7, k])
    pick = np.sort(rng.choice(frames.num_rows, size=min(bt.frames, frames.num_rows), replace=False))
    cols = {c: frames.column(c).take(pick).to_pylist() for c in ("id", "video_id", "frame_a", "before")}
    befores = [decode_image(b) for b in cols["before"]]
    prompts = prompt_actions(spec, befores, rng)
    todo = [i for i, p in enumerate(prompts) if p is not None]
    gen = dict(zip(todo, generate(fdp, idp, [befores[i] for i in todo], [prompts[i] for i in todo], bt, seed=seed)))
    made = [i for i in todo if gen[i].image is not None]
    truth = dict(zip(made, world_correct(spec, [befores[i] for i in made], [prompts[i] for i in made],
                                         [gen[i].image for i in made])))
    rows, quarantine, ledger = [], [], []
    for i, src in enumerate(cols["id"]):
        vid = f"{cols['video_id'][i]}~bt{k}"  # one prompt per before-frame: (video, frame) names the pair
        g = gen.get(i)
        reason = ("the scene admits no action" if prompts[i] is None else g.error if g.image is None
                  else "" if g.score >= threshold else f"IDP score {g.score:.4f} below threshold {threshold:.4f}")
        entry = {"video_id": vid, "source_pair": src, "prompt": prompts[i], "score": None if g is None else g.score,
                 "kept": not reason, "reason": reason, "correct": bool(truth[i]) if i in truth else None}
        ledger.append(entry)
        if prompts[i] is None or g.image is None:
            quarantine.append({"video_id": vid, "path": src, "stage": "backtranslate", "reason": reason,
                               "error_class": "no_action" if prompts[i] is None else "generation", "error": reason})
        elif not reason:
            rows.append(make_row(vid, cols["frame_a"][i], cols["frame_a"][i], cols["before"][i], gen[i].image,
                                 prompts[i], "pseudo", idp.model_id, g.score, dataset="backtranslate",
                                 provenance={"kind": "back_translation", "round": k, "source_pair": src,
                                             "prompt": prompts[i], "generator": fdp.model_id, "verifier": idp.model_id,
                                             "candidate": g.candidate, "candidates": bt.candidates, "seed": seed,
                                             "threshold": float(threshold)}))
    mark_dataset(str(out))
    videos = [{"video_id": e["video_id"], "status": "ok" if e["kept"] or e["score"] is not None else "quarantined",
               "pairs": int(e["kept"]), "reason": e["reason"], "stage": "backtranslate"} for e in ledger]
    commit_partition(str(out), partition_id([f"bt{k}"] + [e["video_id"] for e in ledger]),
                     to_table(rows) if rows else None, quarantine, videos)
    (out / "prompts.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger))
    summary = {"round": k, "threshold": threshold if np.isfinite(threshold) else None,  # None: nothing kept
               "calibration": calibration | {"threshold": calibration["threshold"] if np.isfinite(calibration["threshold"]) else None},
               "prompted": len(todo),
               "generated": len(made), "pairs_kept": len(rows), "quarantined": len(quarantine),
               "accuracy_before": _accuracy(spec, ledger, kept_only=False),
               "accuracy_after": _accuracy(spec, ledger, kept_only=True)}
    write_json(out / "summary.json", summary)
    return summary


def _accuracy(spec, ledger: list[dict], kept_only: bool) -> dict:
    """World-truth accuracy of generated pairs (all, or the kept ones), overall and per prompted action type."""
    from dynboot.world.actions import parse_action

    rows = [e for e in ledger if e["correct"] is not None and (e["kept"] or not kept_only)]
    by: dict[str, list[bool]] = {}
    for e in rows:
        by.setdefault(parse_action(spec, e["prompt"]).type, []).append(e["correct"])
    rate = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"pairs": len(rows), "accuracy": rate([e["correct"] for e in rows]),
            "by_type": {t: {"pairs": len(v), "accuracy": rate(v)} for t, v in sorted(by.items())}}


def round_row(record: dict) -> dict:
    """One line of the per-round table."""
    idp, bon = record["idp"], record["best_of_n"]
    row = {"round": record["round"], "IDP exact": idp["exact"]}
    row |= {f"IDP {t}": v["exact"] for t, v in idp.get("by_type", {}).items()}
    row |= {"pseudo acc": record["pseudo_labels"]["accuracy"], "kept acc": record["pseudo_labels_kept"]["accuracy"],
            "kept": record["pairs_kept"], "bt in": record.get("bt_pairs", 0),
            "FDP exact": record["fdp_test"]["exact"], "FDP val": record["fdp_val"]["exact"]}
    return row | {f"bo{n}": bon[str(n)]["exact"] for n in sorted(int(n) for n in bon)}


def run_rounds(cfg: BootstrapConfig, world: Path, first_round: dict[str, Path] | None = None) -> dict:
    """The rounds under cfg.out with the world in `world` (Ray must be initialised; the quickstart can call this
    with its own round-0 folders as `first_round`). Returns the summary (per-round records, table, stop)."""
    from dynboot.eval.report import md_table, score_vs_n_plot, write_report

    root, log = Path(cfg.out), RunDir(cfg.out)
    val, test = _splits(world, cfg.val)
    gold = {"path": str(world / "gold"), "weight": float(len(json.loads((world / "gold" / "train.json").read_text())))}
    records, stop = [], ""
    earlier = json.loads((root / "summary.json").read_text()).get("seconds", {}) if (root / "summary.json").is_file() else {}
    times: dict[str, float] = {}
    for k in range(cfg.rounds):
        d, t0 = round_dirs(root, k, first_round), time.time()
        print(f"\n=== round {k}", flush=True)
        idp_extra = []
        if k:
            prev = round_dirs(root, k - 1, first_round)
            idp_extra = [{"path": str(prev["filter"] / "shards"), "weight": float(_kept(prev["filter"]))},
                         {"path": str(prev["backtranslate"]), "weight": float(_kept(prev["backtranslate"]))}]
        if not _done(d["idp"]):
            _train(cfg, world, d["idp"], "idp", gold_plus(gold, idp_extra, cfg.balance_classes), cfg.idp_steps)
        relabel_and_filter(world, d["idp"], d["relabel"], d["filter"], cfg.min_score)
        if not _done(d["fdp"]):
            pseudo = {"path": str(d["filter"] / "shards"), "weight": float(_kept(d["filter"]))}
            _train(cfg, world, d["fdp"], "fdp", gold_plus(gold, [pseudo], cfg.balance_classes), cfg.fdp_steps)
        fresh = not _done(d["eval"])
        record = _evaluate(cfg, world, d, k, val, test)
        record["bt_pairs"] = _kept(round_dirs(root, k - 1, first_round)["backtranslate"]) if k else 0
        records.append(record)
        if should_stop([r["fdp_val"]["exact"] for r in records], cfg.min_improvement):
            stop = (f"round {k}'s FDP validation exact {record['fdp_val']['exact']:.3f} does not beat the best earlier "
                    f"round's {max(r['fdp_val']['exact'] for r in records[:-1]):.3f} by more than {cfg.min_improvement}")
        if not stop and k + 1 < cfg.rounds and cfg.back_translation.frames:
            _back_translate(cfg, world, d, k, val)
        # a round this run only read back keeps the seconds of the run that did it
        times[f"round_{k}"] = round(time.time() - t0, 1) if fresh else earlier.get(f"round_{k}", 0.0)
        if fresh:  # one metrics row per round, written once (a rerun skips finished rounds)
            log.log(**round_row(record), seconds=times[f"round_{k}"])
        print(md_table([round_row(record)]), flush=True)
        if stop:
            print(f"stop: {stop}", flush=True)
            break
    best = int(np.argmax([r["fdp_val"]["exact"] for r in records]))
    table = md_table([round_row(r) for r in records])
    summary = {"rounds_run": len(records), "best_round": best, "stopped": stop or None, "table": [round_row(r) for r in records],
               "records": records, "seconds": times}
    curves = {"IDP exact": "idp", "FDP exact": "fdp_test", "FDP val (stop rule)": "fdp_val"}
    score_vs_n_plot(root / "rounds.png", {name: {r["round"]: r[key]["exact"] for r in records} for name, key in curves.items()}
                    | {f"best-of-{max(cfg.ns)}": {r["round"]: r["best_of_n"][str(max(cfg.ns))]["exact"] for r in records}},
                    "exact match", xlabel="round", log2_x=False)
    write_report(root / "report.md", "dynboot bootstrap: iterated rounds", [
        ("Per round (test split; FDP val = the validation split the stop rule reads)", table + "\n\n![rounds](rounds.png)"),
        ("Stop", stop or f"ran all {cfg.rounds} rounds"), ("Best round", f"round {best} (its FDP: {round_dirs(root, best, first_round)['fdp'] / 'model'})")])
    return summary


def run(cfg: BootstrapConfig, first_round: dict[str, Path] | None = None) -> dict:
    """The job: `cfg.out`'s run directory around `run_rounds` (a world generated unless `cfg.world` names one; a
    local Ray cluster unless one is running). The quickstart's `rounds=` calls this with its own round-0 folders."""
    import ray

    from dynboot.world.generate import WorldConfig, generate_world

    t0 = time.time()
    with RunDir(cfg.out).open(cfg, resume=cfg.resume, set_aside=tuple(f"round_{k}" for k in range(cfg.rounds))) as rd:
        world = Path(cfg.world) if cfg.world else rd.path("world")
        if not cfg.world and not _done(world):
            generate_world(WorldConfig(out=str(world), gold=cfg.gold, videos=cfg.videos, test=cfg.test, seed=cfg.seed))
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False)
        try:
            summary = run_rounds(cfg, world, first_round)
        finally:
            if started:
                ray.shutdown()
        summary["seconds"]["total_this_run"] = round(time.time() - t0, 1)
        rd.write_summary(summary)
    print(f"\nbest round: {summary['best_round']}; stop: {summary['stopped'] or 'all rounds ran'}; "
          f"report: {Path(cfg.out) / 'report.md'}", flush=True)
    return summary


if __name__ == "__main__":
    raise SystemExit(job_main(BootstrapConfig, run, doc=__doc__))
