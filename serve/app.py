"""Best-of-N serving on Ray Serve: the HTTP ingress in front of the Generator (FDP) and Verifier (IDP) tiers.

    serve run serve/config.yaml                                   # Serve CLI, config with `args:`
    dynboot serve generator_path=CKPT verifier_path=CKPT          # serve/run_local.py

HTTP API (every error, expected or not, is OpenAI-style JSON `{"error": {"message", "type", "param", "code"}}`):
  POST /v1/images/edits  multipart, as `openai.OpenAI(base_url=URL + "/v1").images.edit(image=..., prompt=ACTION,
                         n=N, response_format="b64_json", extra_body={"best_of": M})` sends it. `best_of` candidates
                         are sampled (default `default_best_of`, at least n), the verifier scores all of them, and
                         `data` holds the top `n` by score, best first (each with `score` and `candidate_index`);
                         `scores` lists every candidate's score in sample order. `size` is "auto" or the model's
                         own "SxS" (anything else: 400 naming them). Extension fields: best_of, temperature, top_k,
                         seed (a seeded request is sampled alone, reproducibly), return_candidates=true (every
                         candidate's codes, PNG and score), verifier_score=idp|fdp|idp+fdp|idp+edit (default: the
                         app's `verification`; `score_parts` lists each part per candidate). mask,
                         output_compression, streaming -> 400.
  POST /v1/rollouts      multipart `image`, `actions` (JSON array, at most max_rollout_steps) [, best_of, seed,
                         temperature, top_k, verifier_score] -> {"steps": [{"action", "b64_json", "candidate_index",
                         "score", "scores", ...}]}: each step's best candidate is the next step's before.
  POST /v1/actions       multipart `before`, `after` [, `action`] -> {"action", "score", "captioned"} (IDP only).
  GET  /v1/models[/{id}] the served model (id, object, created, owned_by).
  GET  /healthz          liveness; /readyz: ready or not (model details only to authorised callers).
  GET  /openapi.json     only with openapi=true, behind the same token as /v1/*; there is no /docs page.
  400 bad field / value / image / prompt too long (in the model's tokens), 401 missing or wrong bearer token,
  404 unknown route or model, 405 wrong method, 408 body too slow, 413 body or image too large, 415 not
  multipart or unsupported image format, 429 a tier's queue is full (Retry-After), 500 a model call failed,
  503 a replica died or turned unhealthy and retries ran out, 504 the request deadline passed (its model work
  is cancelled).
"""

# no `from __future__ import annotations`: FastAPI must resolve the route signatures (`request: Request`)
# of the ingress class at runtime, after Serve has pickled it.
import asyncio
import base64
import logging
import time

import numpy as np
import torch
from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from dynboot.io import storage
from dynboot.method.best_of_n import top_n
from dynboot.eval.rollout import step_seed
from dynboot.method.verify import NEEDS_FDP, NEEDS_IDP, VERIFIER_SCORES, combine
from dynboot.method.verify import Verifier as VerifierSettings
from serve.auth import AuthPolicy, serve_bind_host
from serve.openapi import openapi_schema
from serve.schemas import INGRESS, AppArgs
from serve.tiers import Generator, ReplicaUnhealthy, Verifier
from serve.validate import (ACTION_FIELDS, CHOICES, EDIT_FIELDS, EDIT_UNSUPPORTED, ROLLOUT_FIELDS, SAMPLING, ApiError,
                            actions_field, bool_field, choice_field, image_field, install_error_handlers, number_field,
                            read_form, reject_unknown, text_field)

log = logging.getLogger("ray.serve")


