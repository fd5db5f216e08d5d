"""Best-of-N serving on Ray Serve: a Generator (FDP) tier, a Verifier (IDP) tier, and an HTTP ingress.

    serve run serve/config.yaml                                   # Serve CLI, config with `args:`
    dynboot serve generator_path=CKPT verifier_path=CKPT          # serve/run_local.py

One best-of-N request = one Generator call (all N candidates from one `model.sample(before, [action], n)`)
+ one Verifier call (all N scored by one `action_logprob`), never N round trips. Both model tiers batch
concurrent requests with `@serve.batch`; candidates travel to the verifier as int32 codes [N, L] (or as
PNG bytes when the two models do not share a tokenizer), images travel as encoded PNG bytes.

HTTP API (errors are OpenAI-style JSON `{"error": {"message", "type", "param", "code"}}`; checks in validate.py):
  POST /v1/images/edits  multipart, as `openai.OpenAI(base_url=URL + "/v1").images.edit(image=..., prompt=ACTION,
                         n=N, response_format="b64_json")` sends it. `n` = candidates considered; the reply holds
                         the best one in `data[0].b64_json` plus `scores` (all N), `chosen_index`, `seed`, `timings_ms`.
                         Extra fields: temperature, top_k, seed (a seeded request is sampled alone, reproducibly),
                         return_candidates=true (every candidate's codes, PNG and score). OpenAI fields with no
                         meaning here (model, size, quality, user, ...) are accepted and ignored; mask -> 400.
  POST /v1/actions       multipart `before`, `after` [, `action`] -> {"action", "score", "captioned"} (IDP only).
  GET  /v1/models, /healthz (liveness), /readyz (both model tiers loaded; 503 otherwise).
  400 bad field / value / image, 401 missing or wrong bearer token (when the token env var is set),
  413 body or image too large, 415 not multipart or unsupported image format, 429 a tier's queue is full
  (Retry-After), 503 a replica died and retries ran out, 504 a model call timed out.

Input images are resized to each model's `tokenizer.image_size` (square, bicubic) inside the model tier, so
any accepted image size works (the reply gives `input_size` and the model's `size`).
"""

# no `from __future__ import annotations`: FastAPI must resolve the route signatures (`request: Request`)
# of the ingress class at runtime, after Serve has pickled it.
import asyncio
import base64
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from dynboot.images import decode_image, encode_png
from dynboot.best_of_n import pick_best
from dynboot.models.registry import load_model
from serve.schemas import GENERATOR, INGRESS, VERIFIER, AppArgs
from serve.validate import (EDIT_FIELDS, EDIT_UNSUPPORTED, ApiError, bool_field, check_auth, image_field,
                            install_error_handlers, number_field, read_form, reject_unknown, text_field, token_digest)

log = logging.getLogger("ray.serve")


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to the model's square input side (bicubic) unless it already fits."""
    if image.shape[:2] == (size, size):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def serving_model(path: str):
    """The checkpoint on this replica's GPU when Ray gave it one (`num_gpus` in the tier), else on CPU."""
    torch.set_num_threads(1)  # replicas share a few cores; intra-op threads would oversubscribe them
    return load_model(path, device="cuda" if torch.cuda.is_available() else "cpu").eval()


def model_info(model) -> dict:
    tok = model.tokenizer
    return {"model_id": model.model_id, "backend": model.backend, "tokenizer": type(tok).__name__,
            "image_size": int(tok.image_size), "tokens_per_image": int(tok.tokens_per_image),
            "codebook_size": int(tok.codebook_size)}


def isolated(run: Callable[[list], list], jobs: list) -> list:
    """Run a batch in one call; if it fails, run each job alone so one bad job fails only itself
    (a result that is an Exception is re-raised to that job's caller only)."""
    try:
        return run(jobs)
    except Exception:
        if len(jobs) == 1:
            raise
        out = []
        for job in jobs:
            try:
                out.append(run([job])[0])
            except Exception as err:
                out.append(err)
        return out


def _raise_if_error(result):
    if isinstance(result, Exception):
        raise result
    return result


@dataclass
class SampleJob:
    png: bytes
    action: str
    n: int
    temperature: float
    top_k: int
    seed: int | None


