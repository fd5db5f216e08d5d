"""Typed settings of the best-of-N Serve app: what `build_app(args)` accepts and `dynboot serve` extends.

    AppArgs.model_validate(args)            # the `args:` of serve/config.yaml, or ServeConfig's app fields
    args.generator.serve_options()          # -> Deployment.options(**...) for one tier

Each tier (generator = FDP, verifier = IDP, ingress) carries its own replicas, autoscaling, resources
and queue limits, so changing one scales that tier alone. In `serve/config.yaml` the same numbers sit in
the Serve-native `deployments:` section (which overrides what the builder sets); a test keeps the two
equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dynboot.config import Config

GENERATOR, VERIFIER, INGRESS = "Generator", "Verifier", "BestOfNIngress"


class Autoscaling(Config):
    """Ray Serve `autoscaling_config` for one deployment."""

    min_replicas: int = Field(1, ge=0, description=(
        "Fewest replicas (0 allows scale to zero; the first request then waits for a cold start)."))
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must stay high this long before adding replicas.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Load must stay low this long before removing replicas.")
    look_back_period_s: float = Field(15.0, gt=0, description=(
        "Window over which ongoing requests are averaged (must exceed the 10 s metrics push interval)."))

    @model_validator(mode="after")
    def _order(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class DeploymentOptions(Config):
    """Resources, queue limits and autoscaling of one tier."""

    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica (fractional on small boxes).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 for a 7B model on a GPU node).")
    max_ongoing_requests: int = Field(8, ge=1, description=(
        "Requests in flight per replica; >= the tier's max_batch_size so batches can fill."))
    max_queued_requests: int = Field(32, ge=-1, description=(
        "Requests queued per caller before new ones get 429 (-1 = unbounded)."))
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After header (seconds) sent with a 429.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica autoscaling.")

    def serve_options(self) -> dict:
        """Keyword arguments for `Deployment.options(...)` (the shape of a config.yaml `deployments:` entry)."""
        actor = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        return {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 429, "retry_after_s": self.retry_after_s},
            "autoscaling_config": self.autoscaling.model_dump(),
            "ray_actor_options": actor,
        }


class BatchOptions(Config):
    """`@serve.batch` settings of one model tier."""

    max_batch_size: int = Field(8, ge=1, description="Most requests merged into one model call.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a partial batch waits for more requests.")


# Each tier's defaults; a partial override (`verifier.num_cpus=1`, or `verifier: {num_cpus: 1}` in args) is
# merged onto the field's default (these, or a subclass's), not onto the bare DeploymentOptions defaults.
TIER_DEFAULTS: dict[str, dict] = {
    "generator": {"num_cpus": 0.5, "max_ongoing_requests": 8, "max_queued_requests": 32,
                  "autoscaling": {"target_ongoing_requests": 2.0}},
    "verifier": {"num_cpus": 0.5, "max_ongoing_requests": 16, "max_queued_requests": 64,
                 "autoscaling": {"target_ongoing_requests": 4.0}},
    "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 64, "max_queued_requests": 256,
                "autoscaling": {"target_ongoing_requests": 16.0}},
    "generator_batch": {"max_batch_size": 8},
    "verifier_batch": {"max_batch_size": 16},
}


def merged(base: dict, extra: dict) -> dict:
    """`extra` over `base`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _tier_help(name: str) -> str:
    return f" Its defaults are TIER_DEFAULTS['{name}'] in serve/schemas.py (--help lists the generic ones)."


class AppArgs(Config):
    """Arguments of `serve.app:build_app`: checkpoints, request limits, auth, and each tier's settings."""

    generator_path: str = Field("", description=(
        "FDP checkpoint directory (Hugging Face layout, read by dynboot.models.registry.load_model)."))
    verifier_path: str = Field("", description=(
        "IDP checkpoint directory (the verifier; may be the same checkpoint as the generator)."))
    model_name: str = Field("dynboot-best-of-n", description="Model id reported by /v1/models and in responses.")
    max_n: int = Field(16, ge=1, le=256, description="Largest n (candidates per request) accepted.")
    default_n: int = Field(4, ge=1, description="n when the request does not give one.")
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024, description=(
        "Largest encoded image accepted (bytes); bodies are capped at 2x this + 64 KiB."))
    max_image_pixels: int = Field(2048 * 2048, ge=1, description="Largest width x height accepted (checked before decoding).")
    image_formats: list[str] = Field(["PNG", "JPEG", "WEBP"], description="Accepted encodings (PIL format names).")
    max_prompt_chars: int = Field(1000, ge=1, description="Longest action text accepted.")
    api_token_env: str = Field("DYNBOOT_API_TOKEN", description=(
        "Env var holding the bearer token; when set and non-empty in the process that builds the app, "
        "/v1/* requires `Authorization: Bearer <token>`."))
    candidate_transport: Literal["auto", "codes", "png"] = Field("auto", description=(
        "How candidates reach the verifier: image codes (compact; needs both models on one tokenizer), "
        "PNG bytes, or auto (codes when the tokenizers match)."))
    replica_retries: int = Field(2, ge=0, description=(
        "Times the ingress retries a model call whose replica died mid-request (sampling is idempotent)."))
    request_timeout_s: float = Field(120.0, gt=0, description="Longest a model call may take before the request gets 504.")
    generator_batch: BatchOptions = Field(
        default_factory=lambda: BatchOptions(**TIER_DEFAULTS["generator_batch"]),
        description="@serve.batch of the generator (seedless requests with equal n/temperature/top_k share one "
                    "sample call)." + _tier_help("generator_batch"))
    verifier_batch: BatchOptions = Field(
        default_factory=lambda: BatchOptions(**TIER_DEFAULTS["verifier_batch"]),
        description="@serve.batch of the verifier (scoring calls of concurrent requests share one forward "
                    "pass)." + _tier_help("verifier_batch"))
    generator: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions.model_validate(TIER_DEFAULTS["generator"]),
                                         description="Generator (FDP) tier." + _tier_help("generator"))
    verifier: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions.model_validate(TIER_DEFAULTS["verifier"]),
                                        description="Verifier (IDP) tier." + _tier_help("verifier"))
    ingress: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions.model_validate(TIER_DEFAULTS["ingress"]),
        description="HTTP ingress tier (parsing, validation, best-of-N orchestration)." + _tier_help("ingress"))

    @model_validator(mode="before")
    @classmethod
    def _tier_overrides_merge_onto_tier_defaults(cls, data):
        if isinstance(data, dict):
            data = {k: merged(cls.model_fields[k].get_default(call_default_factory=True).model_dump(), v)
                    if k in TIER_DEFAULTS and isinstance(v, dict) else v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "AppArgs":
        if self.default_n > self.max_n:
            raise ValueError(f"default_n ({self.default_n}) > max_n ({self.max_n})")
        for tier, batch in (("generator", self.generator_batch), ("verifier", self.verifier_batch)):
            ongoing = getattr(self, tier).max_ongoing_requests
            if ongoing < batch.max_batch_size:
                raise ValueError(f"{tier}.max_ongoing_requests ({ongoing}) < {tier}_batch.max_batch_size "
                                 f"({batch.max_batch_size}): batches could never fill")
        return self

    def check_paths(self) -> None:
        """Name a missing checkpoint before any replica starts."""
        for key in ("generator_path", "verifier_path"):
            value = getattr(self, key)
            if not value:
                raise ValueError(f"{key} is not set: pass {key}=DIR (a dynboot checkpoint directory)")
            if not (Path(value) / "dynboot.json").is_file():
                raise ValueError(f"{key}={value!r} is not a dynboot checkpoint directory (no dynboot.json)")
