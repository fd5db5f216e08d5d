"""The stages of the relabel job (jobs/relabel.py wires them into the Ray Data pipeline): what each one
does to a video row, the row schemas between them, and the attempt ledger that bounds retries after crashes.

A video row (VIDEO_SCHEMA) carries one video's pairs in list columns from stage 2 to stage 4; its `status` is
"ok" or "quarantined" (then `stage` and `error` say where and why). Every stage catches its exceptions: a bad
video becomes a quarantine row, never a failed task.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dynboot.keyframes import video_keyframes
from dynboot.pairs import make_row, to_table
from dynboot.rundir import atomic_write_bytes, write_json

if TYPE_CHECKING:
    from jobs.relabel import RelabelConfig

VIDEO_SCHEMA = pa.schema([  # stages 2 -> 3 -> 4: one row per video
    ("video_id", pa.string()), ("path", pa.string()), ("status", pa.string()), ("stage", pa.string()),
    ("error", pa.string()), ("frame_a", pa.list_(pa.int64())), ("frame_b", pa.list_(pa.int64())),
    ("before", pa.list_(pa.binary())), ("after", pa.list_(pa.binary())), ("actions", pa.list_(pa.string())),
    ("scores", pa.list_(pa.float32())), ("model_id", pa.string()), ("info", pa.string()),
    ("decode_s", pa.float64()), ("label_s", pa.float64()),
])
RESULT_SCHEMA = pa.schema([  # stage 4 -> driver: small rows, counted and logged as they arrive
    ("video_id", pa.string()), ("status", pa.string()), ("stage", pa.string()), ("error", pa.string()),
    ("pairs", pa.int64()), ("decode_s", pa.float64()), ("label_s", pa.float64()), ("write_s", pa.float64()),
])


# ---- attempt ledger: bounds Ray's unlimited retries after worker crashes ------------------------------------
def _ledger(run: str, stage: str, video_id: str) -> Path:
    return Path(run) / "attempts" / f"{video_id}.{stage}.json"


def _deaths(run: str, stage: str, video_id: str) -> dict[str, Any]:
    path = _ledger(run, stage, video_id)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"attempts": 0}


def _claim(run: str, stage: str, video_id: str) -> None:
    died = _deaths(run, stage, video_id)["attempts"]
    write_json(_ledger(run, stage, video_id), {"attempts": died + 1, "pid": os.getpid(), "host": socket.gethostname()})


def _release(run: str, stage: str, video_id: str) -> None:
    _ledger(run, stage, video_id).unlink(missing_ok=True)


def _death_error(stage: str, last: dict[str, Any]) -> str:
    return (f"WorkerCrashed: the {stage} worker died {last['attempts']} time(s) while processing this video "
            f"(native crash or out-of-memory kill; last pid {last.get('pid')} on {last.get('host')}); not retried")


def _quarantined(row: dict[str, Any], stage: str, error: str) -> dict[str, Any]:
    empty = {k: [] for k in ("frame_a", "frame_b", "before", "after", "actions", "scores")}
    return {**row, **empty, "status": "quarantined", "stage": stage, "error": error[:2000]}


# ---- stage 2: decode + key frames (CPU tasks) ---------------------------------------------------------------
@contextlib.contextmanager
def _local_file(path: str) -> Iterator[str]:
    """A local path for `path`: itself, or a temp copy of a URI's object (decoders read local files)."""
    if "://" not in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        yield path
        return
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    fd, tmp = tempfile.mkstemp(suffix=Path(inner).suffix, prefix="dynboot-video-")
    try:
        with os.fdopen(fd, "wb") as dst, filesystem.open_input_stream(inner) as src:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        yield tmp
    finally:
        os.unlink(tmp)


def _decode_one(item: dict[str, Any], cfg: RelabelConfig) -> dict[str, Any]:
    row = {"video_id": item["video_id"], "path": item["path"], "status": "ok", "stage": "", "error": "", "model_id": "",
           "info": "{}", "decode_s": 0.0, "label_s": 0.0}
    last = _deaths(cfg.out, "decode", row["video_id"])
    if last["attempts"] >= cfg.max_attempts:
        return _quarantined(row, "decode", _death_error("decode", last))
    _claim(cfg.out, "decode", row["video_id"])
    t0 = time.perf_counter()
    try:
        with _local_file(item["path"]) as local:
            if os.path.getsize(local) == 0:
                raise ValueError("empty file (0 bytes)")
            kf = video_keyframes(local, cfg.keyframes, cfg.image_size)
        row |= {"frame_a": [a for a, _ in kf.pairs], "frame_b": [b for _, b in kf.pairs],
                "before": [kf.images[a] for a, _ in kf.pairs], "after": [kf.images[b] for _, b in kf.pairs],
                "actions": [], "scores": [],
                "info": json.dumps({"decoder": kf.decoder, "frames": kf.frames, "frame_hw": list(kf.size),
                                    "keyframes": kf.indices, "motion": kf.motion})}
    except Exception as err:  # any decoder / I/O failure is this video's, never the job's
        row = _quarantined(row, "decode", f"{type(err).__name__}: {err}")
    _release(cfg.out, "decode", row["video_id"])
    row["decode_s"] = time.perf_counter() - t0
    return row