class Deadline:
    """The end of one request's time budget."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def expired(self, what: str) -> ApiError:
        return ApiError(504, f"the request did not complete within its {self.seconds:g} s deadline ({what})",
                        code="timeout")


async def _awaited(response):
    return await response


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000, 2)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Everything the routes use is defined above this point: `@serve.ingress(api)` pickles the FastAPI app
# (with the globals its routes reference) when the class below is decorated. FastAPI's own schema and docs
# routes are off: /openapi.json is served below, behind auth, only when enabled.
api = FastAPI(title="dynboot best-of-N",
              description="Forward dynamics (FDP) sampling verified by inverse dynamics (IDP).",
              docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)


@serve.deployment(name=INGRESS)
@serve.ingress(api)
class BestOfNIngress:
    """HTTP front: auth, validation, best-of-N over the two model tiers, failures mapped to 4xx/5xx."""

    def __init__(self, generator: DeploymentHandle, verifier: DeploymentHandle, args: dict):
        self.gen, self.ver = generator, verifier
        self.args = AppArgs.model_validate(args)
        self.auth = AuthPolicy.from_env(self.args, serve_bind_host())  # refuses to start when exposed without a token
        self.max_body = 2 * self.args.max_image_bytes + 64 * 1024
        self.created = int(time.time())
        self._info: dict | None = None  # both tiers' model_info, read once

    async def _call(self, method, *call_args, what: str, deadline: Deadline):
        """One model-tier call within the request's deadline: full queue -> 429; a replica that died or turned
        unhealthy mid-call -> retried (the router drops dead replicas, Serve replaces unhealthy ones); a request
        error raised by the tier (e.g. prompt too long) -> that 4xx; out of time -> the call is cancelled, 504."""
        last: Exception | None = None
        for attempt in range(self.args.replica_retries + 1):
            if deadline.remaining() <= 0:
                raise deadline.expired(what)
            response = method.remote(*call_args)
            try:
                return await asyncio.wait_for(_awaited(response), deadline.remaining())
            except BackPressureError as err:
                retry = str(max(1, round(err.retry_after_s or 1)))
                raise ApiError(429, f"the {what} queue is full; retry later", code="queue_full",
                               headers={"Retry-After": retry}) from None
            except RayActorError as err:
                last = err
                log.warning("%s replica died during a request; retrying: %s", what, type(err).__name__)
            except RayTaskError as err:
                if isinstance(err.cause, ApiError):
                    raise err.cause from None
                if not isinstance(err.cause, ReplicaUnhealthy):  # the model code raised for this request
                    log.error("%s failed: %s", what, err)
                    raise ApiError(500, f"the {what} failed ({type(err.cause).__name__})", code="model_error") from None
                last = err
                log.warning("%s replica is unhealthy; retrying", what)
                await asyncio.sleep(min(0.2 * (attempt + 1), max(0.0, deadline.remaining())))
            except asyncio.TimeoutError:
                response.cancel()
                raise deadline.expired(what) from None
            except asyncio.CancelledError:  # the client went away or the proxy timed out: stop the model work too
                response.cancel()
                raise
        raise ApiError(503, f"the {what} is unavailable ({type(getattr(last, 'cause', last)).__name__}); retry later",
                       code="replica_unavailable", headers={"Retry-After": "1"})

    async def _models(self, deadline: Deadline) -> dict:
        if self._info is None:
            g = await self._call(self.gen.info, what="generator", deadline=deadline)
            v = await self._call(self.ver.info, what="verifier", deadline=deadline)
            self._info = {"generator": g, "verifier": v}
        return self._info

    def _transport(self, info: dict) -> str:
        if self.args.candidate_transport != "auto":
            return self.args.candidate_transport
        keys = ("tokenizer", "image_size", "tokens_per_image", "codebook_size")
        return "codes" if all(info["generator"][k] == info["verifier"][k] for k in keys) else "png"

    def _check_model(self, form) -> None:
        model = text_field(form, "model")
        if model and model != self.args.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.args.model_name!r}",
                           param="model", code="model_not_found")

    def _model_entry(self) -> dict:
        return {"id": self.args.model_name, "object": "model", "created": self.created, "owned_by": "dynboot"}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self, request: Request):
        """Ready when both model tiers answer; details (model ids, error class) only to authorised callers."""
        authorised = self.auth.authorised(request)
        try:
            calls = asyncio.gather(_awaited(self.gen.info.remote()), _awaited(self.ver.info.remote()))
            info = await asyncio.wait_for(calls, 10)
        except Exception as err:
            log.warning("not ready: %s: %s", type(err).__name__, err)
            detail = f" ({type(err).__name__})" if authorised else ""
            return ApiError(503, "not ready" + detail, code="not_ready", headers={"Retry-After": "5"}).response()
        return {"ready": True, **({"generator": info[0], "verifier": info[1]} if authorised else {})}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        if not self.args.openapi:
            raise ApiError(404, "the OpenAPI schema is not served (openapi=false)", code="not_found")
        self.auth.check(request)
        info = await self._models(Deadline(30))
        return openapi_schema(api, self.args, info["generator"]["image_size"], self.auth.digest is not None)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self.auth.check(request)
        return {"object": "list", "data": [self._model_entry()]}

    @api.get("/v1/models/{model}")
    async def model(self, model: str, request: Request) -> dict:
        self.auth.check(request)
        if model != self.args.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.args.model_name!r}",
                           param="model", code="model_not_found")
        return self._model_entry()

    @api.post("/v1/images/edits")
    async def edits(self, request: Request) -> dict:
        """OpenAI images.edit: `image` + `prompt` (the action) + `n` images returned, the best of `best_of`."""
        t0, a = time.perf_counter(), self.args
        deadline = Deadline(a.request_deadline_s)
        self.auth.check(request)
        form = await read_form(request, self.max_body, min(a.body_timeout_s, deadline.remaining()))
        reject_unknown(form, EDIT_FIELDS, EDIT_UNSUPPORTED)
        self._check_model(form)
        prompt = text_field(form, "prompt", required=True)
        n = number_field(form, "n", int, 1, a.max_best_of, 1)
        best_of = number_field(form, "best_of", int, 1, a.max_best_of, None)
        if best_of is None:
            best_of = max(a.default_best_of, n)
        elif best_of < n:
            raise ApiError(400, f"best_of ({best_of}) must be >= n ({n}): n of the best_of candidates are returned",
                           param="best_of", code="best_of_below_n")
        for key, allowed in CHOICES.items():
            choice_field(form, key, allowed)
        if bool_field(form, "stream"):
            raise ApiError(400, "stream=true is not supported", param="stream", code="unsupported_field")
        temperature, top_k, seed = (number_field(form, key, *SAMPLING[key]) for key in ("temperature", "top_k", "seed"))
        with_candidates = bool_field(form, "return_candidates")
        verifier = self._verifier(form)
        image = await image_field(form, ("image", "image[]"), a)
        info = await self._models(deadline)
        side = info["generator"]["image_size"]
        choice_field(form, "size", ["auto", f"{side}x{side}"])
        transport = self._transport(info)
        t_parsed = time.perf_counter()

        step = await self._best_of(image.data, prompt, best_of, temperature, top_k, seed, verifier, transport, deadline)
        gen, scores = step["gen"], step["scores"]
        order = top_n(torch.tensor([scores]), n)[0].tolist()
        body = {
            "created": int(time.time()),
            "data": [{"b64_json": _b64(gen["pngs"][i]), "candidate_index": i, "score": scores[i]} for i in order],
            "output_format": "png", "size": f"{side}x{side}", "model": a.model_name, "n": n, "best_of": best_of,
            "scores": scores, "score_parts": step["parts"], "verifier_score": verifier.score, "seed": gen["seed"],
            "input_size": f"{image.array.shape[1]}x{image.array.shape[0]}",
            "generator": gen["model_id"], "verifier_transport": transport,
            "timings_ms": {"parse": _ms(t0, t_parsed), "generate": step["generate_ms"], "verify": step["verify_ms"],
                           "total": _ms(t0, time.perf_counter())},
        }
        if with_candidates:
            body["candidates"] = [{"index": i, "score": s, "codes": np.asarray(gen["codes"][i]).tolist(),
                                   "b64_json": _b64(p)} for i, (s, p) in enumerate(zip(scores, gen["pngs"]))]
        return body

    def _verifier(self, form) -> VerifierSettings:
        """The app's verification settings, with the request's `verifier_score` when it names one."""
        score = choice_field(form, "verifier_score", list(VERIFIER_SCORES))
        v = self.args.verification
        return v if score is None else v.model_copy(update={"score": score})

    async def _best_of(self, image: bytes, prompt: str, best_of: int, temperature: float, top_k: int, seed: int | None,
                       verifier: VerifierSettings, transport: str, deadline: Deadline) -> dict:
        """One best-of-N step: `best_of` candidates from the generator, which also computes the verifier parts it
        can (the FDP's log-prob, the edit fraction), the IDP part from the verifier tier, combined here by
        dynboot.method.verify.combine (the function evaluation's verification_scores ends in)."""
        t0 = time.perf_counter()
        parts = tuple(p for p, needs in (("fdp", NEEDS_FDP), ("edit", ("idp+edit",))) if verifier.score in needs)
        gen = await self._call(self.gen.sample, image, prompt, best_of, temperature, top_k, seed, parts,
                               what="generator", deadline=deadline)
        t_gen = time.perf_counter()
        computed = dict(gen.get("parts", {}))
        if verifier.score in NEEDS_IDP:
            payload = gen["codes"] if transport == "codes" else gen["pngs"]
            computed["idp"] = await self._call(self.ver.score, image, payload, prompt, what="verifier", deadline=deadline)
        scores = combine(verifier, **{k: torch.tensor([v], dtype=torch.float64) for k, v in computed.items()})[0].tolist()
        return {"gen": gen, "scores": scores, "parts": computed, "generate_ms": _ms(t0, t_gen),
                "verify_ms": _ms(t_gen, time.perf_counter())}

    @api.post("/v1/rollouts")
    async def rollouts(self, request: Request) -> dict:
        """Roll the FDP forward from `image` through `actions` (a JSON array of action strings, at most
        max_rollout_steps): each step samples best_of candidates, keeps the verifier's best and feeds it back as the
        next before. With `seed`, step t samples with dynboot.eval.rollout.step_seed(seed, t), as `dynboot rollout` does
        for a case of index 0."""
        t0, a = time.perf_counter(), self.args
        deadline = Deadline(a.request_deadline_s)
        self.auth.check(request)
        form = await read_form(request, self.max_body, min(a.body_timeout_s, deadline.remaining()))
        reject_unknown(form, ROLLOUT_FIELDS, {})
        self._check_model(form)
        actions = actions_field(form, "actions", a.max_rollout_steps)
        best_of = number_field(form, "best_of", int, 1, a.max_best_of, a.default_best_of)
        temperature, top_k, seed = (number_field(form, key, *SAMPLING[key]) for key in ("temperature", "top_k", "seed"))
        choice_field(form, "response_format", CHOICES["response_format"])
        verifier = self._verifier(form)
        image = await image_field(form, ("image", "image[]"), a)
        info = await self._models(deadline)
        transport = self._transport(info)
        before, steps = image.data, []
        for t, action in enumerate(actions):
            step_seed_t = None if seed is None else step_seed(seed, t)
            step = await self._best_of(before, action, best_of, temperature, top_k, step_seed_t, verifier, transport,
                                       deadline)
            scores = step["scores"]
            best = int(top_n(torch.tensor([scores]), 1)[0, 0])
            before = step["gen"]["pngs"][best]
            steps.append({"step": t + 1, "action": action, "b64_json": _b64(before), "candidate_index": best,
                          "score": scores[best], "scores": scores, "score_parts": step["parts"], "seed": step_seed_t})
        side = info["generator"]["image_size"]
        return {"created": int(time.time()), "object": "rollout", "model": a.model_name, "best_of": best_of,
                "verifier_score": verifier.score, "size": f"{side}x{side}", "seed": seed, "steps": steps,
                "timings_ms": {"total": _ms(t0, time.perf_counter())}}

    @api.post("/v1/actions")
    async def actions(self, request: Request) -> dict:
        """IDP: `before` + `after` images -> the action in words and its mean log-prob (or, with `action`
        given, that action's score)."""
        deadline = Deadline(self.args.request_deadline_s)
        self.auth.check(request)
        form = await read_form(request, self.max_body, min(self.args.body_timeout_s, deadline.remaining()))
        reject_unknown(form, ACTION_FIELDS, {})
        self._check_model(form)
        before = await image_field(form, ("before",), self.args)
        after = await image_field(form, ("after",), self.args)
        action = text_field(form, "action") or None
        result = await self._call(self.ver.caption, before.data, after.data, action, what="verifier", deadline=deadline)
        return {"created": int(time.time()), "model": self.args.model_name, **result}


def build_app(args: dict):
    """Serve application builder (`import_path: serve.app:build_app`): validates `args` (AppArgs) and sets each
    tier's options from them. The API token is not read here (this may run on any node): each ingress replica
    reads it from its own environment."""
    cfg = AppArgs.model_validate(dict(args or {}))
    cfg.check_paths()
    cfg = cfg.model_copy(update={"generator_path": storage.absolute(cfg.generator_path),  # replicas run elsewhere
                                 "verifier_path": storage.absolute(cfg.verifier_path)})
    generator = Generator.options(**cfg.generator.serve_options()).bind(
        cfg.generator_path, cfg.max_prompt_tokens, cfg.generator_batch.max_rows, cfg.generator_batch.batch_wait_timeout_s,
        cfg.generator_faults.model_dump())
    verifier = Verifier.options(**cfg.verifier.serve_options()).bind(
        cfg.verifier_path, cfg.max_prompt_tokens, cfg.verifier_batch.max_rows, cfg.verifier_batch.batch_wait_timeout_s,
        cfg.verifier_faults.model_dump())
    return BestOfNIngress.options(**cfg.ingress.serve_options()).bind(generator, verifier, cfg.model_dump(mode="json"))
