"""Rollout job: roll the FDP forward through held-out episodes of the embedded world, each step's chosen prediction
fed back as the next "before", best-of-N per step; exact match at step 1..k for every N (N=1: no verification).

    dynboot rollout jobs/configs/rollout.yaml world=runs/quickstart/world fdp_path=runs/quickstart/fdp_boot/model \\
        idp_path=runs/quickstart/idp/model out=runs/rollout
    python -m jobs.rollout ...            (the same program, for `ray job submit`)

Stages:
  1. episodes: `episodes` held-out episodes of `steps` actions (dynboot.eval.rollout.world_cases), none of whose
     transitions is a pair of the world directory (gold, test, videos), so the models never trained on them
  2. roll out, once per N (dynboot.eval.rollout.rollout: the one prediction core and verifier); each N's rows are written
     to rollouts/n<N>.parquet as soon as it is done, so a rerun redoes only the N values missing
  3. score: exact and exact-so-far per step (the world's exact parser), the paired gap of the largest N over N=1
  4. write: summary.json (+ `results` when set), metrics.jsonl, report.md, strips/case<i>.png (truth and every N),
     quarantine/rollouts.jsonl (a case that failed at some N: dynboot.io.rundir.quarantine_row, its input the case)

It runs in one process: a step of every case is one predict call, and the tiny world models need no cluster. On a
cluster, submit it as a Ray job with the resources of one model replica.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from dynboot.cli import job_main
from dynboot.config import Config
from dynboot.io.rundir import (ConfigChanged, ResumeMode, RunDir, RunDirBusy, append_jsonl, atomic_write_bytes,
                               quarantine_row, write_json)
from dynboot.method.verify import NEEDS_IDP, Verifier
from dynboot.method.predict import BestOfNs

ROWS = pa.schema([("index", pa.int64()), ("step", pa.int64()), ("action", pa.string()), ("png", pa.binary()),
                  ("chosen", pa.int64()), ("scores", pa.list_(pa.float64())), ("exact", pa.bool_()),
                  ("followed", pa.bool_()), ("error", pa.string())])


class RolloutConfig(Config):
    """dynboot rollout: multi-step FDP rollouts on held-out world episodes, exact match at step 1..k per N."""

    rerun_may_change: ClassVar[frozenset[str]] = frozenset({"threads", "strips", "results"})

    world: str = Field("runs/quickstart/world", description="A `dynboot world` directory: its world.json gives the "
                       "world, and its gold / test / video transitions are kept out of the rollout episodes.")
    fdp_path: str = Field("", description="FDP checkpoint dir (the world model rolled forward); required.")
    idp_path: str = Field("", description="IDP checkpoint dir (the verifier); empty = N=1 only (unless "
                          "verifier.score=fdp).")
    backend: str = Field("", description="Backend name; empty = read from each checkpoint's dynboot.json.")
    episodes: int = Field(100, ge=1, description="Held-out episodes rolled out (each from its own seeded stream).")
    steps: int = Field(4, ge=1, le=32, description="Actions per episode (k: exact match is reported at step 1..k).")
    n: BestOfNs = Field([1, 8], description="Candidates per step to roll out with; N=1 is the rollout without "
                         "verification, every larger N keeps the verifier's best at each step.")
    temperature: float = Field(1.0, ge=0, description="FDP sampling temperature (the paper: 1).")
    top_k: int = Field(0, ge=0, description="FDP top-k (0 = off).")
    seed: int = Field(0, description="Seed of the episodes and of the sampling (dynboot.eval.rollout.step_seed).")
    verifier: Verifier = Field(default_factory=Verifier, description="How each step's candidates are ranked "
                               "(dynboot.method.verify): idp (the paper), fdp, idp+fdp, idp+edit.")
    threads: int = Field(1, ge=0, description="Torch intra-op threads (0 = torch default; tiny models: 1 is fastest).")
    device: str = Field("cpu", description="Torch device.")
    strips: int = Field(4, ge=0, description="Cases drawn as a PNG strip (truth and every N) under strips/.")
    results: str = Field("", description="Also write summary.json's content here (e.g. bench/results/rollout.json).")
    out: str = Field("runs/rollout", description="Run directory.")
    resume: ResumeMode = Field("auto", description="auto: a rerun rolls out only the N values not yet done (same "
                               "config but for threads / strips / results); force: even if it differs; off: start over.")


def _ns(cfg: RolloutConfig) -> list[int]:
    """Without the verifier's model there is nothing to choose with: N=1 only."""
    return [1] if (cfg.verifier.score in NEEDS_IDP and not cfg.idp_path) else cfg.n


