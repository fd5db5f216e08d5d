"""Gold pairs from clip datasets labelled by their first and last frame (the paper's 15K EPIC-Kitchens pairs:
the verb-noun narration of a clip is the action between its first and last frame).

    rows, problems = clip_pairs("epic/clips.csv", ClipColumns(video="video_id", start="start_timestamp",
                                end="stop_timestamp", label="narration"), video_root="epic/videos", extension=".MP4")
    write_clip_pairs("epic/clips.csv", "s3://bucket/epic_pairs", ...)    # pair files, quarantine, metrics, summary

- The manifest is a CSV (header row) or JSONL file (local or a URI) with one clip per row: the video, the clip's
  start and end, and its label; other columns ride along in the row's provenance.
- start / end are seconds (`12.5`), timestamps (`00:01:02.50`, EPIC's spelling) or, with `unit="frames"`, frame
  indices. The first frame at or after `start` and the last frame at or before `end` are the pair (`before`,
  `after`); the label is the action. A clip whose end is not after its start, a video that cannot be read, a clip
  outside the video, an empty label: a quarantine row (dynboot.io.rundir.quarantine_row: its input the clip's
  manifest line, its path the video, its reason a `ClipFault`), so every clip is a pair or a reason.
- Frames are fetched by index (seeking; never the whole video), one video open at a time per worker thread;
  videos on object storage are copied to a local temp file first (decoders read files).
- Rows are in the pair schema (dynboot.data.pairs, source "gold", id `<video id>:<first>:<last>`), so `dynboot train`
  reads the output directory as a Parquet source.
"""

from __future__ import annotations

import csv
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import pyarrow.parquet as pq

from dynboot.io import storage
from dynboot.io.images import encode_png
from dynboot.io.rundir import RunDir, quarantine_row
from dynboot.data.video import open_video
from dynboot.data.manifest import video_id_of
from dynboot.data.pairs import make_row, to_table

__all__ = ["ClipColumns", "read_clip_manifest", "clip_pairs", "write_clip_pairs", "parse_time"]

TimeUnit = Literal["seconds", "frames"]
ClipFault = Literal["no_video", "bad_time", "empty_span", "outside_video", "empty_label", "video_not_found",
                    "unreadable_video", "undecodable_frame"]
_TIMESTAMP = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")


@dataclass(frozen=True)
class ClipColumns:
    """Which manifest columns hold the video, the clip's start and end, and its label."""

    video: str = "video"
    start: str = "start"
    end: str = "end"
    label: str = "label"


