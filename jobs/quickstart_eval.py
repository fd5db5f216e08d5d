"""Stage 5 and 6 of the quickstart: evaluation through the serve app, and the report of the four effects.

Best-of-N goes through the real HTTP service: one `/v1/images/edits` request per test pair with
best_of = max(N) candidates and return_candidates=true; the N curve then uses disjoint groups of those candidates
(`dynboot.eval.metrics.best_of_n_world`). Candidates are scored exactly by parsing their PNGs with the world's
parser, so nothing here depends on the model family.
"""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from dynboot.io.images import decode_image, encode_png
from dynboot.eval.metrics import best_of_n_world
from dynboot.models.registry import load_model
from dynboot.data.pairs import load_examples
from dynboot.data.pseudo_labels import pseudo_label_accuracy
from dynboot.eval.report import candidates_grid, md_table, score_vs_n_plot, write_report
from dynboot.io.rundir import write_json
from dynboot.eval.stats import verdict
from dynboot.world.actions import parse_action
from dynboot.world.generate import load_spec
from dynboot.world.render import parse
from dynboot.eval.world_eval import fdp_eval, idp_eval

__all__ = ["evaluate_stage", "rollout_stage", "served_best_of_n", "write_quickstart_report"]


def _request(client: httpx.Client, url: str, ex, best_of: int, seed: int, temperature: float) -> dict:
    for attempt in range(5):
        r = client.post(f"{url}/v1/images/edits", files={"image": ("before.png", encode_png(ex.before), "image/png")},
                        data={"prompt": ex.action, "best_of": str(best_of), "response_format": "b64_json", "seed": str(seed),
                              "temperature": str(temperature), "return_candidates": "true"})
        if r.status_code == 429:  # the queue is full: back off and retry
            time.sleep(0.5 * (attempt + 1))
            continue
        r.raise_for_status()
        return r.json()
    r.raise_for_status()
    return r.json()


def served_best_of_n(cfg, world: Path, idp: Path, fdp: Path, test, spec) -> tuple[dict, list[dict]]:
    """Best-of-N metrics for cfg.ns through `dynboot serve`, and rows for the candidates grid."""
    from serve.run_local import ServeConfig, start, stop

    m = max(cfg.ns)
    scfg = ServeConfig(generator_path=str(fdp / "model"), verifier_path=str(idp / "model"), port=cfg.port, max_best_of=m,
                       default_best_of=min(m, 4), generator_batch={"max_rows": max(16, m)}, verifier_batch={"max_rows": max(32, m)})
    url = start(scfg)
    try:
        with httpx.Client(timeout=300) as client:
            for _ in range(120):  # wait for both tiers
                try:
                    if client.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            with ThreadPoolExecutor(cfg.clients) as pool:
                replies = list(pool.map(lambda ie: _request(client, url, ie[1], m, ie[0], cfg.temperature), enumerate(test)))
    finally:
        stop(scfg)
    cand_imgs = [[decode_image(base64.b64decode(c["b64_json"])) for c in r["candidates"]] for r in replies]
    scores = np.array([[c["score"] for c in r["candidates"]] for r in replies])
    cands = np.stack([parse(spec, np.stack(imgs)) for imgs in cand_imgs])
    before = parse(spec, np.stack([e.before for e in test]))
    target = parse(spec, np.stack([e.after for e in test]))
    types = [parse_action(spec, e.action).type for e in test]
    metrics = best_of_n_world(cands, scores, before, target, types, cfg.ns) | {"served_at": url}
    grid = [{"before": e.before, "target": e.after, "candidates": cand_imgs[i], "chosen": int(np.argmax(scores[i])),
             "labels": [f"{s:.2f}" for s in scores[i]], "good": list((cands[i] == target[i]).all(-1)), "title": e.action}
            for i, e in enumerate(test[:6])]
    return metrics, grid


def rollout_stage(cfg, world: Path, idp: Path, fdp: Path) -> dict:
    """`dynboot rollout` of the gold + pseudo FDP in <out>/rollout: N=1 and the largest N, the IDP verifier."""
    from jobs.rollout import RolloutConfig, run as rollout

    summary = rollout(RolloutConfig(world=str(world), fdp_path=str(fdp / "model"), idp_path=str(idp / "model"),
                                    episodes=cfg.rollout_episodes, steps=cfg.rollout_steps, n=sorted({1, max(cfg.ns)}),
                                    temperature=cfg.temperature, seed=cfg.seed, strips=2, out=str(Path(cfg.out) / "rollout")))
    return {k: summary[k] for k in ("episodes", "steps", "n", "table", "strips")}


def evaluate_stage(cfg, world: Path, idp: Path, relabel: Path, fdp: dict[str, Path]) -> dict:
    out = Path(cfg.out) / "eval"
    spec = load_spec(world)
    test = load_examples(world / "test" / "test.json")
    results: dict = {"test_pairs": len(test)}
    idp_model = load_model(idp / "model")
    results["idp"] = idp_eval(idp_model, test, spec)
    for name, path in fdp.items():
        if (path / "model").is_dir():
            results[f"fdp_{name}"] = fdp_eval(load_model(path / "model"), test, spec, per_pair=True)
    results["pseudo_labels"] = pseudo_label_accuracy(relabel / "shards", world / "videos_truth.jsonl")
    kept = Path(cfg.out) / "filter" / "shards"
    if kept.is_dir():  # what the FDP actually trained on
        results["pseudo_labels_kept"] = pseudo_label_accuracy(kept, world / "videos_truth.jsonl")
    results["best_of_n"], grid = served_best_of_n(cfg, world, idp, fdp["boot"], test, spec)
    if cfg.rollout_episodes:
        results["rollout"] = rollout_stage(cfg, world, idp, fdp["boot"])
    out.mkdir(parents=True, exist_ok=True)
    candidates_grid(out / "best_of_n_grid.png", grid)
    write_json(out / "metrics.json", results)
    return results