def _roll(cfg: RolloutConfig, models, spec, cases, n: int) -> pa.Table:
    from dynboot.io.images import encode_png
    from dynboot.method.predict import PredictSettings
    from dynboot.eval.rollout import rollout, rollout_world_scores

    fdp, idp = models
    s = PredictSettings(n=n, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, verifier=cfg.verifier)
    rolls = rollout(fdp, idp if n > 1 else None, cases, s)  # N=1: the first sample, unverified
    scores = rollout_world_scores(spec, cases, rolls)
    rows = []
    for c, r, h, f in zip(cases, rolls, scores["per_case"], scores["per_case_followed"]):
        for t, action in enumerate(c.actions):
            done = t < r.steps
            rows.append({"index": c.index, "step": t + 1, "action": action,
                         "png": encode_png(r.images[t]) if done else None, "chosen": r.chosen[t] if done else None,
                         "scores": r.scores[t] if done else None, "exact": bool(h[t]),
                         "followed": None if f[t] is None else bool(f[t]), "error": "" if done else (r.error or "not reached")})
    return pa.Table.from_pylist(rows, schema=ROWS)


def _scores(table: pa.Table, steps: int) -> dict:
    """exact / exact_so_far per step, the per-case 0/1 lists and the failed cases of one N's rows."""
    from dynboot.eval.rollout import exact_by_step

    rows = table.to_pylist()
    cases = sorted({r["index"] for r in rows})
    by_key = {(r["index"], r["step"]): r for r in rows}
    per_case = [[int(by_key[(i, t)]["exact"]) for t in range(1, steps + 1)] for i in cases]
    followed = [[None if by_key[(i, t)]["followed"] is None else int(by_key[(i, t)]["followed"])
                 for t in range(1, steps + 1)] for i in cases]
    failed = {r["index"] for r in rows if r["error"] and r["error"] != "not reached"}
    return {"by_step": exact_by_step(per_case, followed), "per_case": per_case, "errors": len(failed)}


