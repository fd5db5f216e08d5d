"""Faults that heal, deadlines and slow clients, on a real local Ray cluster of their own (slow).

- `faulty` at /f: the generator raises a CUDA-style RuntimeError on its 2nd model call (a test-only fault set
  through the app's args, `generator_faults`; no request field reaches it) and is health-checked every second;
- `slow` at /s:   the generator sleeps 4 s before each model call while requests have a 2 s deadline; bodies
                  must arrive within 1 s; the ingress holds 2 requests at a time.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from dynboot.io.images import encode_png
from serve.schemas import GENERATOR
from serve_harness import checkpoints, error_of, post_edit, replicas, serve_apps, tier, wait_ready, world_scene

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scene():
    return world_scene(5)


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    paths = checkpoints(tmp_path_factory.mktemp("faults"), {"fdp": ("xs", 0), "idp": ("xs", 1)})
    base = {"generator_path": paths["fdp"], "verifier_path": paths["idp"], "max_best_of": 4,
            "api_token_env": "DYNBOOT_UNSET_TOKEN_ENV", "verifier": tier(), "ingress": tier()}
    faulty = base | {"generator_faults": {"device_error_on_call": 2}, "replica_retries": 0,
                     "generator": tier(health_check_period_s=1.0, health_check_timeout_s=10.0)}
    slow = base | {"generator_faults": {"delay_s": 4.0}, "request_deadline_s": 2.0, "body_timeout_s": 1.0,
                   "generator": tier(), "ingress": tier(max_ongoing_requests=2)}
    with serve_apps({"faulty": ("/f", faulty), "slow": ("/s", slow)}) as url:
        wait_ready(f"{url}/f")
        wait_ready(f"{url}/s")
        yield url


def test_a_cuda_error_fails_the_health_check_the_replica_is_replaced_and_later_requests_succeed(apps, scene):
    url, image = f"{apps}/f", encode_png(scene[0])
    (victim,) = replicas("faulty", GENERATOR)
    assert post_edit(url, image, scene[1], best_of=2).status_code == 200  # model call 1
    r = post_edit(url, image, scene[1], best_of=2)  # model call 2: "CUDA error: an illegal memory access"
    assert r.status_code == 503, r.text
    err = error_of(r)
    assert err["code"] == "replica_unavailable" and "ReplicaUnhealthy" in err["message"] and r.headers["retry-after"] == "1"
    assert "CUDA" not in err["message"]  # the client learns the class of the failure, not internals
    deadline, codes = time.time() + 120, []
    while time.time() < deadline:  # Serve replaces the replica once its check_health fails
        running = serve.status().applications["faulty"].deployments[GENERATOR].replica_states.get("RUNNING", 0)
        if victim not in replicas("faulty", GENERATOR) and running >= 1:
            break
        time.sleep(0.5)
    assert victim not in replicas("faulty", GENERATOR), "the broken replica was never replaced"
    for _ in range(3):
        codes.append(post_edit(url, image, scene[1], best_of=2).status_code)
        if codes[-1] == 200:
            break
        time.sleep(1)
    assert codes[-1] == 200, codes
    r = post_edit(url, image, scene[1], generator_faults="{}")  # the fault hook is not a request field
    assert r.status_code == 400 and error_of(r)["code"] == "unknown_field"


def test_a_request_past_its_deadline_gets_504_and_its_model_work_is_cancelled(apps, scene):
    url, image = f"{apps}/s", encode_png(scene[0])
    generator = serve.get_deployment_handle(GENERATOR, "slow")
    r = post_edit(url, image, scene[1], best_of=3)
    assert r.status_code == 504, r.text
    err = error_of(r)
    assert err["code"] == "timeout" and "2 s deadline" in err["message"] and "generator" in err["message"]
    counters: dict = {}
    deadline = time.time() + 30
    while time.time() < deadline and not counters.get("cancelled_jobs"):  # the 4 s "forward" ends, then it looks
        time.sleep(0.5)
        counters = generator.counters.remote().result()
    assert counters.get("cancelled_jobs") == 1 and counters.get("sampled_rows", 0) == 0, counters


def _stalled_body(url: str, path: str) -> socket.socket:
    """A client that sends its headers and part of a multipart body, then stops sending."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = (f"POST {parts.path}{path} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Length: 100000\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n")
    sock.sendall(head.encode() + b"--b\r\nContent-Disposition: form-data; name=\"before\"; filename=\"a.png\"\r\n\r\n")
    return sock


def test_slow_request_bodies_get_408_and_free_their_ingress_slots(apps, scene):
    """Two stalled uploads occupy both ingress slots; each gets 408 after the 1 s body deadline, and a normal
    request queued behind them is then answered."""
    url = f"{apps}/s"
    stalled = [_stalled_body(url, "/v1/actions") for _ in range(2)]
    try:
        time.sleep(0.3)  # both reach the ingress first
        files = {"before": ("a.png", encode_png(scene[0])), "after": ("b.png", encode_png(scene[0]))}
        with ThreadPoolExecutor(1) as pool:
            normal = pool.submit(httpx.post, f"{url}/v1/actions", files=files, timeout=60)
            answers = []
            for sock in stalled:
                data = b""
                while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                answers.append(data)
            assert normal.result().status_code == 200, normal.result().text
    finally:
        for sock in stalled:
            sock.close()
    for data in answers:
        status_line, _, rest = data.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), data[:300]
        body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "body_timeout" and "1 s" in body["error"]["message"], body
