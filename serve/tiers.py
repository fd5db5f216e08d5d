"""The two model tiers of the best-of-N app: Generator (FDP) and Verifier (IDP) Serve deployments.

- One request = one generator call (all best_of candidates from one `model.sample(before, [action], n)`)
  + one verifier call (all of them scored by one `action_logprob`), never N round trips.
- `@serve.batch` merges concurrent requests by rows (`batch_size_fn`: candidates sampled or scored, pairs
  captioned) up to the tier's row budget, so one forward never holds more rows than the config allows.
- Prompts are counted in the model's own text tokens before any model work (400 `prompt_too_long`).
- Images become the model's square input through its tokenizer's policy (`_model_input`, dynboot.io.images).
- Checkpoints may be local directories or URIs (s3://, gs://, file://): fetched once per node
  (dynboot.io.storage.local_model_dir).
- Faults that heal: a CUDA-style error marks the replica broken; later calls on it fail fast (the ingress
  retries elsewhere) and `check_health` fails, so Serve replaces the replica. `check_health` otherwise runs a
  tiny forward whenever the model is idle.
- Cancellation: a request the ingress cancels (deadline, client gone) is dropped from the batch queue by
  Serve; a batch already running skips the sample groups / forward whose requests were all cancelled.
  A forward already under way finishes (torch cannot interrupt it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from ray import serve

from dynboot.io import storage
from dynboot.method.devices import is_device_fault
from dynboot.io.images import decode_image, encode_png
from dynboot.models.registry import load_model
from dynboot.method.verify import edit_fraction, fdp_score
from serve.schemas import GENERATOR, VERIFIER, FaultInjection
from serve.validate import ApiError

log = logging.getLogger("ray.serve")

# The verifier parts (dynboot.method.verify) the generator computes: it holds the FDP and the candidates' codes.
GENERATOR_PARTS = ("edit", "fdp")

# Tokens a prompt layout spends besides the action and the two images (specials, separators, instructions):
# a margin for the context check below, generous for every backend's layout (dynboot/models/prompts.py).
LAYOUT_MARGIN_TOKENS = 64


class ReplicaUnhealthy(RuntimeError):
    """This replica's accelerator context is broken; it fails its health check and Serve replaces it."""


def serving_model(path: str):
    """The checkpoint (local or a URI, fetched once per node) on this replica's GPU when Ray gave it one
    (`num_gpus` in the tier), else on CPU."""
    torch.set_num_threads(1)  # replicas share a few cores; intra-op threads would oversubscribe them
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(storage.local_model_dir(path), device=device).eval()


def model_info(model) -> dict:
    tok = model.tokenizer
    return {"model_id": model.model_id, "backend": model.backend, "tokenizer": type(tok).__name__,
            "image_size": int(tok.image_size), "tokens_per_image": int(tok.tokens_per_image),
            "codebook_size": int(tok.codebook_size)}


def prompt_token_limit(model, configured: int) -> int:
    """`configured`, lowered to what the model's context holds beside two images and the layout."""
    config = getattr(model.net, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text_config, "max_position_embeddings", None)
    if not positions:
        return configured
    room = int(positions) - 2 * int(model.tokenizer.tokens_per_image) - LAYOUT_MARGIN_TOKENS
    return max(1, min(configured, room))


def isolated(run: Callable[[list], list], jobs: list) -> list:
    """Run a batch in one call; if it fails, run each job alone so one bad job fails only itself (a result that
    is an Exception is re-raised to that job's caller only). A broken replica fails every job at once."""
    try:
        return run(jobs)
    except ReplicaUnhealthy:
        raise
    except Exception:
        if len(jobs) == 1:
            raise
        out = []
        for job in jobs:
            try:
                out.append(run([job])[0])
            except ReplicaUnhealthy:
                raise
            except Exception as err:
                out.append(err)
        return out


def _raise_if_error(result):
    if isinstance(result, Exception):
        raise result
    return result


async def _submit(batched, job: "Job"):
    """A job through a tier's batcher; a cancelled request marks its job so the batch skips it."""
    try:
        return _raise_if_error(await batched(job))
    except asyncio.CancelledError:
        job.cancelled = True
        raise


@dataclass
class Job:
    cancelled: bool = field(default=False, init=False)  # set when the caller's request is cancelled


@dataclass
class SampleJob(Job):
    png: bytes
    action: str
    n: int  # candidates to sample (the request's best_of)
    temperature: float
    top_k: int
    seed: int | None
    parts: tuple[str, ...] = ()  # verifier parts this tier computes for the candidates: "fdp", "edit"


@dataclass
class ScoreJob(Job):
    before: bytes
    candidates: np.ndarray | list[bytes]  # int codes [N, L], or N PNGs
    action: str


@dataclass
class CaptionJob(Job):
    before: bytes
    after: bytes
    action: str | None  # None: caption the pair, then score the caption


def sampled_rows(jobs: list[SampleJob]) -> int:
    return sum(j.n for j in jobs)


