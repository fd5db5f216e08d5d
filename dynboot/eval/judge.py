"""LLM-as-judge for image edits (paper §4.1 / App. F): the zero-shot VIEScore TIE "SC" prompt, sent with
the before image, the edited image and the instruction through the `openai` client.

    judge = Judge("gpt-4o-2024-11-20", cache_path="runs/eval/judge_cache.jsonl")          # OPENAI_API_KEY
    judge = Judge("qwen2.5-vl", base_url="http://127.0.0.1:8000/v1", api_key_env="LOCAL_KEY")  # any compatible server
    results = judge.score_many([(before, edited, "move the cup left"), ...])
    results[0].success, results[0].minimal, results[0].score    # 0-10, 0-10, min of the two

- The ground-truth target is never shown (as in the paper); temperature 0; images go as base64 PNG data URLs.
- Calls run on a thread pool; 429, 5xx, timeouts and connection errors are retried with exponential
  back-off (honouring `Retry-After`), other 4xx are not.
- Every reply is appended to a JSONL cache keyed by sha256(base URL, model, prompt version, every
  generation parameter, both PNGs, instruction): a rerun, or the same edit twice, pays nothing again.
  Only replies that parse are reused; an unparsable or empty reply is recorded (`parsed: false`) but
  asked again by a later call or rerun, and failed calls are not cached, so a rerun retries them.
- An unparsable reply or a failed call gives scores None and an `error`; they are counted in `stats`.
- The API key lives only in the client: it is never written to the cache, results, stats or logs (error
  texts are redacted). Which key goes where (`judge_api_key`): a judge-specific variable (`api_key_env`
  other than OPENAI_API_KEY, or DYNBOOT_JUDGE_API_KEY) goes to the judge's base URL, whatever it is; the
  general OPENAI_API_KEY goes only to OpenAI's own endpoint or to a base URL over HTTPS or on loopback,
  never in clear text to another host (the judge refuses to start instead). The base URL is the one the
  client would use: `base_url`, else OPENAI_BASE_URL, else OpenAI's.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
import openai

from dynboot.io.images import decode_image, encode_png

__all__ = ["Judge", "JudgeError", "JudgeResult", "PROMPT_VERSION", "judge_prompt", "judge_api_key", "parse_scores",
           "as_png"]

log = logging.getLogger("dynboot.eval.judge")

PROMPT_VERSION = "viescore-tie-sc-0shot-v1"

_CONTEXT = """You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.
All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.

You will have to give your output in this way (Keep your reasoning concise and short.):
{
"score" : [...],
"reasoning" : "..."
}"""

_RULES = """RULES:

Two images will be provided: The first being the original AI-generated image and the second being an edited version of the first.
The objective is to evaluate how successfully the editing instruction has been executed in the second image.

Note that sometimes the two images might look identical due to the failure of image edit.

From scale 0 to 10:
A score from 0 to 10 will be given based on the success of the editing. (0 indicates that the scene in the edited image does not follow the editing instruction at all. 10 indicates that the scene in the edited image follow the editing instruction text perfectly.)
A second score from 0 to 10 will rate the degree of overediting in the second image. (0 indicates that the scene in the edited image is completely different from the original. 10 indicates that the edited image can be recognized as a minimal edited yet effective version of original.)
Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and 'score2' evaluates the degree of overediting.

Editing instruction: """

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
JUDGE_KEY_ENV = "DYNBOOT_JUDGE_API_KEY"
OPENAI_BASE_URL = "https://api.openai.com/v1"
_RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)


class JudgeError(RuntimeError):
    """A judge that cannot run at all (no API key for a hosted endpoint)."""


@dataclass
class JudgeResult:
    success: float | None  # 0-10 edit success
    minimal: float | None  # 0-10 minimal editing (10 = nothing changed but the edit)
    score: float | None  # min(success, minimal): the per-sample score the paper averages
    key: str
    reply: str = ""
    error: str | None = None  # "unparsable reply" or the (redacted) API error
    cached: bool = False


def judge_prompt(instruction: str) -> str:
    return f"{_CONTEXT}\n\n{_RULES}{instruction}\n"


def as_png(image: np.ndarray | bytes) -> bytes:
    """An RGB array or encoded image bytes -> PNG bytes (other formats are decoded and re-encoded)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        return data if data.startswith(_PNG_MAGIC) else encode_png(decode_image(data))
    return encode_png(np.asarray(image, dtype=np.uint8))


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_NUMBER = r"-?\d+(?:\.\d+)?"


