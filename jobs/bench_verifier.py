"""Verifier scores for best-of-N on the embedded world, on the same candidates (plain models, no Ray).

    python -m jobs.bench_verifier run=runs/quickstart out=runs/bench/verifier

Needs a finished quickstart run directory (`run=`: idp/model, fdp_boot/model, world/). The FDP samples
`m` candidates per pair at `temperature` once; every verifier score (dynboot.verify) ranks the same
candidates, and best-of-N for N = 1..m uses the disjoint groups of `dynboot.metrics.best_of_n_world`.
The weight of the FDP part of `idp+fdp` is chosen on a validation split (a world of seed `val_seed`, same
spec, never trained on) by best-of-m exact match, then reported on the test split with every weight tried.

Per score and N: exact match, the oracle (a group holds an exact candidate), the gap to it, and the
over-edit rate of the chosen candidates (a cell changed that the target leaves as it was). Prints the
tables; saves JSON to bench/results/bench_verifier.json (`result=`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.metrics import best_of_n_world, group_choices
from dynboot.models.registry import load_model
from dynboot.pairs import load_examples
from dynboot.report import md_table
from dynboot.rundir import write_json
from dynboot.verify import combine, fdp_score, idp_score
from dynboot.world.actions import parse_action
from dynboot.world.generate import WorldConfig, generate_world, load_spec
from dynboot.world.render import parse


class BenchVerifierConfig(Config):
    """IDP-only vs over-editing-aware verifier scores, best-of-N on the same candidates."""

    run: str = Field("runs/quickstart", description="A finished quickstart run directory.")
    fdp: str = Field("fdp_boot", description="Which of the run's FDPs generates the candidates.")
    out: str = Field("runs/bench/verifier", description="Working directory (validation world, cached candidates).")
    result: str = Field("bench/results/bench_verifier.json", description="Where the summary JSON goes.")
    m: int = Field(8, ge=1, description="Candidates sampled per pair (the largest N).")
    temperature: float = Field(1.0, ge=0, description="FDP sampling temperature.")
    seed: int = Field(0, description="Sampling seed.")
    val_seed: int = Field(1, description="World seed of the validation split the FDP weight is chosen on.")
    val_pairs: int = Field(300, ge=1, description="Validation pairs.")
    fdp_weights: list[float] = Field([0.25, 0.5, 1.0, 2.0, 4.0, 8.0], description="Weights of the FDP part of idp+fdp tried.")
    batch_size: int = Field(64, ge=1, description="Pairs per sampling / scoring call.")
    threads: int = Field(2, ge=1, description="torch threads.")


def candidates_and_parts(cfg: BenchVerifierConfig, fdp, idp, examples) -> dict[str, np.ndarray]:
    """Sample m candidates per pair once and compute both verifier parts ([B, m] each) on them."""
    cands, parts = [], {"idp": [], "fdp": []}
    t = {"sample_s": 0.0, "idp_s": 0.0, "fdp_s": 0.0}
    for i in range(0, len(examples), cfg.batch_size):
        chunk = examples[i: i + cfg.batch_size]
        before, actions = np.stack([e.before for e in chunk]), [e.action for e in chunk]
        t0 = time.perf_counter()
        c = fdp.sample(before, actions, n=cfg.m, temperature=cfg.temperature, seed=cfg.seed + i)
        t1 = time.perf_counter()
        parts["idp"].append(idp_score(idp, before, c, actions))
        t2 = time.perf_counter()
        parts["fdp"].append(fdp_score(fdp, before, c, actions))
        t["sample_s"] += t1 - t0
        t["idp_s"] += t2 - t1
        t["fdp_s"] += time.perf_counter() - t2
        cands.append(c)
    codes = torch.cat(cands)
    scenes = parse(fdp.spec, fdp.tokenizer.decode(codes.reshape(-1, codes.shape[-1]))).reshape(len(codes), cfg.m, -1)
    return {"scenes": scenes, "idp": torch.cat(parts["idp"]).numpy(), "fdp": torch.cat(parts["fdp"]).numpy(),
            "seconds": {k: round(v, 2) for k, v in t.items()}}


def score_table(name: str, scores: np.ndarray, scenes: np.ndarray, before: np.ndarray, target: np.ndarray,
                types: list[str], ns: list[int]) -> list[dict]:
    res = best_of_n_world(scenes, scores, before, target, types, ns)
    rows = []
    for n in ns:
        m = res["by_n"][str(n)]
        ch = group_choices(scores, n)
        chosen = scenes[np.arange(len(scenes))[:, None], ch]  # [B, G, L]
        unexplained = ((chosen != before[:, None]) & (before == target)[:, None]).any(-1)
        rows.append({"score": name, "N": n, "exact": round(m["exact"], 4), "oracle": round(m["oracle"], 4),
                     "gap_to_oracle": round(m["oracle"] - m["exact"], 4),
                     "changed_cell_acc": round(m["changed_cell_acc"], 4), "over_edit_rate": round(float(unexplained.mean()), 4),
                     "by_type": {k: round(v["exact"], 4) for k, v in m["by_type"].items()}})
    return rows


def _split(fdp, examples):
    spec = fdp.spec
    before = parse(spec, np.stack([e.before for e in examples]))
    target = parse(spec, np.stack([e.after for e in examples]))
    return before, target, [parse_action(spec, e.action).type for e in examples]


def run(cfg: BenchVerifierConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    root = Path(cfg.run)
    spec = load_spec(root / "world")
    val_dir = Path(cfg.out) / f"val_world_seed{cfg.val_seed}"
    if not (val_dir / "test" / "test.json").is_file():
        generate_world(WorldConfig(out=str(val_dir), gold=0, videos=0, test=cfg.val_pairs, seed=cfg.val_seed, world=spec))
    fdp = load_model(root / cfg.fdp / "model").eval()
    idp = load_model(root / "idp" / "model").eval()
    splits = {"val": load_examples(val_dir / "test" / "test.json"), "test": load_examples(root / "world" / "test" / "test.json")}
    ns = list(range(1, cfg.m + 1))
    data = {k: candidates_and_parts(cfg, fdp, idp, ex) for k, ex in splits.items()}
    for k, d in data.items():
        print(f"{k}: {len(splits[k])} pairs x {cfg.m} candidates, seconds {d['seconds']}", flush=True)

    def table(split: str, score: str, weight: float = 1.0) -> list[dict]:
        d = data[split]
        s = combine(score, torch.from_numpy(d["idp"]), torch.from_numpy(d["fdp"]), weight).numpy()
        name = score if score != "idp+fdp" else f"idp+fdp (w={weight:g})"
        return score_table(name, s, d["scenes"], *_split(fdp, splits[split]), ns)

    val_best = {w: table("val", "idp+fdp", w)[-1]["exact"] for w in cfg.fdp_weights}
    weight = max(val_best, key=lambda w: (val_best[w], -w))  # ties: the smaller weight
    print(f"validation best-of-{cfg.m} exact by FDP weight: {val_best} -> w = {weight:g}", flush=True)
    test_rows = table("test", "idp") + table("test", "fdp") + table("test", "idp+fdp", weight)
    sweep = [table("test", "idp+fdp", w)[-1] for w in cfg.fdp_weights]
    cols = ["score", "N", "exact", "oracle", "gap_to_oracle", "changed_cell_acc", "over_edit_rate"]
    print(md_table(test_rows, cols), flush=True)
    print(md_table(sweep, cols), flush=True)
    result = {"config": cfg.model_dump(), "test_pairs": len(splits["test"]), "val_pairs": len(splits["val"]),
              "fdp_weight": weight, "val_best_of_m_by_weight": {str(k): v for k, v in val_best.items()},
              "test": test_rows, "test_weight_sweep": sweep, "seconds": {k: d["seconds"] for k, d in data.items()}}
    write_json(cfg.result, result)
    print(f"saved {cfg.result}")
    return result


if __name__ == "__main__":
    raise SystemExit(job_main(BenchVerifierConfig, run, doc=__doc__))