def scored_rows(jobs: list[ScoreJob]) -> int:
    return sum(len(j.candidates) for j in jobs)


class ModelTier:
    """What both tiers share: the model, its lock, the prompt limit, fault handling and the health check."""

    def __init__(self, path: str, max_prompt_tokens: int, faults: dict | None):
        self.model = serving_model(path)
        self.policy = self.model.tokenizer.policy
        self.lock = threading.Lock()  # one model call at a time per replica (torch state is not shared safely)
        self.max_prompt_tokens = prompt_token_limit(self.model, max_prompt_tokens)
        self.faults = FaultInjection.model_validate(faults or {})
        self.broken: str | None = None  # set by a device fault; never cleared (the replica is replaced)
        self.calls = 0
        self.stats: Counter = Counter()

    def info(self) -> dict:
        return model_info(self.model) | {"max_prompt_tokens": self.max_prompt_tokens}

    def counters(self) -> dict:
        """Rows sampled / scored, the most rows one forward held, jobs skipped because they were cancelled."""
        return dict(self.stats)

    def _count_rows(self, key: str, rows: int) -> None:
        self.stats[key] += rows
        self.stats["max_rows_per_call"] = max(self.stats["max_rows_per_call"], rows)

    def check_prompt(self, text: str, param: str) -> None:
        tokens = len(self.model.text_ids(text))
        if tokens > self.max_prompt_tokens:
            raise ApiError(400, f"{param} is {tokens} tokens long; the limit is {self.max_prompt_tokens} tokens",
                           param=param, code="prompt_too_long")

    def _model_input(self, encoded: bytes) -> np.ndarray:
        return self.policy.apply(decode_image(encoded))

    def _model_call(self, jobs: list[Job], fn: Callable):
        """`fn()` under the lock, unless every job in it was cancelled; a device fault marks the replica broken."""
        if self.broken:
            raise ReplicaUnhealthy(f"replica unhealthy after a device fault: {self.broken}")
        if self.faults.delay_s:
            time.sleep(self.faults.delay_s)
        if all(j.cancelled for j in jobs):
            self.stats["cancelled_jobs"] += len(jobs)
            return None
        with self.lock:
            self.calls += 1
            try:
                if self.calls == self.faults.device_error_on_call:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered (injected fault)")
                return fn()
            except Exception as err:
                if is_device_fault(err):
                    self.broken = f"{type(err).__name__}: {err}"[:300]
                    log.error("device fault, this replica will fail its health check: %s", self.broken)
                    raise ReplicaUnhealthy(f"replica unhealthy after a device fault: {type(err).__name__}") from None
                raise

    async def check_health(self) -> None:
        """Serve's health check: fails for good after a device fault; otherwise a tiny forward when the model is
        idle (a busy model is evidently working, and waiting for it would time the check out)."""
        if self.broken:
            raise ReplicaUnhealthy(f"device fault: {self.broken}")
        await asyncio.to_thread(self._probe)

    def _probe(self) -> None:
        if not self.lock.acquire(blocking=False):
            return
        try:
            side = self.model.tokenizer.image_size
            blank = np.zeros((1, side, side, 3), np.uint8)
            self.model.action_logprob(blank, blank, ["probe"])
        except Exception as err:
            if is_device_fault(err):
                self.broken = f"{type(err).__name__}: {err}"[:300]
            raise
        finally:
            self.lock.release()