def parse_scores(reply: str) -> tuple[float, float] | None:
    """The two scores of a reply: the list after "score", else the first list holding two numbers.
    None when there is no such list or a score lies outside 0-10."""
    if not isinstance(reply, str):
        return None
    m = re.search(r"""["']?score["']?\s*[:=]\s*\[([^\]]*)\]""", reply, re.IGNORECASE)
    lists = [m.group(1)] if m else re.findall(r"\[([^\[\]]*)\]", reply)
    for body in lists:
        nums = re.findall(_NUMBER, body)
        if len(nums) >= 2:
            a, b = float(nums[0]), float(nums[1])
            return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None
    return None


def effective_base_url(base_url: str | None) -> str:
    """The URL the openai client will call: `base_url`, else OPENAI_BASE_URL (which the client reads), else OpenAI's."""
    return (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")


def _safe_for_general_key(url: str) -> bool:
    parts = urlsplit(url)
    if url == OPENAI_BASE_URL or parts.scheme == "https":
        return True
    host = parts.hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def judge_api_key(base_url: str, api_key_env: str = OPENAI_KEY_ENV, api_key: str | None = None) -> str | None:
    """The key to send to `base_url` (None: no key available). Raises JudgeError rather than send the general
    OPENAI_API_KEY in clear text to another host."""
    if api_key:
        return api_key  # passed in explicitly by the caller
    if api_key_env != OPENAI_KEY_ENV:
        return os.environ.get(api_key_env) or None  # a variable named for this judge
    if os.environ.get(JUDGE_KEY_ENV):
        return os.environ[JUDGE_KEY_ENV]
    key = os.environ.get(OPENAI_KEY_ENV)
    if key and not _safe_for_general_key(base_url):
        raise JudgeError(f"refusing to send {OPENAI_KEY_ENV} to {base_url}: it is not OpenAI's endpoint and not "
                         f"HTTPS or loopback. Use an https:// judge_base_url, or put the judge server's own key in "
                         f"{JUDGE_KEY_ENV} (or name another variable with judge_api_key_env=)")
    return key or None


def _result(key: str, reply: str, cached: bool) -> JudgeResult:
    scores = parse_scores(reply)
    if scores is None:
        return JudgeResult(None, None, None, key, reply, "unparsable reply", cached)
    return JudgeResult(scores[0], scores[1], min(scores), key, reply, None, cached)


class Judge:
    """VIEScore-style edit judge over any OpenAI-compatible chat.completions endpoint, with a reply cache."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 api_key: str | None = None, cache_path: str | Path | None = None, concurrency: int = 4,
                 max_retries: int = 6, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 timeout_s: float = 120.0, max_tokens: int = 512):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        url = effective_base_url(base_url)
        key = judge_api_key(url, api_key_env, api_key)
        if not key:
            if url == OPENAI_BASE_URL:
                raise JudgeError(f"no API key for the judge: set the environment variable {api_key_env} "
                                 "(or name another with judge_api_key_env=), or point judge_base_url= at a local server")
            key = "no-key"  # local OpenAI-compatible servers usually take any key; the client insists on one
        # the client's own retries are off: ours count, log and honour Retry-After the same way for every server
        self._client = openai.OpenAI(api_key=key, base_url=url, max_retries=0, timeout=timeout_s)
        self.model, self.base_url = model, url
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        # every parameter that shapes a reply: sent with each call and part of each cache key
        self.generation = {"temperature": 0, "max_tokens": max_tokens}
        self.cache_path = Path(cache_path) if cache_path else None
        self._lock = threading.Lock()
        self._cache: dict[str, str] = self._load_cache()
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "new_replies": 0, "unparsable": 0, "failed": 0}

    def __repr__(self) -> str:
        return f"Judge(model={self.model!r}, base_url={self.base_url!r}, cache={str(self.cache_path)!r})"

    # ---- cache -----------------------------------------------------------------------------------
    def _load_cache(self) -> dict[str, str]:
        if not self.cache_path or not self.cache_path.exists():
            return {}
        cache = {}
        for line in self.cache_path.read_text().splitlines():
            try:  # a line cut short by a crash is skipped, not fatal
                row = json.loads(line)
                if parse_scores(row["reply"]) is not None:  # unparsable replies are asked again
                    cache[row["key"]] = row["reply"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        return cache

    def _store(self, key: str, instruction: str, reply: str) -> None:
        parsed = parse_scores(reply) is not None
        with self._lock:
            if parsed:
                self._cache[key] = reply
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                row = {"key": key, "base_url": self.base_url, "model": self.model, "prompt_version": PROMPT_VERSION,
                       "generation": self.generation, "instruction": instruction, "reply": reply, "parsed": parsed,
                       "time": round(time.time(), 3)}
                with open(self.cache_path, "a") as f:
                    f.write(json.dumps(row) + "\n")

    def cache_key(self, before_png: bytes, edited_png: bytes, instruction: str) -> str:
        h = hashlib.sha256()
        for part in (self.base_url.encode(), self.model.encode(), PROMPT_VERSION.encode(),
                     json.dumps(self.generation, sort_keys=True).encode(), hashlib.sha256(before_png).digest(),
                     hashlib.sha256(edited_png).digest(), instruction.encode()):
            h.update(len(part).to_bytes(8, "little") + part)
        return h.hexdigest()

    # ---- calls -----------------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        key = self._client.api_key
        return text.replace(key, "***") if key and len(key) >= 4 else text

    def _count(self, name: str, k: int = 1) -> None:
        with self._lock:
            self.stats[name] += k

    def _delay(self, attempt: int, err: Exception) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (1 + 0.25 * random.random())
        response = getattr(err, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        try:
            if retry_after is not None:
                delay = max(delay, min(float(retry_after), self.max_backoff_s))
        except ValueError:
            pass  # an HTTP-date Retry-After: keep our own back-off
        return delay

    def _call(self, before_png: bytes, edited_png: bytes, instruction: str) -> str:
        messages = [{"role": "user", "content": [
            {"type": "text", "text": judge_prompt(instruction)},
            {"type": "image_url", "image_url": {"url": _data_url(before_png)}},
            {"type": "image_url", "image_url": {"url": _data_url(edited_png)}},
        ]}]
        for attempt in range(self.max_retries + 1):
            self._count("requests")
            try:
                resp = self._client.chat.completions.create(model=self.model, messages=messages, **self.generation)
                return resp.choices[0].message.content or ""
            except _RETRYABLE as err:
                if attempt == self.max_retries:
                    raise
                delay = self._delay(attempt, err)
                self._count("retries")
                log.warning("judge call failed (%s), retry %d/%d in %.2fs", self._redact(type(err).__name__ + ": " + str(err))[:200],
                            attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _score_one(self, before_png: bytes, edited_png: bytes, instruction: str, key: str) -> JudgeResult:
        try:
            reply = self._call(before_png, edited_png, instruction)
        except Exception as err:  # noqa: BLE001 - one failed item must not stop the others
            self._count("failed")
            msg = self._redact(f"{type(err).__name__}: {err}")[:500]
            return JudgeResult(None, None, None, key, "", msg, False)
        self._count("new_replies")
        self._store(key, instruction, reply)
        return _result(key, reply, cached=False)

    def score_many(self, items: Sequence[tuple[np.ndarray | bytes, np.ndarray | bytes, str]],
                   progress: Callable[[int, int], None] | None = None) -> list[JudgeResult]:
        """Judge (before, edited, instruction) triples; results in input order. Cached and repeated
        items cost no request; unparsable replies and failed calls come back with `error` set."""
        prepared = [(as_png(b), as_png(e), str(t)) for b, e, t in items]
        keys = [self.cache_key(*p) for p in prepared]
        results: dict[str, JudgeResult] = {}
        todo: dict[str, tuple[bytes, bytes, str]] = {}
        for k, p in zip(keys, prepared):
            if k in self._cache:
                results[k] = _result(k, self._cache[k], cached=True)
            else:
                todo.setdefault(k, p)  # the same edit twice in one call is asked once
        if todo:
            with ThreadPoolExecutor(min(self.concurrency, len(todo)), thread_name_prefix="judge") as pool:
                futures = {k: pool.submit(self._score_one, *p, k) for k, p in todo.items()}
                for i, (k, fut) in enumerate(futures.items()):
                    results[k] = fut.result()
                    if progress:
                        progress(i + 1, len(futures))
        out, seen = [], set()
        for k in keys:
            r = results[k]
            if k in seen:  # a repeat within this call paid nothing
                r = JudgeResult(**{**asdict(r), "cached": True})
            seen.add(k)
            out.append(r)
        self._count("cache_hits", sum(o.cached for o in out))
        self._count("unparsable", sum(o.error == "unparsable reply" for o in out))
        return out

    def score(self, before: np.ndarray | bytes, edited: np.ndarray | bytes, instruction: str) -> JudgeResult:
        return self.score_many([(before, edited, instruction)])[0]

    def close(self) -> None:
        self._client.close()
