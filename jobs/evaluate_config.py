"""The eval job's config (jobs/evaluate.py): what is evaluated, how best-of-N ranks, the judge, the resources."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dynboot.config import Config
from dynboot.io.rundir import ResumeMode
from dynboot.method.predict import BestOfNs
from dynboot.method.verify import Verifier

__all__ = ["AURORA_SUBSETS"]

AURORA_SUBSETS = ["magicbrush", "ag", "something", "whatsup", "kubric"]  # the 5 with targets (paper §5.1)


class EvalConfig(Config):
    """dynboot eval: FDP best-of-N + IDP over a world test split or Aurora-Bench."""

    # what a rerun may change: which items, the judge, and how the work is spread; not what is predicted
    rerun_may_change: ClassVar[frozenset[str]] = frozenset({
        "limit", "subsets", "judge", "judge_model", "judge_base_url", "judge_api_key_env", "judge_concurrency",
        "judge_max_retries", "judge_backoff_s", "judge_cache", "relabel_dir", "truth", "use_ray", "actors",
        "actor_cpus", "actor_gpus", "device", "threads", "batch_size", "grid_examples"})

    data: str = Field("runs/world/test", description="World test dir (or its test.json), or an AURORA-format test.json.")
    mode: Literal["auto", "world", "aurora"] = Field("auto", description="auto: world when truth.jsonl sits beside test.json.")
    fdp_path: str = Field("", description="FDP checkpoint dir; empty = no FDP evaluation.")
    idp_path: str = Field("", description="IDP checkpoint dir (verifier + captions); empty = no IDP, N=1 only.")
    backend: str = Field("", description="Backend name; empty = read from each checkpoint's dynboot.json.")
    n: BestOfNs = Field([1, 2, 4, 8], description="Best-of-N values; max(n) samples per item, reused by every N.")
    temperature: float = Field(1.0, ge=0, description="FDP sampling temperature (paper: 1).")
    top_k: int = Field(0, ge=0, description="FDP top-k (0 = off).")
    seed: int = Field(0, description="Sampling seed; item i samples with seed + i.")
    greedy: bool = Field(True, description="Also evaluate one greedy (temperature 0) FDP sample per item.")
    verifier: Verifier = Field(default_factory=Verifier, description="How best-of-N ranks candidates "
                               "(dynboot.method.verify): score=idp (the paper), fdp, idp+fdp (also sees over-editing), idp+edit.")
    batch_size: int = Field(8, ge=1, description="Items per predictor call.")
    limit: int = Field(0, ge=0, description="Evaluate only the first `limit` items (0 = all).")
    subsets: list[str] = Field(AURORA_SUBSETS, description="Aurora tasks to evaluate (empty = all).")
    judge: bool = Field(True, description="Aurora: judge FDP edits with the LLM judge.")
    judge_model: str = Field("gpt-4o-2024-11-20", description="Judge model name.")
    judge_base_url: str = Field("", description="OpenAI-compatible base URL; empty = api.openai.com.")
    judge_api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the judge API key.")
    judge_concurrency: int = Field(4, ge=1, description="Judge requests in flight.")
    judge_max_retries: int = Field(6, ge=0, description="Retries on 429 / 5xx / connection errors (exponential back-off).")
    judge_backoff_s: float = Field(1.0, gt=0, description="First retry delay; doubles each retry.")
    judge_cache: str = Field("", description="Judge reply cache (JSONL); empty = <out>/judge_cache.jsonl.")
    relabel_dir: str = Field("", description="A relabel run's shards dir: score its pseudo-labels against `truth`.")
    truth: str = Field("", description="videos_truth.jsonl for relabel_dir.")
    out: str = Field("runs/eval", description="Run directory.")
    use_ray: bool = Field(True, description="Run prediction as a Ray Data job (false: in this process).")
    actors: int = Field(1, ge=1, description="Max predictor actors (each holds the FDP and IDP).")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs per predictor actor (fractional on small machines).")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per predictor actor.")
    device: str = Field("cpu", description="Torch device inside the predictor.")
    threads: int = Field(1, ge=0, description="Torch intra-op threads per predictor (0 = torch default); >1 on a "
                         "busy small CPU box oversubscribes it (measured 100x slower sampling).")
    grid_examples: int = Field(6, ge=0, description="Items shown in grid.png.")
    resume: ResumeMode = Field("auto", description="auto: a rerun predicts only the items not yet predicted (its "
                               "config must match the recorded one, but for the fields a rerun may change); force: "
                               "even if it differs; off: set the old predictions aside and start over.")