@serve.deployment(name=GENERATOR)
class Generator(ModelTier):
    """FDP tier: a request's candidates in one `sample` call; concurrent requests batched by rows."""

    def __init__(self, path: str, max_prompt_tokens: int = 256, max_rows: int = 16, batch_wait_timeout_s: float = 0.005,
                 faults: dict | None = None):
        super().__init__(path, max_prompt_tokens, faults)
        self._batched.set_max_batch_size(max_rows)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def sample(self, png: bytes, action: str, n: int, temperature: float = 1.0, top_k: int = 0,
                     seed: int | None = None, parts: tuple[str, ...] = ()) -> dict:
        """{"codes": int32 [n, L], "pngs": n PNG bytes, "seed", "model_id", "image_size"}, plus the verifier parts
        asked for in `parts` (dynboot.method.verify): "fdp" (the FDP's mean log-prob of each candidate) and "edit" (the
        fraction of codes each candidate changes), n floats each, computed in the same model call."""
        self.check_prompt(action, "prompt")
        unknown = set(parts) - set(GENERATOR_PARTS)
        if unknown:
            raise ValueError(f"the generator computes the verifier parts {GENERATOR_PARTS}, not {sorted(unknown)}")
        job = SampleJob(png, action, n, temperature, top_k, seed, tuple(sorted(parts)))
        return await _submit(self._batched, job)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, batch_size_fn=sampled_rows)
    async def _batched(self, jobs: list[SampleJob]) -> list:
        return await asyncio.to_thread(isolated, self._run, jobs)

    def _run(self, jobs: list[SampleJob]) -> list:
        """Seedless jobs with equal (n, temperature, top_k) share one call; a job with a seed is sampled
        alone, so its candidates equal `model.sample(before, [action], n, seed=seed)`."""
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            key = (job.n, job.temperature, job.top_k, job.parts) if job.seed is None else ("seeded", i)
            groups.setdefault(key, []).append(i)
        results: list = [None] * len(jobs)
        for idx in groups.values():
            group = [jobs[i] for i in idx]
            first = group[0]
            seed = first.seed if first.seed is not None else int(np.random.randint(2**31))
            before = np.stack([self._model_input(j.png) for j in group])

            def sample():
                actions = [j.action for j in group]
                codes = self.model.sample(before, actions, n=first.n, temperature=first.temperature,
                                          top_k=first.top_k, seed=seed)
                parts = {}
                if "fdp" in first.parts:
                    parts["fdp"] = fdp_score(self.model, before, codes, actions)
                if "edit" in first.parts:
                    parts["edit"] = edit_fraction(self.model.tokenizer, before, codes)
                return codes, self.model.tokenizer.decode(codes.reshape(-1, codes.shape[-1])), parts

            out = self._model_call(group, sample)
            if out is None:  # every request of the group was cancelled
                for i in idx:
                    results[i] = asyncio.CancelledError()
                continue
            codes, images, parts = out
            self._count_rows("sampled_rows", len(idx) * first.n)
            images = images.reshape(len(idx), first.n, *images.shape[1:])
            for row, i in enumerate(idx):
                results[i] = {"codes": codes[row].numpy().astype(np.int32), "pngs": [encode_png(im) for im in images[row]],
                              "seed": first.seed, "model_id": self.model.model_id,
                              "image_size": int(self.model.tokenizer.image_size),
                              "parts": {k: v[row].tolist() for k, v in parts.items()}}
        return results


@serve.deployment(name=VERIFIER)
class Verifier(ModelTier):
    """IDP tier: mean action log-prob of each candidate (one batched forward), and pair captions."""

    def __init__(self, path: str, max_prompt_tokens: int = 256, max_rows: int = 32, batch_wait_timeout_s: float = 0.005,
                 faults: dict | None = None):
        super().__init__(path, max_prompt_tokens, faults)
        for method in (self._score_batched, self._caption_batched):
            method.set_max_batch_size(max_rows)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def score(self, before: bytes, candidates: np.ndarray | list[bytes], action: str) -> list[float]:
        self.check_prompt(action, "prompt")
        return await _submit(self._score_batched, ScoreJob(before, candidates, action))

    async def caption(self, before: bytes, after: bytes, action: str | None = None) -> dict:
        if action is not None:
            self.check_prompt(action, "action")
        return await _submit(self._caption_batched, CaptionJob(before, after, action))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=scored_rows)
    async def _score_batched(self, jobs: list[ScoreJob]) -> list:
        return await asyncio.to_thread(isolated, self._score, jobs)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _caption_batched(self, jobs: list[CaptionJob]) -> list:
        return await asyncio.to_thread(isolated, self._caption, jobs)

    def _after(self, candidates) -> np.ndarray | torch.Tensor:
        if isinstance(candidates, np.ndarray):  # arrives read-only through the object store: copy
            return torch.from_numpy(np.array(candidates, dtype=np.int64))
        return np.stack([self._model_input(p) for p in candidates])

    def _score(self, jobs: list[ScoreJob]) -> list:
        counts = [len(j.candidates) for j in jobs]
        before = np.concatenate([np.repeat(self._model_input(j.before)[None], c, 0) for j, c in zip(jobs, counts)])
        parts = [self._after(j.candidates) for j in jobs]
        after = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)
        actions = [j.action for j, c in zip(jobs, counts) for _ in range(c)]
        scores = self._model_call(jobs, lambda: self.model.action_logprob(before, after, actions).tolist())
        if scores is None:
            return [asyncio.CancelledError()] * len(jobs)
        self._count_rows("scored_rows", len(scores))
        out, start = [], 0
        for c in counts:
            out.append(scores[start: start + c])
            start += c
        return out

    def _caption(self, jobs: list[CaptionJob]) -> list:
        before = np.stack([self._model_input(j.before) for j in jobs])
        after = np.stack([self._model_input(j.after) for j in jobs])
        todo = [i for i, j in enumerate(jobs) if j.action is None]

        def caption_and_score():
            actions = [j.action for j in jobs]
            if todo:
                for i, text in zip(todo, self.model.caption(before[todo], after[todo])):
                    actions[i] = text
            return actions, self.model.action_logprob(before, after, actions).tolist()

        out = self._model_call(jobs, caption_and_score)
        if out is None:
            return [asyncio.CancelledError()] * len(jobs)
        actions, scores = out
        return [{"action": a, "score": s, "captioned": j.action is None, "model_id": self.model.model_id}
                for a, s, j in zip(actions, scores, jobs)]
