"""The relabel job's config (jobs/relabel.py runs it and builds from it the params of each of its stages,
jobs/relabel_stages.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dynboot.config import Config
from dynboot.data.keyframes import KeyframeConfig
from dynboot.io.rundir import ResumeMode


class RelabelConfig(Config):
    """dynboot relabel: pseudo-label unlabelled videos with an IDP on Ray Data (see jobs/relabel.py)."""

    rerun_may_change: ClassVar[frozenset[str]] = frozenset({
        "ray_address", "num_cpus", "progress_s", "min_actors", "max_actors", "idp_cpus", "idp_gpus", "idp_threads",
        "decode_cpus", "write_cpus", "videos_per_task", "videos_per_batch", "batch_size", "rows_per_file",
        "pairs_per_video", "max_attempts", "io_attempts", "io_backoff_s", "max_errored_blocks", "retry_quarantined",
        "compact_every", "fault_injection"})

    videos: str = Field("runs/world/videos", description="Input, local or a URI (s3://, gs://, file://): a directory "
                        "(its manifest.jsonl, else every video under it; <class>/<video> folders give labels), a "
                        "JSONL or Parquet manifest ({path, video_id?, label?, dataset?, ...}), or a list file.")
    extensions: list[str] = Field([".mp4", ".avi", ".mov", ".mkv", ".webm"], description="Video files a directory listing picks.")
    out: str = Field("runs/relabel", description="Run directory, local or a URI (s3://bucket/run): workers write there.")
    model_path: str = Field("runs/idp/model", description="IDP checkpoint directory, local or a URI (fetched once per node).")
    backend: str = Field("tiny", description="Model backend ('' = read it from the checkpoint).")
    image_size: int = Field(0, ge=0, description="Side of the frames given to the IDP (0 = the model's input size, "
                            "read by loading the model once in the driver; set it for large models).")
    keyframes: KeyframeConfig = Field(default_factory=KeyframeConfig, description="Key-frame selection.")
    batch_size: int = Field(32, ge=1, description="Pairs per IDP forward call (fewer when the model states a token budget).")
    videos_per_batch: int = Field(4, ge=1, description="Videos per actor call; their pairs run batch_size at a time, "
                                  "so make it about batch_size / pairs per video (the world: 8 pairs).")
    min_actors: int = Field(1, ge=1, description="IDP actor pool: fewest actors.")
    max_actors: int = Field(1, ge=1, description="IDP actor pool: most actors (one per GPU on a cluster).")
    idp_cpus: float = Field(1.0, ge=0, description="CPUs reserved per IDP actor.")
    idp_gpus: float = Field(0.0, ge=0, description="GPUs per IDP actor (> 0 runs the model on CUDA).")
    idp_threads: int = Field(1, ge=1, description="torch threads per IDP actor (CPU inference).")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs reserved per decode task (decord decodes on one thread).")
    write_cpus: float = Field(0.25, gt=0, description="CPUs reserved per commit task.")
    videos_per_task: int = Field(8, ge=1, description="Videos per decode task: fewer, longer tasks spend less on Ray's "
                                 "per-task overhead; more, shorter ones spread over more CPUs.")
    rows_per_file: int = Field(160, ge=1, description="Pairs per Parquet file (whole videos; a partition is committed "
                               "as one). 160 gives ~80-256 MB files of 512^2 PNG pairs (0.5-1.6 MB a pair), the size "
                               "object stores and Parquet readers like; the world's 40^2 pairs are ~1 KB each.")
    pairs_per_video: int = Field(5, ge=1, description="Expected pairs per video, to size commit tasks: each takes "
                                 "rows_per_file / pairs_per_video videos (the paper's 6 key frames give 5; the world 8).")
    max_attempts: int = Field(2, ge=1, description="Worker deaths on one video before it is quarantined (worker_crashed).")
    io_attempts: int = Field(4, ge=1, description="Tries of a video fetch on transient I/O errors (exponential back-off) "
                             "before the video is reported retry_later.")
    io_backoff_s: float = Field(0.5, ge=0, description="First back-off of those retries (doubling each time).")
    max_errored_blocks: int = Field(10, ge=0, description="Ray Data blocks that may fail outright before the job "
                                    "aborts; their videos are reported as lost and retried by a rerun.")
    retry_quarantined: bool = Field(False, description="Retry videos whose latest commit quarantined them.")
    compact_every: int = Field(2000, ge=1, description="Videos per commit-index segment the driver writes as results "
                               "arrive (a rerun reads segments, not one record per partition).")
    resume: ResumeMode = Field("auto", description="auto: continue a run with the same config; force: continue "
                               "despite config changes; off: set the old run aside (local run directories).")
    ray_address: str = Field("", description="Ray cluster to join ('' = RAY_ADDRESS or a new local cluster).")
    num_cpus: int = Field(0, ge=0, description="Logical CPUs of a new local cluster (0 = all cores).")
    progress_s: float = Field(5.0, gt=0, description="Seconds between progress lines.")
    fault_injection: Literal["", "cuda_once", "stall_after_2_commits"] = Field(
        "", description="Tests only: cuda_once makes the first IDP call raise a CUDA device-side assert (once per run "
        "directory); stall_after_2_commits makes every commit after the second hang (a job to kill mid-run).")
