"""Gold pairs from a clip dataset labelled by first / last frame (dynboot.data.clip_pairs), as `dynboot train` reads them.

    python -m jobs.clip_pairs manifest=/data/epic/EPIC_100_train.csv videos=/data/epic/videos extension=.MP4 \\
        columns.video=video_id columns.start=start_timestamp columns.end=stop_timestamp columns.label=narration \\
        out=s3://bucket/epic_pairs
    dynboot train ... 'data=[/data/AURORA, {path: s3://bucket/epic_pairs, weight: 15000}]'

Writes the run directory (dynboot.io.rundir): `<out>/pairs-NNNNN.parquet` (pair rows, source gold),
`<out>/quarantine/clips.jsonl` (every clip that gave no pair: its manifest line, video and reason), config.yaml,
metrics.jsonl and summary.json. A rerun rewrites every file, so it must have the recorded config (resume=).
"""

from __future__ import annotations

from pydantic import Field

from dynboot.cli import job_main
from dynboot.data.clip_pairs import ClipColumns, TimeUnit, write_clip_pairs
from dynboot.config import Config
from dynboot.io import storage
from dynboot.io.rundir import ResumeMode, RunDir


class ColumnsConfig(Config):
    """Which manifest columns hold what (EPIC-Kitchens: video_id, start_timestamp, stop_timestamp, narration)."""

    video: str = Field("video", description="Column of the video (a path relative to `videos`, or absolute / a URI).")
    start: str = Field("start", description="Column of the clip's start (seconds, HH:MM:SS.ff, or a frame index).")
    end: str = Field("end", description="Column of the clip's end.")
    label: str = Field("label", description="Column of the action label.")


class ClipPairsConfig(Config):
    """Pairs (first frame, last frame, label) of a clip manifest (CSV with a header, or JSONL)."""

    manifest: str = Field(..., description="CSV or JSONL manifest (path or URI).")
    out: str = Field(..., description="Output directory (path or URI).")
    videos: str = Field("", description="Root the manifest's video paths are relative to (empty: the manifest's folder).")
    extension: str = Field("", description="Appended to video names that lack it (EPIC: .MP4).")
    unit: TimeUnit = Field("seconds", description="start / end are seconds (or timestamps) or frame indices.")
    dataset: str = Field("", description="Dataset name recorded in provenance (empty: the manifest's folder name).")
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig, description="Manifest columns.")
    rows_per_file: int = Field(1024, ge=1, description="Pair rows per Parquet file.")
    workers: int = Field(4, ge=1, description="Videos decoded at a time (threads: the decoders release the GIL).")
    resume: ResumeMode = Field("auto", description="auto: a rerun (it rewrites every file) must have the recorded "
                               "config; force: even if it differs; off: set the old run's files aside first.")


def run(cfg: ClipPairsConfig) -> dict:
    c = cfg.columns
    earlier = tuple(storage.name(p) for p in storage.list_files(cfg.out, recursive=False, suffixes=(".parquet",))
                    ) if cfg.resume == "off" else ()  # what resume=off sets aside; nothing to list otherwise
    with RunDir(cfg.out).open(cfg, resume=cfg.resume, set_aside=("quarantine", *earlier)) as rd:
        summary = write_clip_pairs(cfg.manifest, rd.uri_root, ClipColumns(c.video, c.start, c.end, c.label),
                                   rows_per_file=cfg.rows_per_file, video_root=cfg.videos or None,
                                   extension=cfg.extension, unit=cfg.unit, dataset=cfg.dataset, workers=cfg.workers)
    print(f"clip pairs: {summary['pairs']} pairs in {summary['files']} files, {summary['quarantined']} clips "
          f"quarantined {summary['reasons']} -> {cfg.out}")
    return summary


if __name__ == "__main__":
    raise SystemExit(job_main(ClipPairsConfig, run, doc=__doc__))