def parse_time(value: Any) -> float:
    """Seconds from `12.5`, `"12.5"`, `"01:02.5"` or `"00:01:02.50"`; ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    m = _TIMESTAMP.match(text)
    if m:
        hours, minutes, seconds = m.groups()
        return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a time: {value!r} (seconds, or HH:MM:SS.ff)") from None


def read_clip_manifest(uri: str) -> list[dict[str, Any]]:
    """The rows of a CSV (with a header) or JSONL manifest."""
    text = storage.read_text(uri)
    if uri.lower().endswith(".json"):
        return list(json.loads(text))
    if uri.lower().endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(io.StringIO(text)))


def _frames(path: str, indices: list[int]) -> tuple[dict[int, Any], int, float]:
    """({index: RGB frame} for the wanted indices that exist, frame count, fps), seeking, one frame at a time."""
    src = open_video(path)  # the bounded-memory frame source (decord, else PyAV): seeks, one frame at a time
    n = src.info.frames
    wanted = sorted({i for i in indices if 0 <= i < n}) if n else sorted(set(indices))
    return dict(src.frames(wanted)), n, src.info.fps


def _with_extension(value: str, extension: str) -> str:
    return value if not extension or value.lower().endswith(extension.lower()) else value + extension


def _video_uri(value: str, manifest: str, video_root: str | None, extension: str) -> str:
    name = _with_extension(value, extension)
    if storage.is_uri(name) or name.startswith("/"):
        return name
    return storage.join(video_root or storage.parent(manifest), name)


def _problem(line: int, video: str, reason: ClipFault, msg: str, err: BaseException | None = None) -> dict:
    return quarantine_row(line, "clip_pairs", reason, err, path=video, error=msg[:300])


def _clip_rows(video: str, vid: str, clips: list[tuple[int, dict]], cols: ClipColumns, unit: TimeUnit, dataset: str,
               manifest: str) -> tuple[list[dict], list[dict]]:
    """Pair rows and quarantine rows of one video's clips (`vid`: the video's id in pair ids)."""
    rows, problems = [], []

    def bad(line: int, reason: ClipFault, msg: str, err: BaseException | None = None) -> None:
        problems.append(_problem(line, video, reason, msg, err))

    try:
        with storage.local_copy(video) as local:
            _, n, fps = _frames(local, [0])
            spans = []
            for line, rec in clips:
                try:
                    start, end = parse_time(rec.get(cols.start)), parse_time(rec.get(cols.end))
                except ValueError as err:
                    bad(line, "bad_time", str(err), err)
                    continue
                a, b = (int(start), int(end)) if unit == "frames" else (int(-(-start * fps // 1)), int(end * fps // 1))
                if b <= a:
                    bad(line, "empty_span", f"clip end ({rec.get(cols.end)}) is not after its start ({rec.get(cols.start)})")
                elif a >= n or b < 0:
                    bad(line, "outside_video", f"clip frames {a}..{b} are outside the video's {n} frames")
                elif not str(rec.get(cols.label) or "").strip():
                    bad(line, "empty_label", f"empty label (column {cols.label!r})")
                else:
                    spans.append((line, rec, a, min(b, n - 1)))
            frames, _, _ = _frames(local, [i for _, _, a, b in spans for i in (a, b)])
    except FileNotFoundError as err:
        return [], [_problem(line, video, "video_not_found", str(err), err) for line, _ in clips]
    except Exception as err:  # a video neither decoder can read: its clips' reason, not the job's end
        if storage.is_transient(err):
            raise
        return [], [_problem(line, video, "unreadable_video", f"{type(err).__name__}: {err}", err) for line, _ in clips]
    for line, rec, a, b in spans:
        if a not in frames or b not in frames:
            bad(line, "undecodable_frame", f"frame {a if a not in frames else b} could not be decoded")
            continue
        extra = {k: v for k, v in rec.items() if k not in (cols.video, cols.start, cols.end, cols.label)}
        prov = {"manifest": manifest, "row": line, "video": video, "start": rec.get(cols.start),
                "end": rec.get(cols.end), "dataset": dataset, "fps": fps, **extra}
        rows.append(make_row(vid, a, b, encode_png(frames[a]), encode_png(frames[b]), str(rec[cols.label]).strip(),
                             "gold", provenance=prov))
    return rows, problems


def clip_pairs(manifest: str, columns: ClipColumns = ClipColumns(), video_root: str | None = None,
               extension: str = "", unit: TimeUnit = "seconds", dataset: str = "", workers: int = 4
               ) -> Iterator[tuple[list[dict], list[dict]]]:
    """(pair rows, quarantine rows) per video of the manifest (module doc), in manifest order of first mention."""
    by_video: dict[str, list[tuple[int, dict]]] = {}
    ids: dict[str, str] = {}  # video URI -> id: from the path as the manifest spells it (with its extension)
    missing = []
    for line, rec in enumerate(read_clip_manifest(manifest), start=1):
        value = rec.get(columns.video)
        if not value:
            missing.append(_problem(line, "", "no_video", f"no {columns.video!r} column value"))
            continue
        uri = _video_uri(str(value), manifest, video_root, extension)
        ids.setdefault(uri, video_id_of(_with_extension(str(value), extension)))
        by_video.setdefault(uri, []).append((line, rec))
    if missing:
        yield [], missing
    name = dataset or storage.name(storage.parent(manifest))
    with ThreadPoolExecutor(max(1, workers)) as pool:  # decoders release the GIL
        yield from pool.map(lambda kv: _clip_rows(kv[0], ids[kv[0]], kv[1], columns, unit, name, manifest),
                            by_video.items())


def write_clip_pairs(manifest: str, out: str, columns: ClipColumns = ClipColumns(), rows_per_file: int = 1024,
                     **kw) -> dict:
    """`clip_pairs` written under the run directory `out`: `pairs-NNNNN.parquet` (each published whole),
    `quarantine/clips.jsonl`, `metrics.jsonl` (a row per file published, and the totals), `summary.json` (pairs,
    clips quarantined and why). The job (jobs/clip_pairs.py) opens `out` first: lock and config.yaml."""
    run = RunDir(out)
    buffer, problems, files, pairs = [], [], 0, 0

    def flush() -> None:
        nonlocal buffer, files
        if buffer:
            data = io.BytesIO()
            pq.write_table(to_table(buffer), data, row_group_size=64)
            storage.write_bytes(run.uri(f"pairs-{files:05d}.parquet"), data.getvalue())
            files += 1
            buffer = []
            run.log(files=files, pairs=pairs, quarantined=len(problems))

    for rows, bad in clip_pairs(manifest, columns, **kw):
        buffer += rows
        pairs += len(rows)
        problems += bad
        if len(buffer) >= rows_per_file:
            flush()
    flush()
    storage.write_text(run.uri("quarantine", "clips.jsonl"), "".join(json.dumps(p) + "\n" for p in problems))
    reasons: dict[str, int] = {}
    for p in problems:
        reasons[p["reason"]] = reasons.get(p["reason"], 0) + 1
    summary = {"manifest": manifest, "pairs": pairs, "files": files, "quarantined": len(problems), "reasons": reasons}
    run.log(stage="clip_pairs", **{k: summary[k] for k in ("pairs", "files", "quarantined")})
    run.write_summary(summary)
    return summary