@serve.deployment(name=GENERATOR)
class Generator:
    """FDP tier: N candidates per request in one `sample` call, concurrent requests batched."""

    def __init__(self, path: str, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005):
        self.model = serving_model(path)
        self.lock = threading.Lock()  # one model call at a time per replica (torch state is not shared safely)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def info(self) -> dict:
        return model_info(self.model)

    async def sample(self, png: bytes, action: str, n: int, temperature: float = 1.0, top_k: int = 0,
                     seed: int | None = None) -> dict:
        """{"codes": int32 [n, L], "pngs": n PNG bytes, "seed", "model_id", "image_size"}."""
        return _raise_if_error(await self._batched(SampleJob(png, action, n, temperature, top_k, seed)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, jobs: list[SampleJob]) -> list:
        return await asyncio.to_thread(isolated, self._run, jobs)

    def _run(self, jobs: list[SampleJob]) -> list[dict]:
        """Seedless jobs with equal (n, temperature, top_k) share one call; a job with a seed is sampled
        alone, so its candidates equal `model.sample(before, [action], n, seed=seed)`."""
        size = self.model.tokenizer.image_size
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            key = (job.n, job.temperature, job.top_k) if job.seed is None else ("seeded", i)
            groups.setdefault(key, []).append(i)
        results: list = [None] * len(jobs)
        for idx in groups.values():
            first = jobs[idx[0]]
            seed = first.seed if first.seed is not None else int(np.random.randint(2**31))
            before = np.stack([fit_image(decode_image(jobs[i].png), size) for i in idx])
            with self.lock:
                codes = self.model.sample(before, [jobs[i].action for i in idx], n=first.n,
                                          temperature=first.temperature, top_k=first.top_k, seed=seed)
                images = self.model.tokenizer.decode(codes.reshape(-1, codes.shape[-1]))
            images = images.reshape(len(idx), first.n, *images.shape[1:])
            for row, i in enumerate(idx):
                results[i] = {"codes": codes[row].numpy().astype(np.int32), "pngs": [encode_png(im) for im in images[row]],
                              "seed": first.seed, "model_id": self.model.model_id, "image_size": size}
        return results


@dataclass
class ScoreJob:
    before: bytes
    candidates: np.ndarray | list[bytes]  # int codes [N, L], or N PNGs
    action: str


@dataclass
class CaptionJob:
    before: bytes
    after: bytes
    action: str | None  # None: caption the pair, then score the caption


@serve.deployment(name=VERIFIER)
class Verifier:
    """IDP tier: mean action log-prob of each candidate (one batched forward), and pair captions."""

    def __init__(self, path: str, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005):
        self.model = serving_model(path)
        self.lock = threading.Lock()
        for method in (self._score_batched, self._caption_batched):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def info(self) -> dict:
        return model_info(self.model)

    async def score(self, before: bytes, candidates: np.ndarray | list[bytes], action: str) -> list[float]:
        return _raise_if_error(await self._score_batched(ScoreJob(before, candidates, action)))

    async def caption(self, before: bytes, after: bytes, action: str | None = None) -> dict:
        return _raise_if_error(await self._caption_batched(CaptionJob(before, after, action)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score_batched(self, jobs: list[ScoreJob]) -> list:
        return await asyncio.to_thread(isolated, self._score, jobs)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _caption_batched(self, jobs: list[CaptionJob]) -> list:
        return await asyncio.to_thread(isolated, self._caption, jobs)

    def _image(self, png: bytes) -> np.ndarray:
        return fit_image(decode_image(png), self.model.tokenizer.image_size)

    def _after(self, candidates) -> np.ndarray | torch.Tensor:
        if isinstance(candidates, np.ndarray):  # arrives read-only through the object store: copy
            return torch.from_numpy(np.array(candidates, dtype=np.int64))
        return np.stack([self._image(p) for p in candidates])

    def _score(self, jobs: list[ScoreJob]) -> list[list[float]]:
        counts = [len(j.candidates) for j in jobs]
        before = np.concatenate([np.repeat(self._image(j.before)[None], c, 0) for j, c in zip(jobs, counts)])
        parts = [self._after(j.candidates) for j in jobs]
        after = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)
        actions = [j.action for j, c in zip(jobs, counts) for _ in range(c)]
        with self.lock:
            scores = self.model.action_logprob(before, after, actions).tolist()
        out, start = [], 0
        for c in counts:
            out.append(scores[start: start + c])
            start += c
        return out

    def _caption(self, jobs: list[CaptionJob]) -> list[dict]:
        before = np.stack([self._image(j.before) for j in jobs])
        after = np.stack([self._image(j.after) for j in jobs])
        todo = [i for i, j in enumerate(jobs) if j.action is None]
        actions = [j.action for j in jobs]
        with self.lock:
            if todo:
                for i, text in zip(todo, self.model.caption(before[todo], after[todo])):
                    actions[i] = text
            scores = self.model.action_logprob(before, after, actions).tolist()
        return [{"action": a, "score": s, "captioned": j.action is None, "model_id": self.model.model_id}
                for a, s, j in zip(actions, scores, jobs)]


async def _awaited(response):
    return await response


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000, 2)


# Everything the routes use is defined above this point: `@serve.ingress(api)` pickles the FastAPI app
# (with the globals its routes reference) when the class below is decorated.
api = FastAPI(title="dynboot best-of-N", description="Forward dynamics (FDP) sampling verified by inverse dynamics (IDP).")
install_error_handlers(api)


@serve.deployment(name=INGRESS)
@serve.ingress(api)
class BestOfNIngress:
    """HTTP front: validates requests, runs best-of-N over the two model tiers, maps failures to 4xx/5xx."""

    def __init__(self, generator: DeploymentHandle, verifier: DeploymentHandle, args: dict, token_sha256: str | None):
        self.gen, self.ver = generator, verifier
        self.args = AppArgs.model_validate(args)
        self.digest = token_sha256
        self.max_body = 2 * self.args.max_image_bytes + 64 * 1024
        self._transport: str | None = None if self.args.candidate_transport == "auto" else self.args.candidate_transport

    async def _call(self, method, *call_args, what: str):
        """One model-tier call: full queue -> 429; a replica that died mid-call -> retried on another
        (the router drops dead replicas; the controller starts replacements); too slow -> 504."""
        last: Exception | None = None
        for _ in range(self.args.replica_retries + 1):
            response = method.remote(*call_args)
            try:
                return await asyncio.wait_for(_awaited(response), self.args.request_timeout_s)
            except BackPressureError as err:
                retry = str(max(1, round(err.retry_after_s or 1)))
                raise ApiError(429, f"the {what} queue is full ({err.message}); retry later", code="queue_full",
                               headers={"Retry-After": retry}) from None
            except RayActorError as err:
                last = err
                log.warning("%s replica died during a request; retrying: %s", what, type(err).__name__)
            except RayTaskError as err:  # the model code raised for this request; the replica lives on
                log.error("%s failed: %s", what, err)
                raise ApiError(500, f"the {what} failed: {type(err.cause).__name__}: {err.cause}",
                               code="model_error") from None
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(504, f"the {what} did not answer within {self.args.request_timeout_s} s",
                               code="timeout") from None
        raise ApiError(503, f"the {what} is unavailable ({type(last).__name__}); retry later", code="replica_unavailable",
                       headers={"Retry-After": "1"})

    async def _transport_mode(self) -> str:
        if self._transport is None:
            g, v = await self._call(self.gen.info, what="generator"), await self._call(self.ver.info, what="verifier")
            keys = ("tokenizer", "image_size", "tokens_per_image", "codebook_size")
            self._transport = "codes" if all(g[k] == v[k] for k in keys) else "png"
        return self._transport

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        try:
            info = await asyncio.wait_for(asyncio.gather(_awaited(self.gen.info.remote()), _awaited(self.ver.info.remote())), 10)
        except Exception as err:
            return ApiError(503, f"models not ready: {type(err).__name__}: {err}", code="not_ready").response()
        return {"ready": True, "generator": info[0], "verifier": info[1]}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        check_auth(request, self.digest)
        return {"object": "list", "data": [{"id": self.args.model_name, "object": "model", "owned_by": "dynboot"}]}

    @api.post("/v1/images/edits")
    async def edits(self, request: Request) -> dict:
        """OpenAI images.edit: `image` + `prompt` (the action) + `n` (candidates considered) -> the best one."""
        t0 = time.perf_counter()
        check_auth(request, self.digest)
        a = self.args
        form = await read_form(request, self.max_body)
        reject_unknown(form, EDIT_FIELDS, EDIT_UNSUPPORTED)
        prompt = text_field(form, "prompt", required=True, max_chars=a.max_prompt_chars)
        n = number_field(form, "n", int, 1, a.max_n, a.default_n)
        fmt = text_field(form, "response_format") or "b64_json"
        if fmt != "b64_json":
            raise ApiError(400, f"response_format {fmt!r} is not supported; use 'b64_json'", param="response_format",
                           code="unsupported_response_format")
        out_fmt = (text_field(form, "output_format") or "png").lower()
        if out_fmt != "png":
            raise ApiError(400, f"output_format {out_fmt!r} is not supported; use 'png'", param="output_format",
                           code="unsupported_output_format")
        if bool_field(form, "stream"):
            raise ApiError(400, "stream=true is not supported", param="stream", code="unsupported_field")
        temperature = number_field(form, "temperature", float, 0.0, 10.0, 1.0)
        top_k = number_field(form, "top_k", int, 0, 1_000_000, 0)
        seed = number_field(form, "seed", int, 0, 2**31 - 1, None)
        with_candidates = bool_field(form, "return_candidates")
        image = await image_field(form, ("image", "image[]"), a)
        t_parsed = time.perf_counter()

        gen = await self._call(self.gen.sample, image.data, prompt, n, temperature, top_k, seed, what="generator")
        t_gen = time.perf_counter()
        payload = gen["codes"] if await self._transport_mode() == "codes" else gen["pngs"]
        scores = await self._call(self.ver.score, image.data, payload, prompt, what="verifier")
        t_ver = time.perf_counter()

        best = pick_best(torch.from_numpy(np.array(gen["codes"], dtype=np.int64))[None], torch.tensor([scores]))
        chosen = int(best.index[0])
        size = gen["image_size"]
        body = {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(gen["pngs"][chosen]).decode(), "revised_prompt": prompt}],
            "output_format": "png", "size": f"{size}x{size}",
            "model": a.model_name, "n": n, "chosen_index": chosen, "scores": scores, "seed": gen["seed"],
            "input_size": f"{image.array.shape[1]}x{image.array.shape[0]}",
            "generator": gen["model_id"], "verifier_transport": self._transport,
            "timings_ms": {"parse": _ms(t0, t_parsed), "generate": _ms(t_parsed, t_gen), "verify": _ms(t_gen, t_ver),
                           "total": _ms(t0, time.perf_counter())},
        }
        if with_candidates:
            body["candidates"] = [{"index": i, "score": s, "codes": gen["codes"][i].tolist(),
                                   "b64_json": base64.b64encode(p).decode()}
                                  for i, (s, p) in enumerate(zip(scores, gen["pngs"]))]
        return body

    @api.post("/v1/actions")
    async def actions(self, request: Request) -> dict:
        """IDP: `before` + `after` images -> the action in words and its mean log-prob (or, with `action`
        given, that action's score)."""
        check_auth(request, self.digest)
        form = await read_form(request, self.max_body)
        reject_unknown(form, {"before", "after", "action", "model"}, {})
        before = await image_field(form, ("before",), self.args)
        after = await image_field(form, ("after",), self.args)
        action = text_field(form, "action", max_chars=self.args.max_prompt_chars) or None
        result = await self._call(self.ver.caption, before.data, after.data, action, what="verifier")
        return {"created": int(time.time()), "model": self.args.model_name, **result}



def build_app(args: dict):
    """Serve application builder (`import_path: serve.app:build_app`): validates `args` (AppArgs), sets each
    tier's options from them, and reads the API token from the env var named by `api_token_env`."""
    cfg = AppArgs.model_validate(dict(args or {}))
    cfg.check_paths()
    cfg = cfg.model_copy(update={"generator_path": str(Path(cfg.generator_path).resolve()),
                                 "verifier_path": str(Path(cfg.verifier_path).resolve())})
    token = os.environ.get(cfg.api_token_env, "").strip()
    generator = Generator.options(**cfg.generator.serve_options()).bind(
        cfg.generator_path, cfg.generator_batch.max_batch_size, cfg.generator_batch.batch_wait_timeout_s)
    verifier = Verifier.options(**cfg.verifier.serve_options()).bind(
        cfg.verifier_path, cfg.verifier_batch.max_batch_size, cfg.verifier_batch.batch_wait_timeout_s)
    return BestOfNIngress.options(**cfg.ingress.serve_options()).bind(
        generator, verifier, cfg.model_dump(mode="json"), token_digest(token) if token else None)
