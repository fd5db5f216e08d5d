"""Score pseudo-labelled pairs against the embedded world's truth (`videos_truth.jsonl`).

    acc = pseudo_label_accuracy("runs/relabel", "runs/world/videos_truth.jsonl")
    acc["accuracy"], acc["per_type"]["move"]["accuracy"], acc["unmatched"]

A pseudo pair (video_id, frame_a, frame_b) matches the true action k of its video when frame_a lies in
key-state segment k and frame_b in segment k+1 (segments are the [start, end) frame ranges each key state
is held for). A matched pair is correct when its action equals the true action (case and spacing ignored).
Pairs that match no true transition (a frame in motion, two segments apart, an unknown video) are counted
as `unmatched`, never as errors of the labeller: they measure the key-frame selection instead.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dynboot.io import storage
from dynboot.io.partitions import committed_files

__all__ = ["pseudo_label_accuracy", "shard_files", "load_truth"]


def shard_files(path: str | Path) -> list[str]:
    """The Parquet files of a relabel/filter run directory (its committed files), a shard directory, or one file
    (dynboot.io.partitions.committed_files); local paths or URIs."""
    if not storage.exists(str(path)):
        raise FileNotFoundError(f"{path}: no such shard directory or Parquet file")
    return committed_files(str(path))


def load_truth(truth_jsonl: str | Path) -> dict[str, dict[str, Any]]:
    """video_id -> {"segments": [[start, end), ...], "actions": [...]} from videos_truth.jsonl."""
    truth = {}
    for n, line in enumerate(Path(truth_jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            truth[row["video_id"]] = {"segments": [tuple(s) for s in row["segments"]], "actions": list(row["actions"])}
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{truth_jsonl}:{n}: not a truth row ({type(err).__name__}: {err})") from None
    return truth


def _segment(segments: list[tuple[int, int]], starts: list[int], frame: int) -> int | None:
    k = bisect.bisect_right(starts, frame) - 1
    return k if k >= 0 and segments[k][0] <= frame < segments[k][1] else None


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def pseudo_label_accuracy(shards_dir: str | Path, truth_jsonl: str | Path) -> dict[str, Any]:
    """Overall and per-action-type accuracy of the pseudo labels under `shards_dir` (see module doc)."""
    truth = load_truth(truth_jsonl)
    starts = {v: [s for s, _ in t["segments"]] for v, t in truth.items()}
    pairs = matched = correct = type_correct = unknown_video = 0
    covered: set[tuple[str, int]] = set()
    per_type: dict[str, dict[str, int]] = defaultdict(lambda: {"matched": 0, "correct": 0})
    for f in shard_files(shards_dir):
        fs, inner = storage.resolve(f)
        table = pq.read_table(inner, filesystem=fs, columns=["video_id", "frame_a", "frame_b", "action"])
        for vid, a, b, action in zip(*(table.column(c).to_pylist() for c in ("video_id", "frame_a", "frame_b", "action"))):
            pairs += 1
            t = truth.get(vid)
            if t is None:
                unknown_video += 1
                continue
            ka, kb = _segment(t["segments"], starts[vid], a), _segment(t["segments"], starts[vid], b)
            if ka is None or kb != ka + 1:
                continue
            want = _norm(t["actions"][ka])
            kind = want.split()[0]
            matched += 1
            covered.add((vid, ka))
            per_type[kind]["matched"] += 1
            got = _norm(action)
            if got == want:
                correct += 1
                per_type[kind]["correct"] += 1
            type_correct += got.split()[:1] == [kind]
    transitions = sum(len(t["actions"]) for t in truth.values())
    return {
        "pairs": pairs,
        "matched": matched,
        "unmatched": pairs - matched,
        "unknown_video": unknown_video,
        "correct": correct,
        "accuracy": _ratio(correct, matched),  # of the pairs that match a true transition
        "accuracy_all_pairs": _ratio(correct, pairs),  # unmatched pairs counted as wrong
        "type_accuracy": _ratio(type_correct, matched),  # the verb alone (move / remove / add / swap)
        "transitions": transitions,
        "coverage": _ratio(len(covered), transitions),  # true transitions with at least one matching pair
        "per_type": {k: {**v, "accuracy": _ratio(v["correct"], v["matched"])} for k, v in sorted(per_type.items())},
    }
