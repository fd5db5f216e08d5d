"""Typed settings of the best-of-N Serve app: what `build_app(args)` accepts and `dynboot serve` extends.

    AppArgs.model_validate(args)            # the `args:` of serve/config.yaml, or ServeConfig's app fields
    args.generator.serve_options()          # -> Deployment.options(**...) for one tier

Each tier (generator = FDP, verifier = IDP, ingress) carries its own replicas, autoscaling, resources,
queue limits, health checks and shutdown grace, so changing one scales that tier alone. In
`serve/config.yaml` the same numbers sit in the Serve-native `deployments:` section (which overrides what
the builder sets); a test keeps the two equal.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dynboot.io import storage
from dynboot.config import Config
from dynboot.method.verify import Verifier

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
    """Resources, queue limits, autoscaling, health checks and shutdown grace of one tier."""

    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica (fractional on small boxes).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 for a 7B model on a GPU node).")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests in flight per replica.")
    max_queued_requests: int = Field(32, ge=-1, description=(
        "Requests queued per caller before new ones get 429 (-1 = unbounded)."))
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After header (seconds) sent with a 429.")
    health_check_period_s: float = Field(10.0, gt=0, description=(
        "How often Serve calls the replica's check_health (a tiny forward on model tiers)."))
    health_check_timeout_s: float = Field(30.0, gt=0, description=(
        "A health check taking longer fails; failed replicas are replaced."))
    graceful_shutdown_timeout_s: float | None = Field(None, gt=0, description=(
        "How long a stopping replica may finish its requests; must exceed the longest request. Unset: "
        "request_deadline_s + body_timeout_s + 30 s (AppArgs fills it in and checks a value given)."))
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
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "autoscaling_config": self.autoscaling.model_dump(),
            "ray_actor_options": actor,
        }


class BatchOptions(Config):
    """`@serve.batch` settings of one model tier, counted in rows (candidates), not requests."""

    max_rows: int = Field(16, ge=1, description=(
        "Most rows in one model call: sampled candidates (generator), scored candidates or captioned pairs "
        "(verifier). Requests wait in the replica's batch queue until their rows fit; one request's rows "
        "(its best_of) must fit alone."))
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a partial batch waits for more requests.")


class FaultInjection(Config):
    """Test only: faults a model tier injects into its own model calls. Set through the app's args (the deploy
    config), never by a request, so no HTTP client can reach them. Defaults inject nothing."""

    device_error_on_call: int = Field(0, ge=0, description=(
        "Raise a CUDA-style RuntimeError on this model call of each replica (1-based; 0 = never), as a broken "
        "CUDA context would: the replica must fail its health check and be replaced."))
    delay_s: float = Field(0.0, ge=0, le=60, description=(
        "Sleep before each model call (a slow forward), then skip the call if every request in it was "
        "cancelled meanwhile."))


# Each tier's defaults; a partial override (`verifier.num_cpus=1`, or `verifier: {num_cpus: 1}` in args) is
# merged onto the field's default (these, or a subclass's), not onto the bare DeploymentOptions defaults.
TIER_DEFAULTS: dict[str, dict] = {
    "generator": {"num_cpus": 0.5, "max_ongoing_requests": 8, "max_queued_requests": 32,
                  "autoscaling": {"target_ongoing_requests": 2.0}},
    "verifier": {"num_cpus": 0.5, "max_ongoing_requests": 16, "max_queued_requests": 64,
                 "autoscaling": {"target_ongoing_requests": 4.0}},
    "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 64, "max_queued_requests": 256,
                "autoscaling": {"target_ongoing_requests": 16.0}},
    "generator_batch": {"max_rows": 16},
    "verifier_batch": {"max_rows": 32},
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
    """Arguments of `serve.app:build_app`: checkpoints, request limits, auth, deadlines and each tier's settings."""

    generator_path: str = Field("", description=(
        "FDP checkpoint directory (Hugging Face layout + dynboot.json), local or a URI (s3://, gs://, file://: "
        "fetched once per node into a local cache)."))
    verifier_path: str = Field("", description=(
        "IDP checkpoint directory or URI (the verifier; may be the same checkpoint as the generator)."))
    model_name: str = Field("dynboot-best-of-n", description="Model id reported by /v1/models and in responses.")
    max_best_of: int = Field(16, ge=1, le=256, description=(
        "Most candidates one request may have sampled (`best_of`); `n`, the images returned, is at most best_of."))
    default_best_of: int = Field(4, ge=1, description=(
        "Candidates sampled when a request gives no best_of (raised to the request's n when n is larger)."))
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024, description=(
        "Largest encoded image accepted (bytes); bodies are capped at 2x this + 64 KiB."))
    max_image_pixels: int = Field(2048 * 2048, ge=1, description="Largest width x height accepted (checked before decoding).")
    image_formats: list[str] = Field(["PNG", "JPEG", "WEBP"], description="Accepted encodings (PIL format names).")
    max_prompt_tokens: int = Field(256, ge=1, description=(
        "Longest prompt (action) accepted, in tokens of the model's own text tokenizer; a model tier lowers it "
        "further when its context cannot hold the prompt beside two images."))
    api_token_env: str = Field("DYNBOOT_API_TOKEN", description=(
        "Env var holding the bearer token, read by each ingress replica where it runs: /v1/* then requires "
        "`Authorization: Bearer <token>`. Without a token the ingress refuses to start when Serve's HTTP "
        "proxy listens beyond loopback (unless allow_unauthenticated) and serves loopback clients only."))
    allow_unauthenticated: bool = Field(False, description=(
        "Serve /v1/* without a token even when listening beyond loopback (an explicit opt-out; off by default)."))
    openapi: bool = Field(False, description=(
        "Serve the OpenAPI schema at /openapi.json (behind the same bearer token as /v1/*). No /docs page."))
    verification: Verifier = Field(default_factory=Verifier, description=(
        "How best-of-N ranks candidates, the same block as eval's `verifier` (dynboot.method.verify): score=idp (the "
        "paper), fdp, idp+fdp, idp+edit. The FDP and edit parts are computed on the generator tier (which holds "
        "the FDP), the IDP part on the verifier tier; the ingress combines them. A request may pick another "
        "score with the `verifier_score` field; the weights are the app's."))
    max_rollout_steps: int = Field(16, ge=1, le=256, description=(
        "Most actions one /v1/rollouts request may roll forward (each step samples best_of candidates)."))
    candidate_transport: Literal["auto", "codes", "png"] = Field("auto", description=(
        "How candidates reach the verifier: image codes (compact; needs both models on one tokenizer), "
        "PNG bytes, or auto (codes when the tokenizers match)."))
    replica_retries: int = Field(2, ge=0, description=(
        "Times the ingress retries a model call whose replica died or turned unhealthy mid-request "
        "(sampling and scoring are idempotent)."))
    request_deadline_s: float = Field(120.0, gt=0, description=(
        "End-to-end deadline of one request (body read, generation, verification); past it the client gets "
        "504 and the request's model work is cancelled."))
    body_timeout_s: float = Field(30.0, gt=0, description=(
        "Longest the ingress waits for a request body (slow clients get 408 and free their slot)."))
    generator_batch: BatchOptions = Field(
        default_factory=lambda: BatchOptions(**TIER_DEFAULTS["generator_batch"]),
        description="@serve.batch of the generator (seedless requests with equal best_of/temperature/top_k share "
                    "one sample call)." + _tier_help("generator_batch"))
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
    generator_faults: FaultInjection = Field(default_factory=FaultInjection, description="Test only: see FaultInjection.")
    verifier_faults: FaultInjection = Field(default_factory=FaultInjection, description="Test only: see FaultInjection.")

    @model_validator(mode="before")
    @classmethod
    def _tier_overrides_merge_onto_tier_defaults(cls, data):
        if isinstance(data, dict):
            data = {k: merged(cls.model_fields[k].get_default(call_default_factory=True).model_dump(), v)
                    if k in TIER_DEFAULTS and isinstance(v, dict) else v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "AppArgs":
        if self.default_best_of > self.max_best_of:
            raise ValueError(f"default_best_of ({self.default_best_of}) > max_best_of ({self.max_best_of})")
        for tier, batch in (("generator", self.generator_batch), ("verifier", self.verifier_batch)):
            if batch.max_rows < self.max_best_of:  # else Serve fails such a request: it fits no batch
                raise ValueError(f"{tier}_batch.max_rows ({batch.max_rows}) < max_best_of ({self.max_best_of}): "
                                 "a request with best_of = max_best_of would fit no batch")
        longest = self.request_deadline_s + self.body_timeout_s
        for tier in ("generator", "verifier", "ingress"):
            options = getattr(self, tier)
            if options.graceful_shutdown_timeout_s is None:
                options.graceful_shutdown_timeout_s = longest + 30.0
            grace = options.graceful_shutdown_timeout_s
            if grace <= longest:
                raise ValueError(f"{tier}.graceful_shutdown_timeout_s ({grace}) must exceed the longest request "
                                 f"(request_deadline_s + body_timeout_s = {longest}): a stopping replica would "
                                 "cut requests short")
        return self

    def proxy_timeout_s(self) -> float:
        """Serve's HTTP proxy `request_timeout_s`: a backstop behind the ingress's own deadline (which answers
        first, in the API's error shape)."""
        return self.request_deadline_s + self.body_timeout_s + 30.0

    def check_paths(self) -> None:
        """Name a missing checkpoint (a local directory or a URI) before any replica starts."""
        for key in ("generator_path", "verifier_path"):
            value = getattr(self, key)
            if not value:
                raise ValueError(f"{key} is not set: pass {key}=DIR or a URI (a dynboot checkpoint directory)")
            try:
                found = storage.is_file(storage.join(value, "dynboot.json"))
            except OSError as err:  # unreachable bucket, no credentials, ...
                raise ValueError(f"{key}={value!r} cannot be read: {type(err).__name__}: {err}") from None
            if not found:
                raise ValueError(f"{key}={value!r} is not a dynboot checkpoint directory (no dynboot.json)")
