"""The stages of the relabel job (jobs/relabel.py wires them into the Ray Data pipeline): what each one does to a
video row, the row schemas between them, and how a failure becomes a status.

A video row (VIDEO_SCHEMA) carries one video's pairs in list columns from stage 2 to stage 4. Its `status` says
what became of it; every stage catches its exceptions, so a bad video never fails a task:
  ok           pairs (at least one) to write
  quarantined  the video's own fault, for good: `reason` names it (missing, empty_file, unreadable, too_short,
               no_keyframes, too_large, bad_manifest_row, duplicate_id, worker_crashed, label_failed)
  retry_later  an I/O or network error that outlived its retries (storage.is_transient): nothing is committed,
               so the next run takes the video again
Stage 4 commits ok and quarantined videos in partitions (dynboot.io.partitions) and returns RESULT_SCHEMA rows.

Worker deaths (a native crash, an out-of-memory kill, an IDP actor that exits after a CUDA error) bypass
`except`, and Ray retries such tasks (actors restart) by itself. The attempt ledger (jobs/relabel_ledger.py)
bounds that: a batch that killed a worker is retried one video at a time, and a video that kills
`max_attempts` workers is quarantined as `worker_crashed` without being touched again.

Each stage takes only its own arguments, a small frozen params object (DecodeParams, LabelParams, WriteParams) that
the driver builds from its config (jobs/relabel.py): what a stage reads is in its signature, and a task ships only that.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from dynboot.io import storage
from dynboot.data.keyframes import KeyframeConfig, video_keyframes
from dynboot.data.pairs import make_row, to_table
from dynboot.data.video import VideoFault
from dynboot.io.partitions import commit_partition, load_index, partition_id
from dynboot.io.rundir import quarantine_row
from jobs.relabel_ledger import Ledger

Status = Literal["ok", "quarantined", "retry_later"]
Reason = Literal["missing", "empty_file", "unreadable", "too_short", "no_keyframes", "too_large", "bad_manifest_row",
                 "duplicate_id", "worker_crashed", "label_failed"]
VIDEO_SCHEMA = pa.schema([  # stages 2 -> 3 -> 4: one row per video
    ("video_id", pa.string()), ("path", pa.string()), ("dataset", pa.string()), ("label", pa.string()),
    ("meta", pa.string()), ("status", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
    ("error_class", pa.string()), ("error", pa.string()), ("attempts", pa.int64()),
    ("frame_a", pa.list_(pa.int64())), ("frame_b", pa.list_(pa.int64())), ("before", pa.list_(pa.binary())),
    ("after", pa.list_(pa.binary())), ("actions", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
    ("model_id", pa.string()), ("info", pa.string()),  # info: JSON list, each pair's key-frame provenance
    ("decode_s", pa.float64()), ("label_s", pa.float64()),
])
RESULT_SCHEMA = pa.schema([  # stage 4 -> driver: one small row per video, with the commit it went into
    ("video_id", pa.string()), ("status", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
    ("error_class", pa.string()), ("error", pa.string()), ("attempts", pa.int64()), ("pairs", pa.int64()),
    ("partition", pa.string()), ("data_file", pa.string()), ("quarantine_file", pa.string()),
    ("committed_at", pa.float64()), ("decode_s", pa.float64()), ("label_s", pa.float64()), ("write_s", pa.float64()),
])
_PAIR_LISTS = ("frame_a", "frame_b", "before", "after", "actions", "scores")


def fault_reason(err: BaseException) -> Reason:
    """The quarantine reason of a permanent decode failure."""
    if isinstance(err, VideoFault):  # empty_file, unreadable, too_short, no_keyframes, too_large
        return err.reason
    if isinstance(err, FileNotFoundError):
        return "missing"
    if isinstance(err, MemoryError):
        return "too_large"
    return "unreadable"


def _failed(row: dict[str, Any], status: Status, stage: str, err: BaseException | None, reason: str,
            attempts: int, message: str = "") -> dict[str, Any]:
    # the failure fields as every quarantine row spells them (commit_partition writes these rows' quarantine lines)
    q = quarantine_row(row["video_id"], stage, reason, err, error=message, attempts=attempts)
    return {**row, **{k: [] for k in _PAIR_LISTS}, "status": status,
            **{k: q[k] for k in ("stage", "reason", "error_class", "error", "attempts")}}


def quarantined(row, stage, reason, err=None, attempts=1, message=""):
    return _failed(row, "quarantined", stage, err, reason, attempts, message)


def retry_later(row, stage, err, attempts):
    return _failed(row, "retry_later", stage, err, "", attempts)


def worker_crashed(row: dict[str, Any], stage: str, last: dict[str, Any]) -> dict[str, Any]:
    return quarantined(row, stage, "worker_crashed", attempts=last["attempts"], message=(
        f"WorkerCrashed: the {stage} worker died {last['attempts']} time(s) while processing this video (native "
        f"crash, out-of-memory kill or device error; last pid {last.get('pid')} on {last.get('host')}); not retried"))


# ---- stage 2: decode + key frames (CPU tasks) ---------------------------------------------------------------
@dataclass(frozen=True)
class DecodeParams:
    """What the decode stage reads."""

    out: str  # run directory (URI): the attempt ledger lives there
    keyframes: KeyframeConfig
    image_size: int  # side of the PNG frames (resolved by the driver: never 0 here)
    max_attempts: int  # worker deaths on one video before it is quarantined as worker_crashed
    io_attempts: int  # tries of a fetch on transient I/O errors
    io_backoff_s: float  # first back-off of those tries (doubling)


def _video_row(item: dict[str, Any]) -> dict[str, Any]:
    return {"video_id": item["video_id"], "path": item["path"], "dataset": item["dataset"], "label": item["label"],
            "meta": item["meta"], "status": "ok", "stage": "", "reason": "", "error_class": "", "error": "",
            "attempts": 0, **{k: [] for k in _PAIR_LISTS}, "model_id": "", "info": "[]", "decode_s": 0.0,
            "label_s": 0.0}


def _decode_one(item: dict[str, Any], params: DecodeParams) -> dict[str, Any]:
    row = _video_row(item)
    if item["error"]:  # a malformed manifest row, or an id another video holds
        reason = "duplicate_id" if item["error"].startswith("duplicate_id") else "bad_manifest_row"
        return quarantined(row, "manifest", reason, message=item["error"])
    tries = 0

    def fetch_and_decode():  # an object is fetched to a local temp file first; I/O errors propagate as OSErrors
        nonlocal tries
        tries += 1
        return video_keyframes(item["path"], params.keyframes, params.image_size)

    t0 = time.perf_counter()
    try:
        kf = storage.retry(fetch_and_decode, attempts=params.io_attempts, base_s=params.io_backoff_s, what=item["path"])
    except Exception as err:  # the video's own fault, or I/O that stayed down: never the job's
        row = retry_later(row, "decode", err, tries) if storage.is_transient(err) else \
            quarantined(row, "decode", fault_reason(err), err, tries)
    else:
        if not kf.pairs:  # never counted as done silently (video_keyframes raises no_keyframes itself: a safety net)
            row = quarantined(row, "decode", "no_keyframes", attempts=tries, message=(
                f"no_keyframes: {len(kf.indices)} key frame(s) in {kf.frames} frames ({params.keyframes.strategy}): "
                "no pair to label"))
        else:
            row |= {"frame_a": [a for a, _ in kf.pairs], "frame_b": [b for _, b in kf.pairs],
                    "before": [kf.images[a] for a, _ in kf.pairs], "after": [kf.images[b] for _, b in kf.pairs],
                    "attempts": tries, "info": json.dumps([kf.pair_provenance(a, b) for a, b in kf.pairs])}
    row["decode_s"] = time.perf_counter() - t0
    return row


def decode_stage(batch: pa.Table, params: DecodeParams) -> pa.Table:
    ledger = Ledger(params.out, "decode", params.max_attempts)
    rows = ledger.run(batch.to_pylist(), lambda items: [_decode_one(it, params) for it in items],
                      crashed=lambda item, last: worker_crashed(_video_row(item), "decode", last))
    return pa.Table.from_pylist(rows, schema=VIDEO_SCHEMA)


# ---- stage 3: IDP labelling (actor pool) --------------------------------------------------------------------
@dataclass(frozen=True)
class LabelParams:
    """What the IDP actors read."""

    out: str  # run directory (URI): the attempt ledger (and the cuda_once marker) live there
    model_path: str  # IDP checkpoint, local or a URI (fetched once per node)
    backend: str  # model backend ('' = read it from the checkpoint)
    device: Literal["cpu", "cuda"]  # cuda when each actor reserves a GPU
    threads: int  # torch threads per actor
    batch_size: int  # pairs per forward call (fewer when the model states a token budget)
    max_attempts: int  # worker deaths on one video before it is quarantined as worker_crashed
    cuda_fault_once: bool = False  # tests only (fault_injection=cuda_once): the first IDP call of a run fails


class IDPLabeler:
    """Stateful actor: loads the IDP once (a model on object storage is fetched once per node), then captions and
    scores the pairs of each batch of videos. A device error ends the actor process: Ray restarts it on a fresh
    context and retries the batch (one video at a time, so a culprit is found and charged)."""

    def __init__(self, params: LabelParams):
        import torch

        from dynboot.models.registry import load_model

        torch.set_num_threads(params.threads)  # one actor = `threads` cores; oversubscribing slows all stages
        self.params = params
        self.model = load_model(storage.local_model_dir(params.model_path), params.backend or None,
                                device=params.device).eval()
        self.ledger = Ledger(params.out, "label", params.max_attempts)

    def _chunk(self) -> int:
        """Pairs per forward: batch_size, or fewer where the model's token budget holds fewer captions."""
        return max(1, min(self.params.batch_size, self.model.rows_per_forward("caption")))

    def _caption_and_score(self, before, after) -> tuple[list[str], list[float]]:
        if self.params.cuda_fault_once:
            marker = storage.join(self.params.out, "_fault_cuda_once")
            if not storage.exists(marker):
                storage.write_text(marker, f"pid {os.getpid()}\n")
                raise RuntimeError("CUDA error: device-side assert triggered (fault_injection=cuda_once)")
        # one forward per pair: the captions' own greedy decoding steps give their mean log-prob (issue 17)
        captions, logp = self.model.caption_scored(before, after)
        return list(captions), [float(s) for s in logp]

    def _label(self, videos: list[dict[str, Any]]) -> None:
        import numpy as np

        from dynboot.io.images import decode_image

        before = [b for v in videos for b in v["before"]]
        after = [a for v in videos for a in v["after"]]
        actions, scores, step = [], [], self._chunk()
        t0 = time.perf_counter()
        for i in range(0, len(before), step):
            b = np.stack([decode_image(x) for x in before[i:i + step]])
            a = np.stack([decode_image(x) for x in after[i:i + step]])
            captions, logp = self._caption_and_score(b, a)
            actions += captions
            scores += logp
        per_pair = (time.perf_counter() - t0) / max(1, len(before))
        for v in videos:
            n = len(v["before"])
            v |= {"actions": actions[:n], "scores": scores[:n], "model_id": self.model.model_id, "label_s": per_pair * n}
            actions, scores = actions[n:], scores[n:]

    def _label_group(self, videos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Label `videos` together; a Python error retries them one by one, so one bad video is the only loss."""
        try:
            self._label(videos)
            return videos
        except Exception as err:
            from dynboot.method.devices import is_device_fault  # torch: imported in the actor only, not the CPU stages

            if is_device_fault(err):
                print(f"[relabel] IDP actor pid {os.getpid()}: {type(err).__name__}: {err}; exiting so that Ray "
                      "restarts it on a fresh device context", file=sys.stderr, flush=True)
                os._exit(3)  # a crash to Ray (exit_actor would be a deliberate exit: no restart); ledger stays claimed
            if len(videos) == 1:
                return [quarantined(videos[0], "label", "label_failed", err, videos[0]["attempts"])]
            return [out for v in videos for out in self._label_group([v])]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["status"] == "ok"]
        labelled = {r["video_id"]: r for r in self.ledger.run(
            todo, self._label_group, crashed=lambda r, last: worker_crashed(r, "label", last))}
        out = [labelled.get(r["video_id"], r) if r["status"] == "ok" else r for r in rows]
        return pa.Table.from_pylist(out, schema=VIDEO_SCHEMA)


# ---- stage 4: commit partitions (CPU tasks) -----------------------------------------------------------------
@dataclass(frozen=True)
class WriteParams:
    """What the commit stage reads."""

    out: str  # run directory (URI): partitions and their commit records go there
    rows_per_file: int  # pairs per Parquet file (whole videos)
    image_size: int  # side of the frames, recorded in each pair's provenance
    stall_after_2_commits: bool = False  # tests only (fault_injection=stall_after_2_commits): later commits hang


def _pair_rows(row: dict[str, Any], image_size: int) -> list[dict[str, Any]]:
    base = {"path": row["path"], "image_size": image_size, "job": "relabel", "meta": json.loads(row["meta"] or "{}")}
    return [make_row(row["video_id"], a, b, before, after, action, "pseudo", row["model_id"], score,
                     provenance={**base, **pair}, dataset=row["dataset"], label=row["label"])
            for a, b, before, after, action, score, pair in zip(*(row[k] for k in _PAIR_LISTS), json.loads(row["info"]))]


def _groups(rows: list[dict[str, Any]], rows_per_file: int) -> list[list[dict[str, Any]]]:
    """Whole videos, in order, in groups of at most `rows_per_file` pairs (a larger video is a group alone)."""
    groups: list[list[dict[str, Any]]] = [[]]
    pairs = 0
    for r in rows:
        n = len(r["actions"])
        if n and pairs and pairs + n > rows_per_file:
            groups.append([])
            pairs = 0
        groups[-1].append(r)
        pairs += n
    return [g for g in groups if g]


def _result(row: dict[str, Any], record: dict[str, Any] | None, write_s: float) -> dict[str, Any]:
    rec = record or {}
    return {"video_id": row["video_id"], "status": row["status"], "stage": row["stage"], "reason": row["reason"],
            "error_class": row["error_class"], "error": row["error"], "attempts": row["attempts"],
            "pairs": len(row["actions"]) if row["status"] == "ok" else 0, "partition": rec.get("partition", ""),
            "data_file": rec.get("data_file", "") if row["status"] == "ok" else "",
            "quarantine_file": rec.get("quarantine_file", "") if row["status"] == "quarantined" else "",
            "committed_at": rec.get("committed_at", 0.0), "decode_s": row["decode_s"], "label_s": row["label_s"],
            "write_s": write_s}


def write_stage(batch: pa.Table, params: WriteParams) -> pa.Table:
    """Commit the batch's ok and quarantined videos in partitions; report every video."""
    rows = batch.to_pylist()
    out = [_result(r, None, 0.0) for r in rows if r["status"] == "retry_later"]
    for group in _groups([r for r in rows if r["status"] != "retry_later"], params.rows_per_file):
        t0 = time.perf_counter()
        ok = [r for r in group if r["status"] == "ok"]
        bad = [r for r in group if r["status"] == "quarantined"]
        if params.stall_after_2_commits and len(set(load_index(params.out)["partition"].to_pylist())) >= 2:
            time.sleep(3600)  # until the test kills the job: a kill that lands mid-run however fast the machine is
        try:
            table = to_table([p for r in ok for p in _pair_rows(r, params.image_size)]) if ok else None
            record = commit_partition(params.out, partition_id(r["video_id"] for r in group), table,
                                      bad, [{**r, "pairs": len(r["actions"])} for r in group])
        except Exception as err:  # storage that stayed down, a full disk: not the videos' fault, so not quarantined
            group = [retry_later(r, "write", err, 1) for r in group]
            record = None
        write_s = (time.perf_counter() - t0) / len(group)
        out += [_result(r, record, write_s) for r in group]
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)
