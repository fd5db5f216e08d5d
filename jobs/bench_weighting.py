"""Recognition weightings on the embedded world, with the quickstart's settings (plain loop, no Ray).

    python -m jobs.bench_weighting run=runs/quickstart out=runs/bench/weighting seeds=[0,1] \
        variants=[none,relative,predicted_change,entropy,relative_annealed]

Needs a finished quickstart run directory (`run=`: its world/ and filter/shards, the gold + pseudo data the
quickstart's FDPs train on). Each variant trains the quickstart's FDP (tiny `size`, `steps` steps, batch
`batch_size`, the same gold + pseudo mixture and gold-only augmentation) from scratch for every seed (the
seed sets the initialisation and the batches), scores greedy predictions on the test split, and is compared
with plain CE of the same seed by the quickstart's paired test (dynboot.eval.stats). `gold_variants` also train on
gold only, for the bootstrapping row (gold + pseudo vs gold, same weighting). A variant is a strategy name with
optional LoopConfig overrides: `predicted_change:weight_alpha=8`, `relative_annealed:weight_anneal=0.3`.

Every finished run is cached under out/ (a rerun only trains what is missing). Prints the table and saves
JSON to bench/results/bench_weighting.json (`result=`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml
from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.data.data_index import build_index
from dynboot.data.ingest import RankStream
from dynboot.data.mixture import Source, gold_only
from dynboot.models.tiny import TinyWorldModel
from dynboot.data.pairs import load_examples
from dynboot.eval.report import md_table
from dynboot.io.rundir import write_json
from dynboot.eval.stats import paired_comparison, verdict
from dynboot.training.trainer import LoopConfig, TrainLoop
from dynboot.world.augment import world_augmenter
from dynboot.world.generate import load_spec
from dynboot.eval.world_eval import fdp_eval
from dynboot.models.base import TinySize
from jobs.train_config import gold_plus

BASELINE = "none"


class BenchWeightingConfig(Config):
    """Recognition weightings vs plain CE on the quickstart's gold + pseudo data."""

    run: str = Field("runs/quickstart", description="A finished quickstart run directory (world/, filter/shards, config.yaml).")
    out: str = Field("runs/bench/weighting", description="Cache of the trained runs' metrics (one JSON per run).")
    result: str = Field("bench/results/bench_weighting.json", description="Where the summary JSON goes.")
    variants: list[str] = Field(["none", "relative", "predicted_change", "entropy", "relative_annealed"],
                                description="Weightings to train: `strategy[:field=value,...]` (LoopConfig fields).")
    gold_variants: list[str] = Field(["none"], description="Variants also trained on gold only (the bootstrapping row).")
    unbalanced_variants: list[str] = Field([], description="Variants also trained on the plain gold + pseudo mixture "
                                           "(not class-balanced: dynboot.data.mixture.class_balanced), compared with "
                                           "the same variant on the run's own mixture.")
    seeds: list[int] = Field([0, 1], description="Seeds (initialisation + batch sampling) of every variant.")
    steps: int = Field(450, ge=1, description="Optimiser steps (the quickstart's fdp_steps).")
    batch_size: int = Field(64, ge=1, description="Pairs per step (the quickstart's batch_size).")
    size: TinySize = Field("xs", description="Tiny model size (the quickstart's size).")
    threads: int = Field(2, ge=1, description="torch threads.")
    save_models: bool = Field(True, description="Keep each trained FDP under out/models/ (for bench_verifier, analysis).")


def parse_variant(variant: str) -> dict:
    """`predicted_change:weight_alpha=8,weight_anneal=0.3` -> LoopConfig overrides (validated by LoopConfig)."""
    name, _, rest = variant.partition(":")
    over: dict = {"weighting": name}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {variant!r}: expected field=value after ':', got {item!r}")
        over[key] = json.loads(value) if value[:1].isdigit() or value[:1] in "-[{" else value
    return over


def _sources(run: Path) -> dict[str, list[Source]]:
    """The quickstart run's gold-only and gold + pseudo mixtures, as its FDP runs trained on them ("gold", "boot"),
    and gold + pseudo not class-balanced ("boot_unbalanced")."""
    qs = yaml.safe_load((run / "config.yaml").read_text())
    kept = json.loads((run / "filter" / "summary.json").read_text())["pairs_kept"]
    gold = {"path": str(run / "world" / "gold"), "weight": float(qs.get("gold", 1000))}
    pseudo = {"path": str(run / "filter" / "shards"), "weight": float(qs.get("pseudo_ratio", 1.0)) * kept}
    boot = gold_plus(gold, [pseudo], bool(qs.get("balance_classes", False)))  # runs before balancing: plain
    as_sources = lambda srcs: [Source.model_validate(s) for s in srcs]  # noqa: E731
    return {"gold": as_sources([gold]), "boot": as_sources(boot), "boot_unbalanced": as_sources([gold, pseudo])}


def run_name(data: str, variant: str, seed: int) -> str:
    return f"{data}__{variant.replace(':', '_').replace(',', '_').replace('=', '')}__s{seed}"