def decode_stage(batch: pa.Table, cfg: RelabelConfig) -> pa.Table:
    return pa.Table.from_pylist([_decode_one(item, cfg) for item in batch.to_pylist()], schema=VIDEO_SCHEMA)


# ---- stage 3: IDP labelling (actor pool) --------------------------------------------------------------------
class IDPLabeler:
    """Stateful actor: loads the IDP once, then captions and scores the pairs of each batch of videos."""

    def __init__(self, cfg: RelabelConfig):
        import torch

        from dynboot.models.registry import load_model

        torch.set_num_threads(cfg.idp_threads)  # one actor = idp_threads cores; oversubscribing slows all stages
        self.cfg = cfg
        self.model = load_model(cfg.model_path, cfg.backend or None, device="cuda" if cfg.idp_gpus > 0 else "cpu").eval()

    def _label(self, videos: list[dict[str, Any]]) -> None:
        import numpy as np

        from dynboot.images import decode_image

        before = [b for v in videos for b in v["before"]]
        after = [a for v in videos for a in v["after"]]
        actions, scores, bs = [], [], self.cfg.batch_size
        t0 = time.perf_counter()
        for i in range(0, len(before), bs):
            b = np.stack([decode_image(x) for x in before[i:i + bs]])
            a = np.stack([decode_image(x) for x in after[i:i + bs]])
            captions = self.model.caption(b, a)
            actions += captions
            scores += [float(s) for s in self.model.action_logprob(b, a, captions)]
        per_pair = (time.perf_counter() - t0) / max(1, len(before))
        for v in videos:
            n = len(v["before"])
            v |= {"actions": actions[:n], "scores": scores[:n], "model_id": self.model.model_id, "label_s": per_pair * n}
            actions, scores = actions[n:], scores[n:]

    def _label_group(self, videos: list[dict[str, Any]]) -> None:
        """Label `videos` together; a Python error retries them one by one, so one bad video is the only loss."""
        run, error = self.cfg.out, None
        for v in videos:
            _claim(run, "label", v["video_id"])
        try:
            self._label(videos)
        except Exception as err:
            error = err
        for v in videos:
            _release(run, "label", v["video_id"])
        if error is not None and len(videos) == 1:
            videos[0] |= _quarantined(videos[0], "label", f"{type(error).__name__}: {error}")
        elif error is not None:
            for v in videos:
                self._label_group([v])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = []
        for r in rows:
            if r["status"] != "ok" or not r["before"]:
                continue  # quarantined upstream, or a video without pairs: passes through to the writer
            last = _deaths(self.cfg.out, "label", r["video_id"])
            if last["attempts"] >= self.cfg.max_attempts:
                r |= _quarantined(r, "label", _death_error("label", last))
            else:
                todo.append((r, last["attempts"]))
        if any(died for _, died in todo):  # this batch killed a worker before: one video at a time finds the culprit
            for r, _ in todo:
                self._label_group([r])
        elif todo:
            self._label_group([r for r, _ in todo])
        return pa.Table.from_pylist(rows, schema=VIDEO_SCHEMA)


# ---- stage 4: write (CPU tasks) -----------------------------------------------------------------------------
def _write_one(row: dict[str, Any], cfg: RelabelConfig) -> None:
    run = Path(cfg.out)
    if row["status"] != "ok":
        write_json(run / "quarantine" / f"{row['video_id']}.json",
                   {k: row[k] for k in ("video_id", "path", "error", "stage")})
        return
    info = json.loads(row["info"])
    base = {"path": row["path"], "decoder": info.get("decoder"), "frames": info.get("frames"),
            "strategy": cfg.keyframes.strategy, "image_size": cfg.image_size, "job": "relabel"}
    motion = info.get("motion", {})
    pairs = [make_row(row["video_id"], a, b, before, after, action, "pseudo", row["model_id"], score,
                      provenance={**base, "motion": [motion.get(str(a)), motion.get(str(b))]})
             for a, b, before, after, action, score in zip(row["frame_a"], row["frame_b"], row["before"], row["after"],
                                                           row["actions"], row["scores"])]
    buf = pa.BufferOutputStream()
    pq.write_table(to_table(pairs), buf)
    atomic_write_bytes(run / "shards" / f"{row['video_id']}.parquet", buf.getvalue().to_pybytes())
    (run / "quarantine" / f"{row['video_id']}.json").unlink(missing_ok=True)  # a retried video that now passed


def write_stage(batch: pa.Table, cfg: RelabelConfig) -> pa.Table:
    out = []
    for row in batch.to_pylist():
        t0 = time.perf_counter()
        try:
            _write_one(row, cfg)
        except Exception as err:  # e.g. disk full: record it; the shard is absent, so a rerun retries the video
            row = _quarantined(row, "write", f"{type(err).__name__}: {err}") | {"status": "failed"}
        out.append({"video_id": row["video_id"], "status": row["status"], "stage": row["stage"], "error": row["error"],
                    "pairs": len(row["actions"]), "decode_s": row["decode_s"], "label_s": row["label_s"],
                    "write_s": time.perf_counter() - t0})
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)
