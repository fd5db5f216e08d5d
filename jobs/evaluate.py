"""Evaluation job: FDP best-of-N (IDP as verifier) and IDP captions over a world test split or
Aurora-Bench, as a Ray Data batch job; world metrics, an LLM judge for Aurora, IDP text metrics, a report.

    dynboot eval jobs/configs/evaluate.yaml data=runs/world/test fdp_path=runs/fdp/model idp_path=runs/idp/model
    python -m jobs.evaluate jobs/configs/evaluate.yaml data=aurora/test.json fdp_path=... idp_path=... \\
        judge_model=gpt-4o-2024-11-20            # key from $OPENAI_API_KEY (or judge_api_key_env=NAME)
    ray job submit --working-dir . -- python -m jobs.evaluate jobs/configs/evaluate.yaml data=... out=...

Stages:
  1. load: records + images (PNG bytes); a missing or unreadable image is quarantined, not fatal
  2. predict (jobs/evaluate_predict.py; Ray Data, actor pool holding the models): max(n) FDP samples per item,
     seeded per item so results do not depend on batching or actors; verifier scores; a greedy sample; IDP captions
  3. judge (Aurora only): the candidates any N chooses, and the greedy edit, through `dynboot.eval.judge`
  4. metrics: best-of-N over disjoint groups of the same samples (`dynboot.eval.metrics`), oracle, greedy;
     IDP exact / structured / BLEU / ROUGE-L; pseudo-label accuracy of a relabel output when asked
  5. write: predictions.parquet, metrics.json, summary.json, metrics.jsonl, report.md, grid.png, score_vs_n.png

An item that could not be evaluated is a line of quarantine/inputs.jsonl (dynboot.io.rundir.quarantine_row: its
input the item's index, its reason an `InputFault`). The config is jobs/evaluate_config.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynboot.cli import job_main
from dynboot.data.aurora import read_aurora
from dynboot.io.images import decode_image, encode_png
from dynboot.io.rundir import RunDir, append_jsonl, atomic_write_bytes, quarantine_row, read_jsonl, write_json
from jobs.evaluate_config import EvalConfig
from jobs.evaluate_predict import predict

__all__ = ["InputFault"]

InputFault = Literal["unreadable_image", "prediction_failed"]  # why an item is in quarantine/inputs.jsonl

# ---- 1. load ---------------------------------------------------------------------------------------
def resolve_data(cfg: EvalConfig) -> tuple[str, Path]:
    p = Path(cfg.data)
    json_path = p / "test.json" if p.is_dir() else p
    if not json_path.is_file():
        raise FileNotFoundError(f"data={cfg.data!r}: no such file (expected a test.json or a directory holding one)")
    mode = cfg.mode
    if mode == "auto":
        mode = "world" if (json_path.parent / "truth.jsonl").is_file() else "aurora"
    return mode, json_path


def load_items(cfg: EvalConfig, mode: str, json_path: Path, run: RunDir) -> list[dict]:
    """Rows {index, task, instruction, before, target} with PNG bytes. An unreadable input image skips the
    item; an unreadable target only drops the target (the judge never sees targets; the IDP needs them).
    Both are reported in quarantine/inputs.jsonl."""
    tasks = None if mode == "world" or not cfg.subsets else list(cfg.subsets)
    records = read_aurora(json_path, tasks)
    items = []

    def read(rel: str, stage: str, rec) -> bytes | None:
        try:
            return encode_png(decode_image((json_path.parent / rel).read_bytes()))
        except (OSError, ValueError) as err:
            append_jsonl(run.quarantine / "inputs.jsonl", quarantine_row(rec.index, stage, "unreadable_image", err, path=rel))
            return None

    for rec in records[: cfg.limit or None]:
        before = read(rec.input, "load input", rec)
        if before is None:
            continue
        target = (read(rec.output, "load target", rec) if rec.output else None) or b""
        if mode == "world" and not target:
            continue  # a world item with a broken file is broken data: skipped (and reported) whole
        items.append({"index": rec.index, "task": rec.task, "instruction": rec.instruction, "before": before, "target": target})
    return items


# ---- 3-4. judge and metrics ---------------------------------------------------------------------------
def world_metrics(cfg: EvalConfig, json_path: Path, rows: list[dict], ns: list[int]) -> dict:
    """World scores (`dynboot.eval.world_eval.world_scores`, the one scoring path) of the prediction rows."""
    from dynboot.method.predict import Item, Prediction
    from dynboot.eval.textmetrics import text_metrics
    from dynboot.world.generate import load_spec
    from dynboot.eval.world_eval import world_scores

    spec = load_spec(json_path.parent)
    ok = [r for r in rows if not r.get("error") and (r.get("candidates") or r.get("greedy") or r.get("caption"))]
    items = [Item(r["index"], decode_image(r["before"]), r["instruction"], decode_image(r["target"])) for r in ok]
    preds = [Prediction(r["index"], scores=np.array(r["scores"], dtype=float) if r.get("candidates") else None,
                        candidate_images=np.stack([decode_image(b) for b in r["candidates"]]) if r.get("candidates") else None,
                        greedy_image=decode_image(r["greedy"]) if r.get("greedy") else None,
                        caption=r["caption"] if cfg.idp_path and r.get("caption") is not None else None) for r in ok]
    scores = world_scores(spec, None, items, preds, ns if any(p.candidate_images is not None for p in preds) else ())
    out: dict = {}
    if "fdp" in scores:
        out["fdp"] = scores["fdp"]
        for r, p in zip(ok, preds):  # per-candidate correctness, for predictions.parquet and the grid
            if p.correct is not None:
                r["correct"] = [bool(x) for x in p.correct]
    if "idp" in scores:
        capped = [r for r in ok if r.get("caption") is not None and cfg.idp_path]
        out["idp"] = scores["idp"] | {"text": text_metrics([r["caption"] for r in capped], [r["instruction"] for r in capped])}
    if cfg.relabel_dir:
        out["pseudo_labels"] = pseudo_labels(cfg)
    return out


def pseudo_labels(cfg: EvalConfig) -> dict:
    if not cfg.truth:
        return {"error": "relabel_dir= needs truth= (the world's videos_truth.jsonl)"}
    from dynboot.data.pseudo_labels import pseudo_label_accuracy

    return pseudo_label_accuracy(cfg.relabel_dir, cfg.truth)


def make_judge(cfg: EvalConfig, run_dir: RunDir):
    """The judge, made before any prediction so that a missing API key fails fast and costs nothing."""
    from dynboot.eval.judge import Judge, JudgeError

    try:
        return Judge(cfg.judge_model, base_url=cfg.judge_base_url or None, api_key_env=cfg.judge_api_key_env,
                     cache_path=cfg.judge_cache or run_dir.path("judge_cache.jsonl"), concurrency=cfg.judge_concurrency,
                     max_retries=cfg.judge_max_retries, backoff_s=cfg.judge_backoff_s)
    except JudgeError as err:
        raise SystemExit(f"error: {err} (or run without it: judge=false)") from None


def aurora_metrics(cfg: EvalConfig, rows: list[dict], ns: list[int], judge) -> dict:
    from dynboot.eval.metrics import best_of_n_judged, group_choices, mean_by
    from dynboot.eval.textmetrics import text_metrics

    present = {r["task"] for r in rows}
    out: dict = {"subsets": [t for t in cfg.subsets if t in present] + sorted(present - set(cfg.subsets))}  # report order
    m = max((len(r.get("candidates") or []) for r in rows), default=0)
    if m and judge is not None:
        scores = np.array([r["scores"] if len(r.get("scores") or []) == m else [np.nan] * m for r in rows])
        # judge only what some N chooses (with N=1 in n that is every candidate) plus the greedy edit
        wanted = [sorted({int(j) for n in ns for j in group_choices(scores, n)[i]}) if rows[i].get("candidates") else []
                  for i in range(len(rows))]
        reqs = [(i, j, rows[i]["candidates"][j]) for i in range(len(rows)) for j in wanted[i]]
        reqs += [(i, -1, r["greedy"]) for i, r in enumerate(rows) if r.get("greedy")]
        print(f"[eval] judging {len(reqs)} edits with {cfg.judge_model}", flush=True)
        step = max(1, len(reqs) // 10)
        progress = lambda done, total: done % step == 0 and print(f"[eval] judged {done}/{total} new edits", flush=True)  # noqa: E731
        results = judge.score_many([(rows[i]["before"], img, rows[i]["instruction"]) for i, _, img in reqs], progress)
        arrays = {k: np.full((len(rows), m), np.nan) for k in ("score", "success", "minimal")}
        greedy = {k: [None] * len(rows) for k in arrays}
        for (i, j, _), res in zip(reqs, results):
            for k in arrays:
                v = getattr(res, k)
                if j >= 0:
                    arrays[k][i, j] = np.nan if v is None else v
                else:
                    greedy[k][i] = v
        for i, r in enumerate(rows):
            r["judge_scores"] = [None if np.isnan(v) else float(v) for v in arrays["score"][i]]
        tasks = [r["task"] for r in rows]
        out["judge"] = {k: best_of_n_judged(arrays[k], scores, tasks, ns) for k in arrays}
        if cfg.greedy:
            out["judge"]["greedy"] = {k: mean_by(greedy[k], tasks) for k in greedy}
        out["judge"]["stats"] = dict(judge.stats)
        out["judge"]["model"] = cfg.judge_model
        judge.close()
    # every item with a target was captioned: an empty caption is a wrong one, not a missing one
    capped = [r for r in rows if r.get("caption") is not None and r.get("target")]
    if cfg.idp_path and capped:
        by_task = {t: text_metrics([r["caption"] for r in capped if r["task"] == t], [r["instruction"] for r in capped if r["task"] == t])
                   for t in sorted({r["task"] for r in capped})}
        out["idp"] = {"by_task": by_task, "overall": text_metrics([r["caption"] for r in capped], [r["instruction"] for r in capped])}
    return out


# ---- 5. write ----------------------------------------------------------------------------------------
def write_predictions(rows: list[dict], ns: list[int], path: Path) -> None:
    from dynboot.eval.metrics import group_choices

    keep = ("index", "task", "instruction", "before", "target", "candidates", "scores", "greedy", "caption", "error",
            "correct", "judge_scores")
    out = []
    for r in rows:
        row = {k: r.get(k) for k in keep}
        if r.get("scores"):
            row["chosen"] = json.dumps({str(n): group_choices(np.array([r["scores"]]), n)[0].tolist() for n in ns})
        out.append(row)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(out), buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())


def run(cfg: EvalConfig) -> dict:
    t0 = time.time()
    with RunDir(cfg.out).open(cfg, resume=cfg.resume, set_aside=("predictions",)) as run_dir:
        return _run(cfg, run_dir, t0)


def _run(cfg: EvalConfig, run_dir: RunDir, t0: float) -> dict:
    from dynboot.eval.report import eval_report, headline

    (run_dir.quarantine / "inputs.jsonl").unlink(missing_ok=True)  # this run's skips only
    mode, json_path = resolve_data(cfg)
    items = load_items(cfg, mode, json_path, run_dir)
    if not items:
        raise SystemExit(f"error: no readable items in {json_path} (subsets={cfg.subsets}); see {run_dir.quarantine}")
    ns = cfg.n if cfg.idp_path else [1]  # without a verifier there is nothing to choose with
    judge = make_judge(cfg, run_dir) if mode == "aurora" and cfg.judge and cfg.fdp_path else None
    print(f"[eval] {mode}: {len(items)} items from {json_path}, N={ns}, ray={cfg.use_ray}", flush=True)
    t1 = time.time()
    preds = predict(cfg, items, run_dir) if (cfg.fdp_path or cfg.idp_path) else [{"index": r["index"]} for r in items]
    t2 = time.time()
    for p in preds:
        if p.get("error"):
            append_jsonl(run_dir.quarantine / "inputs.jsonl", quarantine_row(p["index"], "predict", "prediction_failed",
                                                                              error=p["error"]))
    by_index = {p["index"]: p for p in preds}
    rows = [{**it, **by_index.get(it["index"], {})} for it in items]
    metrics = world_metrics(cfg, json_path, rows, ns) if mode == "world" else aurora_metrics(cfg, rows, ns, judge)
    t3 = time.time()
    write_predictions(rows, ns, run_dir.path("predictions.parquet"))
    write_json(run_dir.path("metrics.json"), {"mode": mode, "data": str(json_path), "n": ns, **metrics})
    table = eval_report(run_dir.root, mode, metrics, rows, ns, cfg.grid_examples, title=f"dynboot eval: {json_path}")
    quarantined = len(read_jsonl(run_dir.quarantine / "inputs.jsonl"))
    summary = {"mode": mode, "items": len(items), "quarantined": quarantined,
               "predict_errors": sum(bool(p.get("error")) for p in preds), "n": ns,
               "seconds": {"load": round(t1 - t0, 2), "predict": round(t2 - t1, 2), "metrics": round(t3 - t2, 2),
                           "total": round(time.time() - t0, 2)},
               "items_per_s": round(len(items) / max(t2 - t1, 1e-9), 2)}
    summary["headline"] = headline(metrics)
    if "judge" in metrics:
        summary["judge"] = metrics["judge"]["stats"]
    run_dir.write_summary(summary)
    run_dir.log(stage="eval", **summary["seconds"])
    print(table, flush=True)
    print(f"[eval] wrote {run_dir.root}/report.md in {summary['seconds']['total']} s", flush=True)
    return summary


if __name__ == "__main__":
    raise SystemExit(job_main(EvalConfig, run, doc=__doc__))
