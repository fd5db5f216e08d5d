"""Stage 2 of the eval job (jobs/evaluate.py): predictions of the loaded items, in this process or as a Ray Data
job whose actors hold the models; committed in parts (`<out>/predictions/part-*.parquet`) as they arrive, so a rerun
predicts only the items no part holds yet.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from dynboot.io import storage
from dynboot.io.images import decode_image, encode_png
from dynboot.io.rundir import RunDir, atomic_write_bytes
from jobs.evaluate_config import EvalConfig

__all__ = ["PREDICTION_SCHEMA", "Predictor", "predict", "settings"]


class Predictor:
    """Holds the FDP and IDP; one call = one batch of items (pyarrow in, pyarrow out), through the one
    prediction core (`dynboot.method.predict`: seeded per item, the verifier reading codes or images as it decides)."""

    def __init__(self, cfg: dict):
        import torch

        from dynboot.models.registry import load_model

        self.cfg = c = EvalConfig.model_validate(cfg)
        if c.threads:
            torch.set_num_threads(c.threads)
        load = lambda p: load_model(p, backend=c.backend or None, device=c.device).eval()  # noqa: E731
        self.fdp = load(c.fdp_path) if c.fdp_path else None
        self.idp = (self.fdp if c.idp_path == c.fdp_path else load(c.idp_path)) if c.idp_path else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from dynboot.method.predict import Item, predict

        items, out = [], []
        for r in batch.to_pylist():
            try:
                items.append(Item(r["index"], decode_image(r["before"]), r["instruction"],
                                  decode_image(r["target"]) if r["target"] else None))
            except ValueError as err:
                out.append(_prediction_row(r["index"], error=f"{type(err).__name__}: {err}"))
        for p in predict(self.fdp, self.idp, items, settings(self.cfg)):
            out.append(_prediction_row(
                p.index, candidates=[encode_png(im) for im in p.candidate_images] if p.candidate_images is not None else [],
                scores=[float(x) for x in p.scores] if p.scores is not None else [],
                greedy=encode_png(p.greedy_image) if p.greedy_image is not None else b"",
                caption=p.caption or "", error=p.error))
        return pa.Table.from_pylist(out, schema=PREDICTION_SCHEMA)


PREDICTION_SCHEMA = pa.schema([("index", pa.int64()), ("candidates", pa.list_(pa.binary())), ("scores", pa.list_(pa.float64())),
                               ("greedy", pa.binary()), ("caption", pa.string()), ("error", pa.string())])


def _prediction_row(index: int, candidates=(), scores=(), greedy=b"", caption="", error="") -> dict:
    return {"index": index, "candidates": list(candidates), "scores": list(scores), "greedy": greedy,
            "caption": caption, "error": error[:500]}


def settings(cfg: EvalConfig):
    from dynboot.method.predict import PredictSettings

    ranks = bool(cfg.idp_path) or cfg.verifier.score == "fdp"
    return PredictSettings(n=max(cfg.n) if ranks else 1, temperature=cfg.temperature, top_k=cfg.top_k,
                           seed=cfg.seed, greedy=cfg.greedy, captions=bool(cfg.idp_path), verifier=cfg.verifier,
                           decode=True)


def predict(cfg: EvalConfig, items: list[dict], run: RunDir) -> list[dict]:
    """Predictions of `items`, committed in parts (`predictions/part-*.parquet`) as they arrive, so a rerun
    predicts only the items no part holds yet."""
    done = _read_parts(run)
    todo = [it for it in items if it["index"] not in done]
    if len(todo) < len(items):
        print(f"[eval] resuming: {len(items) - len(todo)} items already predicted, {len(todo)} to do", flush=True)
    writer = _PartWriter(run, every=max(cfg.batch_size, 32))
    try:
        if todo and not cfg.use_ray:
            import torch

            threads = torch.get_num_threads()
            try:
                predictor = Predictor(cfg.model_dump())
                for i in range(0, len(todo), cfg.batch_size):
                    writer.add(predictor(pa.Table.from_pylist(todo[i: i + cfg.batch_size])).to_pylist())
            finally:
                torch.set_num_threads(threads)  # this process's setting, as it was
        elif todo:
            import ray

            started = not ray.is_initialized()
            if started:
                ray.init(include_dashboard=False)  # joins the cluster under `ray job submit`, else a local one
            try:
                ds = ray.data.from_items(todo).map_batches(  # stateful actors: models load once per actor
                    Predictor, fn_constructor_kwargs={"cfg": cfg.model_dump()}, batch_size=cfg.batch_size,
                    batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
                    num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus)
                for row in ds.iter_rows():
                    writer.add([row])
            finally:
                if started:
                    ray.shutdown()
    finally:
        writer.flush()
    done = _read_parts(run)
    return sorted((done[it["index"]] for it in items if it["index"] in done), key=lambda r: r["index"])


def _read_parts(run: RunDir) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for part in storage.list_files(run.uri("predictions"), suffixes=(".parquet",)):
        fs, inner = storage.resolve(part)
        for r in pq.read_table(inner, filesystem=fs, schema=PREDICTION_SCHEMA).to_pylist():
            rows[r["index"]] = r
    return rows


class _PartWriter:
    """Buffers prediction rows and publishes them as whole Parquet parts (a killed run loses one part at most)."""

    def __init__(self, run: RunDir, every: int):
        self.run, self.every, self.rows = run, every, []
        self.next = len(storage.list_files(run.uri("predictions"), suffixes=(".parquet",), hidden=True))

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        if len(self.rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=PREDICTION_SCHEMA), buf)
        atomic_write_bytes(self.run.uri("predictions", f"part-{self.next:05d}.parquet"), buf.getvalue().to_pybytes())
        self.next, self.rows = self.next + 1, []
