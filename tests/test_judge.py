"""The LLM judge against a real OpenAI-compatible HTTP server on loopback (tests/openai_stub_server.py):
valid, malformed, 429-then-success and 5xx replies, the reply cache (what it keys on, what it does not keep),
which key goes to which base URL, and the API key staying secret.

    python -m pytest -q tests/test_judge.py
"""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from dynboot.eval.judge import JUDGE_KEY_ENV, Judge, JudgeError, as_png, judge_api_key, judge_prompt, parse_scores

sys.path.insert(0, str(Path(__file__).parent))
from openai_stub_server import StubJudgeServer  # noqa: E402

SECRET = "sk-test-Zq8vT3secret-judge-key-0042"


def _img(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _unchanged_score(a: np.ndarray, b: np.ndarray) -> int:
    return int(round(10 * float((a == b).all(-1).mean())))


@pytest.mark.parametrize("reply,expected", [
    ('{"score": [7, 8], "reasoning": "ok"}', (7.0, 8.0)),
    ("```python\n{'score' : [2.5, 9], 'reasoning': 'x [1, 1]'}\n```", (2.5, 9.0)),
    ("Scores: [3, 4]", (3.0, 4.0)),
    ('{"score": [11, 5]}', None),  # outside 0-10
    ('{"score": [6]}', None),
    ("I cannot rate these images.", None),
    ("", None),
])
def test_parse_scores(reply, expected):
    assert parse_scores(reply) == expected


def test_prompt_is_viescore_tie_sc():
    p = judge_prompt("move the cup left")
    assert "professional digital artist" in p and "degree of overediting" in p
    assert p.rstrip().endswith("Editing instruction: move the cup left")


def test_judge_against_local_server(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DYNBOOT_TEST_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    a, b = _img(0), _img(0).copy()
    b[:6] = 0  # a quarter of the rows changed
    c = _img(1)
    items = [(a, b, "paint the top black"),  # valid, partly changed
             (a, a, "make it blue"),  # identical: the stub says edit success 0, minimal 10
             (c, b, "[malformed] anything"),
             (a, c, "[ratelimit] rotate"),
             (c, a, "[error500] flip"),
             (b, c, "[alwaysfail] crop"),
             (as_png(a), as_png(b), "paint the top black")]  # the first item again, as PNG bytes
    cache = tmp_path / "cache.jsonl"
    with StubJudgeServer(api_key=SECRET) as server:
        judge = Judge("stub-judge", base_url=server.base_url, api_key_env="DYNBOOT_TEST_JUDGE_KEY", cache_path=cache,
                      concurrency=4, max_retries=2, backoff_s=0.01)
        res = judge.score_many(items)
        assert (res[0].success, res[0].minimal, res[0].score) == (7, _unchanged_score(a, b), min(7, _unchanged_score(a, b)))
        assert (res[1].success, res[1].minimal, res[1].score) == (0, 10, 0)
        assert res[2].score is None and res[2].error == "unparsable reply" and "not able" in res[2].reply
        assert res[3].score == min(7, _unchanged_score(a, c)) and res[3].error is None
        assert res[4].score == min(7, _unchanged_score(c, a)) and res[4].error is None
        assert res[5].score is None and "InternalServerError" in res[5].error
        assert res[6].score == res[0].score and res[6].cached  # asked once within the call
        statuses = {(r["instruction"], r["status"]) for r in server.requests}
        assert ("[ratelimit] rotate", 429) in statuses and ("[ratelimit] rotate", 200) in statuses
        assert ("[error500] flip", 500) in statuses and ("[error500] flip", 200) in statuses
        assert sum(r["instruction"] == "[alwaysfail] crop" for r in server.requests) == 3  # 1 + max_retries
        assert sum(r["instruction"] == "paint the top black" for r in server.requests) == 1
        assert server.count() == judge.stats["requests"] == 10  # 3 plain + 2 + 2 + 3
        assert judge.stats["retries"] == 4 and judge.stats["failed"] == 1 and judge.stats["unparsable"] == 1
        judge.close()

        # a rerun with a fresh judge on the same cache: every reply that parsed costs nothing; the unparsable
        # one (recorded, not reused) and the call that failed are asked again
        before = server.count()
        again = Judge("stub-judge", base_url=server.base_url, api_key_env="DYNBOOT_TEST_JUDGE_KEY", cache_path=cache,
                      max_retries=0, backoff_s=0.01)
        parsed = [0, 1, 3, 4, 6]
        res2 = again.score_many([items[i] for i in parsed])
        assert server.count() == before and again.stats["requests"] == 0
        assert [r.score for r in res2] == [res[i].score for i in parsed] and all(r.cached for r in res2)
        assert again.score(*items[2]).error == "unparsable reply" and server.count() == before + 1
        assert again.score(*items[2]).error == "unparsable reply" and server.count() == before + 2  # not kept in memory either
        again.score_many([items[5]])
        assert server.count() == before + 3
        rows = [json.loads(line) for line in cache.read_text().splitlines()]
        assert {r["parsed"] for r in rows if "[malformed]" in r["instruction"]} == {False}
        assert all(r["base_url"] == server.base_url.rstrip("/") and r["generation"]["temperature"] == 0 for r in rows)

        # another model name is another cache key
        other = Judge("stub-judge-2", base_url=server.base_url, api_key_env="DYNBOOT_TEST_JUDGE_KEY", cache_path=cache,
                      max_retries=0)
        assert other.score(a, b, "paint the top black").error.startswith("BadRequestError")  # the stub knows one model

    # the key never leaves the client: not in the cache, results, repr, stats or logs
    assert SECRET not in cache.read_text() and SECRET not in repr(judge)
    assert all(SECRET not in (r.error or "") + r.reply for r in res)
    assert SECRET not in caplog.text and SECRET not in str(judge.stats)


def test_wrong_key_is_not_retried_and_redacted(monkeypatch):
    monkeypatch.setenv("DYNBOOT_TEST_WRONG_KEY", "sk-wrong-" + SECRET)
    with StubJudgeServer(api_key=SECRET) as server:
        judge = Judge("stub-judge", base_url=server.base_url, api_key_env="DYNBOOT_TEST_WRONG_KEY", max_retries=3,
                      backoff_s=0.01)
        r = judge.score(_img(0), _img(1), "anything")
        assert r.score is None and r.error.startswith("AuthenticationError") and server.count(401) == 1
        assert SECRET not in r.error


def test_missing_key_for_hosted_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DYNBOOT_NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeError, match="DYNBOOT_NO_SUCH_KEY"):
        Judge("gpt-4o-2024-11-20", api_key_env="DYNBOOT_NO_SUCH_KEY")
    # a local server needs no key
    Judge("local", base_url="http://127.0.0.1:9/v1", api_key_env="DYNBOOT_NO_SUCH_KEY").close()


def test_cache_key_covers_base_url_model_and_every_generation_parameter(monkeypatch):
    monkeypatch.setenv("DYNBOOT_TEST_JUDGE_KEY", SECRET)
    a, b = as_png(_img(0)), as_png(_img(1))

    def key(**kw):
        args = {"model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "DYNBOOT_TEST_JUDGE_KEY"} | kw
        return Judge(**args).cache_key(a, b, "move it")

    base = key()
    assert key() == base
    assert len({base, key(base_url="http://127.0.0.1:10/v1"), key(model="m2"), key(max_tokens=64)}) == 4
    assert key(timeout_s=5, concurrency=1) == base  # transport settings do not change the reply


def test_general_openai_key_goes_only_to_openai_https_or_loopback(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv(JUDGE_KEY_ENV, raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert judge_api_key("https://api.openai.com/v1") == SECRET
    assert judge_api_key("https://judge.example.org/v1") == SECRET
    assert judge_api_key("http://127.0.0.1:8011/v1") == SECRET and judge_api_key("http://localhost:8011/v1") == SECRET
    with pytest.raises(JudgeError, match="refusing to send OPENAI_API_KEY to http://10.1.2.3:8000/v1"):
        Judge("qwen", base_url="http://10.1.2.3:8000/v1")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://judge.example.org/v1")  # the client would read it: so do we
    with pytest.raises(JudgeError, match=JUDGE_KEY_ENV):
        Judge("gpt-4o-2024-11-20")
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge-only-key")  # a judge-specific key may go to the judge's server
    assert Judge("qwen", base_url="http://10.1.2.3:8000/v1")._client.api_key == "sk-judge-only-key"
    monkeypatch.setenv("DYNBOOT_TEST_OTHER_KEY", "sk-named")
    assert judge_api_key("http://10.1.2.3:8000/v1", "DYNBOOT_TEST_OTHER_KEY") == "sk-named"


def test_general_key_reaches_a_loopback_judge(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv(JUDGE_KEY_ENV, raising=False)
    with StubJudgeServer(api_key=SECRET) as server:  # the stub answers 401 unless it receives exactly SECRET
        judge = Judge("stub-judge", base_url=server.base_url, max_retries=0)
        assert judge.score(_img(0), _img(1), "anything").error is None and server.count(200) == 1