def _pairs(results: dict, a: str, b: str) -> tuple[list, list] | None:
    ra, rb = results.get(f"fdp_{a}", {}), results.get(f"fdp_{b}", {})
    return (ra["exact_per_pair"], rb["exact_per_pair"]) if "exact_per_pair" in ra and "exact_per_pair" in rb else None


def _pseudo_section(written: dict, kept: dict | None) -> str:
    def per_type(acc: dict) -> str:
        return ", ".join("%s %d pairs, %s" % (k, v["matched"], v["accuracy"]) for k, v in acc["per_type"].items())

    lines = [f"- written by the IDP: {written['pairs']} pairs, accuracy {written['accuracy']} against "
             f"videos_truth.jsonl (per type: {per_type(written)})"]
    if kept:
        lines.append(f"- kept by the filter (what the FDP trained on): {kept['pairs']} pairs, accuracy "
                     f"{kept['accuracy']} (per type: {per_type(kept)})")
    return "\n".join(lines)


def _rollout_sections(results: dict) -> list[tuple[str, str]]:
    r = results.get("rollout")
    if not r:
        return []
    pictures = "\n".join(f"![rollout](rollout/{s})" for s in r["strips"])
    return [(f"Rollouts: the gold + pseudo FDP rolled forward {r['steps']} actions", md_table(r["table"]) +
             f"\n\n{r['episodes']} held-out episodes (`rollout/report.md`); strips: truth, then each N, green = exact."
             f"\n\n{pictures}")]


def _rounds_sections(results: dict) -> list[tuple[str, str]]:
    r = results.get("rounds")
    if not r:
        return []
    stop = f"stopped: {r['stopped']}" if r["stopped"] else f"all {r['rounds_run']} rounds ran"
    return [("Bootstrapping rounds (validation / test split of the held-out pairs)",
             md_table(r["table"]) + f"\n\nbest round {r['best_round']}; {stop} (`rounds/report.md`)"
             "\n\n![rounds](rounds/rounds.png)")]


def write_quickstart_report(root: Path, cfg, results: dict, seconds: dict) -> tuple[Path, str]:
    n = results["test_pairs"]
    fdp = lambda k, f="exact": results.get(f"fdp_{k}", {}).get(f, float("nan"))  # noqa: E731
    bon = {int(k): v for k, v in results["best_of_n"]["by_n"].items()}
    ns = sorted(bon)
    # the weighting row: the ablation run's loss against the method's, on the same gold + pseudo data
    w, p = "ablation", "boot"
    method = "plain CE" if cfg.weighting == "none" else cfg.weighting
    rows = [
        {"effect": "1 asymmetry: IDP ≫ FDP from the same gold data", "measured": f"IDP exact {results['idp']['exact']:.3f} vs FDP(gold) exact {fdp('gold'):.3f}",
         "shows": verdict(results["idp"]["exact"], fdp("gold"), n)},
        {"effect": "2 bootstrapping: gold + pseudo beats gold only", "measured": f"FDP exact {fdp('boot'):.3f} vs {fdp('gold'):.3f} (changed cells {fdp('boot', 'changed_cell_acc'):.3f} vs {fdp('gold', 'changed_cell_acc'):.3f})",
         "shows": verdict(fdp("boot"), fdp("gold"), n, _pairs(results, "boot", "gold"))},
        {"effect": f"3 weighting: recognition-weighted ({cfg.ablation_weighting}) beats {method}, on gold + pseudo", "measured": f"FDP exact {fdp(w):.3f} vs {fdp(p):.3f} (changed cells {fdp(w, 'changed_cell_acc'):.3f} vs {fdp(p, 'changed_cell_acc'):.3f})",
         "shows": verdict(fdp(w), fdp(p), n, _pairs(results, w, p)) if "fdp_ablation" in results else "not run (ablation=false)"},
        {"effect": "4 verification: best-of-N rises with N", "measured": ", ".join(f"N={k}: {bon[k]['exact']:.3f}" for k in ns) + f" (oracle@{ns[-1]} {bon[ns[-1]]['oracle']:.3f})",
         "shows": verdict(bon[ns[-1]]["exact"], bon[ns[0]]["exact"], n)},
    ]
    table = md_table(rows, ["effect", "measured", "shows"])
    pl = results["pseudo_labels"]
    score_vs_n_plot(root / "eval" / "best_of_n.png", {"exact": {k: bon[k]["exact"] for k in ns},
                                                      "oracle": {k: bon[k]["oracle"] for k in ns}}, "exact match")
    sections = [
        ("The four effects (test split, exact match on parsed scenes)", table + f"\n\n{n} test pairs; 'shows' = a gap larger than two standard errors (rows 2 and 3: paired, the two FDPs "
                 "scored on the same pairs; rows 1 and 4: binomial)."),
        ("Pseudo-labels", _pseudo_section(pl, results.get("pseudo_labels_kept"))),
        ("Best-of-N through the serve app", "![best-of-N](eval/best_of_n.png)\n\n![candidates](eval/best_of_n_grid.png)"),
    ] + _rollout_sections(results) + _rounds_sections(results) + [
        ("Time per stage (s)", md_table([seconds])),
        ("Command", f"`dynboot quickstart --out {cfg.out}` with config in `config.yaml`"),
    ]
    return write_report(root / "report.md", "dynboot quickstart", sections), table
