"""Verifier scores for best-of-N on the embedded world, on the same candidates (plain models, no Ray).

    python -m jobs.bench_verifier run=runs/quickstart out=runs/bench/verifier

Needs a quickstart run directory (`run=`: world/, idp/model, fdp_boot/model; `fdp=` / `idp=` name other
checkpoints, e.g. an FDP that `jobs.bench_weighting` trained). The FDP samples
`m` candidates per pair at `temperature` once; every verifier score (dynboot.method.verify) ranks the same
candidates, and best-of-N for N = 1..m uses the disjoint groups of `dynboot.eval.metrics.best_of_n_world`.
The weight of the FDP part of `idp+fdp` (and of the edit prior of `idp+edit`) is chosen on a validation
split (a world of seed `val_seed`, same spec, never trained on) by best-of-m exact match, then reported on
the test split, with every weight tried.

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
from dynboot.eval.metrics import best_of_n_world, group_choices
from dynboot.models.registry import load_model
from dynboot.data.pairs import load_examples
from dynboot.eval.report import md_table
from dynboot.io.rundir import write_json
from dynboot.method.verify import Verifier, combine, edit_fraction, fdp_score, idp_score
from dynboot.world.actions import parse_action
from dynboot.world.generate import WorldConfig, generate_world, load_spec
from dynboot.world.render import parse


class BenchVerifierConfig(Config):
    """IDP-only vs over-editing-aware verifier scores, best-of-N on the same candidates."""

    run: str = Field("runs/quickstart", description="A finished quickstart run directory.")
    fdp: str = Field("", description="FDP checkpoint generating the candidates; empty = the run's fdp_boot/model.")
    idp: str = Field("", description="IDP checkpoint (the verifier); empty = the run's idp/model.")
    out: str = Field("runs/bench/verifier", description="Working directory (validation world, cached candidates).")
    result: str = Field("bench/results/bench_verifier.json", description="Where the summary JSON goes.")
    m: int = Field(8, ge=1, description="Candidates sampled per pair (the largest N).")
    temperature: float = Field(1.0, ge=0, description="FDP sampling temperature.")
    seed: int = Field(0, description="Sampling seed.")
    val_seed: int = Field(1, description="World seed of the validation split the FDP weight is chosen on.")
    val_pairs: int = Field(300, ge=1, description="Validation pairs.")
    fdp_weights: list[float] = Field([0.25, 0.5, 1.0, 2.0, 4.0, 8.0], description="Weights of the FDP part of idp+fdp tried.")
    edit_weights: list[float] = Field([0.25, 0.5, 1.0, 2.0, 4.0, 8.0], description="Weights of the edit prior of idp+edit tried.")
    batch_size: int = Field(64, ge=1, description="Pairs per sampling / scoring call.")
    threads: int = Field(2, ge=1, description="torch threads.")


def candidates_and_parts(cfg: BenchVerifierConfig, spec, fdp, idp, examples) -> dict:
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
    scenes = parse(spec, fdp.tokenizer.decode(codes.reshape(-1, codes.shape[-1]))).reshape(len(codes), cfg.m, -1)
    before = np.stack([e.before for e in examples])
    return {"scenes": scenes, "idp": torch.cat(parts["idp"]), "fdp": torch.cat(parts["fdp"]),
            "edit": edit_fraction(fdp.tokenizer, before, codes), "seconds": {k: round(v, 2) for k, v in t.items()}}


def cached_parts(cfg: BenchVerifierConfig, spec, fdp, idp, examples, path: Path) -> dict:
    """`candidates_and_parts`, kept in `path` (plain arrays, no pickle) so that a rerun only re-ranks. The
    cache is only valid for the same models and sampling settings: delete it when they change."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {"scenes": z["scenes"], "idp": torch.from_numpy(z["idp"]), "fdp": torch.from_numpy(z["fdp"]),
                    "edit": torch.from_numpy(z["edit"]), "seconds": {k: float(z[k]) for k in ("sample_s", "idp_s", "fdp_s")}}
    d = candidates_and_parts(cfg, spec, fdp, idp, examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, scenes=d["scenes"], idp=d["idp"].numpy(), fdp=d["fdp"].numpy(), edit=d["edit"].numpy(), **d["seconds"])
    return d


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


def _split(spec, examples):
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
    fdp = load_model(cfg.fdp or root / "fdp_boot" / "model").eval()
    idp = load_model(cfg.idp or root / "idp" / "model").eval()
    splits = {"val": load_examples(val_dir / "test" / "test.json"), "test": load_examples(root / "world" / "test" / "test.json")}
    ns = list(range(1, cfg.m + 1))
    data = {k: cached_parts(cfg, spec, fdp, idp, ex, Path(cfg.out) / f"{k}_candidates.npz") for k, ex in splits.items()}
    for k, d in data.items():
        print(f"{k}: {len(splits[k])} pairs x {cfg.m} candidates, seconds {d['seconds']}", flush=True)

    def table(split: str, verifier: Verifier) -> list[dict]:
        d = data[split]
        s = combine(verifier, d["idp"], d["fdp"], d["edit"]).numpy()
        name = {"idp+fdp": f"idp+fdp (w={verifier.fdp_weight:g})", "idp+edit": f"idp+edit (w={verifier.edit_weight:g})"}
        return score_table(name.get(verifier.score, verifier.score), s, d["scenes"], *_split(spec, splits[split]), ns)

    tuned, val_best, sweep = {}, {}, []
    for score, field, weights in (("idp+fdp", "fdp_weight", cfg.fdp_weights), ("idp+edit", "edit_weight", cfg.edit_weights)):
        val = {w: table("val", Verifier(score=score, **{field: w}))[-1]["exact"] for w in weights}
        w_best = max(val, key=lambda w: (val[w], -w))  # ties: the smaller weight
        print(f"validation best-of-{cfg.m} exact of {score} by weight: {val} -> {w_best:g}", flush=True)
        tuned[score], val_best[score] = Verifier(score=score, **{field: w_best}), {str(k): v for k, v in val.items()}
        sweep += [table("test", Verifier(score=score, **{field: w}))[-1] for w in weights]
    test_rows = [r for v in (Verifier(score="idp"), Verifier(score="fdp"), *tuned.values()) for r in table("test", v)]
    cols = ["score", "N", "exact", "oracle", "gap_to_oracle", "changed_cell_acc", "over_edit_rate"]
    print(md_table(test_rows, cols), flush=True)
    print(md_table(sweep, cols), flush=True)
    result = {"config": cfg.model_dump(), "test_pairs": len(splits["test"]), "val_pairs": len(splits["val"]),
              "tuned": {k: v.model_dump() for k, v in tuned.items()}, "val_best_of_m_by_weight": val_best,
              "test": test_rows, "test_weight_sweep": sweep, "seconds": {k: d["seconds"] for k, d in data.items()}}
    write_json(cfg.result, result)
    print(f"saved {cfg.result}")
    return result


if __name__ == "__main__":
    raise SystemExit(job_main(BenchVerifierConfig, run, doc=__doc__))