def train_and_score(cfg: BenchWeightingConfig, spec, sources: list[Source], test, variant: str, seed: int,
                    save_to: Path | None = None) -> dict:
    loop_cfg = LoopConfig.model_validate({"task": "fdp", "steps": cfg.steps, "batch_size": cfg.batch_size, "seed": seed,
                                          "threads": cfg.threads, "eval_every": 0, **parse_variant(variant)})
    model = TinyWorldModel.create(spec, cfg.size, seed=seed)
    # the train job's data path in this process: the same plan, decoding and gold-only augmentation
    stream = RankStream(build_index(sources), 0, 1, model.tokenizer.policy, seed, 256)
    t0, c0 = time.perf_counter(), time.process_time()
    curve = []

    def progress(rec: dict) -> None:
        if rec["step"] % 50 == 0:
            curve.append({"step": rec["step"], "loss": round(rec["loss"], 4)})
            print(f"    {variant} seed {seed} step {rec['step']}/{cfg.steps} loss {rec['loss']:.4f} "
                  f"({rec['train_s']:.0f} s)", flush=True)

    hist = TrainLoop(model, loop_cfg, augment=gold_only(world_augmenter(spec)), batches=stream).run(log=progress)
    stream.close()
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    res = fdp_eval(model, test, spec, per_pair=True)
    if save_to is not None:
        model.save(save_to)
    return {"variant": variant, "seed": seed, "train_s": round(train_s, 1), "cpu_s": round(cpu_s, 1),
            "final_loss": round(hist[-1]["loss"], 4), "loss_curve": curve, **res}


def _cached(cfg, spec, sources, test, data: str, variant: str, seed: int) -> dict:
    name = run_name(data, variant, seed)
    path = Path(cfg.out) / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    print(f"train {data} {variant} seed {seed}", flush=True)
    res = train_and_score(cfg, spec, sources, test, variant, seed, Path(cfg.out) / "models" / name if cfg.save_models else None)
    write_json(path, res)
    print(f"  exact {res['exact']:.3f} changed {res['changed_cell_acc']:.3f} ({res['train_s']} s)", flush=True)
    return res


def compare(res: dict, base: dict) -> dict:
    p = paired_comparison(res["exact_per_pair"], base["exact_per_pair"])
    return {"exact": round(res["exact"], 4), "changed_cell_acc": round(res["changed_cell_acc"], 4),
            "copy_rate": round(res["copy_rate"], 4), "gap": round(p["gap"], 4), "paired_se": round(p["se"], 4),
            "only_this": p["only_a"], "only_other": p["only_b"],
            "verdict": verdict(res["exact"], base["exact"], p["n"], (res["exact_per_pair"], base["exact_per_pair"]))}


def run(cfg: BenchWeightingConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    root = Path(cfg.run)
    spec = load_spec(root / "world")
    test = load_examples(root / "world" / "test" / "test.json")
    sources = _sources(root)
    variants = list(dict.fromkeys([*cfg.variants, BASELINE]))  # baseline last: a parallel process may have it cached
    rows, runs = [], {}
    for seed in cfg.seeds:
        boot = {v: _cached(cfg, spec, sources["boot"], test, "boot", v, seed) for v in variants}
        gold = {v: _cached(cfg, spec, sources["gold"], test, "gold", v, seed) for v in dict.fromkeys(cfg.gold_variants)}
        plain = {v: _cached(cfg, spec, sources["boot_unbalanced"], test, "boot_unbalanced", v, seed)
                 for v in dict.fromkeys(cfg.unbalanced_variants)}
        for v in [BASELINE] + [v for v in variants if v != BASELINE]:
            row = {"seed": seed, "variant": v, **compare(boot[v], boot[BASELINE])}
            if v in gold:
                b = compare(boot[v], gold[v])
                row |= {"gold_only_exact": round(gold[v]["exact"], 4), "boot_vs_gold": f"{b['gap']:+.3f} ({b['verdict']})"}
            if v in plain:
                u = compare(boot[v], plain[v])
                row |= {"unbalanced_exact": round(plain[v]["exact"], 4),
                        "balanced_vs_unbalanced": f"{u['gap']:+.3f} ({u['verdict']})"}
                if v in gold:
                    g = compare(plain[v], gold[v])
                    row["unbalanced_vs_gold"] = f"{g['gap']:+.3f} ({g['verdict']})"
            rows.append(row)
        runs[str(seed)] = {"boot": {v: {k: r[k] for k in ("exact", "changed_cell_acc", "copy_rate", "by_type", "train_s")}
                                    for v, r in boot.items()},
                           "gold": {v: {k: r[k] for k in ("exact", "changed_cell_acc", "copy_rate", "by_type", "train_s")}
                                    for v, r in gold.items()},
                           "boot_unbalanced": {v: {k: r[k] for k in ("exact", "changed_cell_acc", "copy_rate", "by_type",
                                                                      "train_s")} for v, r in plain.items()}}
    cols = ["seed", "variant", "exact", "changed_cell_acc", "copy_rate", "gap", "paired_se", "only_this", "only_other",
            "verdict", "gold_only_exact", "boot_vs_gold", "unbalanced_exact", "balanced_vs_unbalanced", "unbalanced_vs_gold"]
    table = md_table(rows, [c for c in cols if any(c in r for r in rows)])
    print(table, flush=True)
    result = {"config": cfg.model_dump(), "test_pairs": len(test), "baseline": BASELINE, "rows": rows, "runs": runs}
    write_json(cfg.result, result)
    print(f"saved {cfg.result}")
    return result


if __name__ == "__main__":
    raise SystemExit(job_main(BenchWeightingConfig, run, doc=__doc__))