def run(cfg: RolloutConfig) -> dict:
    import torch

    from dynboot.models.registry import load_model
    from dynboot.eval.rollout import training_transitions, world_cases
    from dynboot.world.generate import load_spec

    t0 = time.time()
    if not cfg.fdp_path:
        raise SystemExit("error: fdp_path is required (the FDP checkpoint to roll forward)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with RunDir(cfg.out).open(cfg, resume=cfg.resume, set_aside=("rollouts",)) as rd:
        spec = load_spec(cfg.world)
        cases = world_cases(spec, cfg.episodes, cfg.steps, cfg.seed, avoid=training_transitions(spec, cfg.world))
        t_cases = time.time() - t0
        print(f"[rollout] {len(cases)} held-out episodes x {cfg.steps} steps, N={_ns(cfg)}, verifier={cfg.verifier.score}",
              flush=True)
        load = lambda p: load_model(p, backend=cfg.backend or None, device=cfg.device).eval()  # noqa: E731
        models = None
        tables, seconds = {}, {}
        for n in _ns(cfg):
            path = rd.path("rollouts", f"n{n}.parquet")
            if path.is_file():
                tables[n] = pq.read_table(path)
                continue
            if models is None:
                fdp = load(cfg.fdp_path)
                models = (fdp, (fdp if cfg.idp_path == cfg.fdp_path else load(cfg.idp_path)) if cfg.idp_path else None)
            t = time.time()
            tables[n] = _roll(cfg, models, spec, cases, n)
            seconds[n] = round(time.time() - t, 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = pa.BufferOutputStream()
            pq.write_table(tables[n], buf)
            atomic_write_bytes(path, buf.getvalue().to_pybytes())
            print(f"[rollout] N={n}: {seconds[n]} s", flush=True)
        return _write(cfg, rd, spec, cases, tables, seconds, t0, t_cases)


def _write(cfg: RolloutConfig, rd: RunDir, spec, cases, tables: dict, seconds: dict, t0: float, t_cases: float) -> dict:
    from dynboot.eval.report import md_table, rollout_strip, write_report
    from dynboot.eval.stats import paired_comparison

    by_n = {n: _scores(t, cfg.steps) for n, t in tables.items()}
    (rd.quarantine / "rollouts.jsonl").unlink(missing_ok=True)  # this run's failures only
    for n, t in tables.items():
        failed: dict[int, dict] = {}  # case -> its first failed step (the later ones carry the same error)
        for r in t.filter(pc.not_equal(t["error"], "")).to_pylist():
            if r["error"] != "not reached":
                failed.setdefault(r["index"], r)
        for r in failed.values():
            append_jsonl(rd.quarantine / "rollouts.jsonl", quarantine_row(
                r["index"], "rollout", "rollout_failed", error=f"N={n}, {r['error']}"))  # the error names its step
    lo, hi = min(by_n), max(by_n)
    paired = {t: paired_comparison([h[t - 1] for h in by_n[hi]["per_case"]], [h[t - 1] for h in by_n[lo]["per_case"]])
              for t in range(1, cfg.steps + 1)} if hi != lo else {}
    table = []
    for t in range(1, cfg.steps + 1):
        row = {"step": t}
        row |= {f"N={n} exact": by_n[n]["by_step"][str(t)]["exact"] for n in by_n}
        row |= {f"N={n} all steps so far": by_n[n]["by_step"][str(t)]["exact_so_far"] for n in by_n}
        row |= {f"N={n} followed": by_n[n]["by_step"][str(t)]["followed"] for n in by_n}
        if paired:
            p = paired[t]
            row[f"gap N={hi} - N={lo} (paired SE)"] = f"{p['gap']:+.3f} ({p['se']:.3f})"
        table.append(row)
        for n in by_n:
            rd.log(best_of=n, step=t, **{("cases" if k == "n" else k): v for k, v in by_n[n]["by_step"][str(t)].items()})
    strips = []
    for c in cases[: cfg.strips]:
        from dynboot.io.images import decode_image
        from dynboot.world.render import render

        rows = {"truth": [render(spec, s) for s in c.truth]}
        good = {}
        for n, t in tables.items():
            mine = [r for r in t.to_pylist() if r["index"] == c.index]
            rows[f"N={n}"] = [decode_image(r["png"]) if r["png"] else None for r in mine]
            good[f"N={n}"] = [r["exact"] for r in mine]
        strips.append(f"strips/case{c.index}.png")
        rollout_strip(rd.path(strips[-1]), c.start, c.actions, rows, good)
    summary = {
        "episodes": len(cases), "steps": cfg.steps, "n": sorted(by_n), "verifier": cfg.verifier.model_dump(),
        "fdp_path": cfg.fdp_path, "idp_path": cfg.idp_path, "seed": cfg.seed, "temperature": cfg.temperature,
        "by_n": {str(n): {k: v for k, v in s.items() if k != "per_case"} for n, s in by_n.items()},
        "paired": {str(t): p for t, p in paired.items()}, "table": table, "strips": strips,
        "seconds": {"episodes": round(t_cases, 1), **{f"n{n}": s for n, s in seconds.items()},
                    "total": round(time.time() - t0, 1)},
    }
    rd.write_summary(summary)
    if cfg.results:
        Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
        write_json(cfg.results, summary)
    body = (md_table(table) + f"\n{len(cases)} held-out episodes of {cfg.steps} actions (no transition the models "
            f"trained on); exact = the step's predicted scene equals the true one (the world's exact parser); all steps "
            f"so far = every step up to it exact; followed = the step applied its action exactly to the model's own previous "
            f"prediction (over the steps where that action is possible). Verifier: {cfg.verifier.score}.\n")
    pictures = "Rows: truth, then each N; green step = exact.\n\n" + "\n".join(f"![case]({s})" for s in strips)
    write_report(rd.path("report.md"), "dynboot rollout", [("Exact match at step 1..k", body)]
                 + ([("Rollout strips", pictures)] if strips else []))
    print(md_table(table), flush=True)
    return summary


def _main(cfg: RolloutConfig) -> None:
    try:
        run(cfg)
    except (ConfigChanged, RunDirBusy, FileNotFoundError) as err:  # a rerun with another config, a busy run dir,
        print(f"error: {err}", file=sys.stderr)                   # a world or checkpoint that is not there
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(job_main(RolloutConfig, _main, doc=__doc__))
