"""The best-of-N Serve app on a real local Ray cluster, over real HTTP (httpx and the openai client).

Two apps share one module-scoped cluster:
- `main` at /        : no auth, tight image limits (so oversize cases are cheap to build);
- `guarded` at /g    : bearer token required, generator with 1 request in flight + 1 queued (-> 429),
                       candidates sent to the verifier as PNGs instead of codes.
Checkpoints are untrained tiny models (the generator and verifier differ, so scores must come from the
verifier); nothing here depends on accuracy.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dynboot.images import decode_image, encode_png
from dynboot.best_of_n import score_candidates
from dynboot.models.registry import load_model
from dynboot.models.tiny import TinyWorldModel
from dynboot.world import WorldSpec, random_scene, render
from dynboot.world.actions import valid_actions
from serve.schemas import GENERATOR, INGRESS, VERIFIER, AppArgs

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

TOKEN_ENV, TOKEN = "DYNBOOT_TEST_SERVE_TOKEN", "s3cret-token"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tier(**kw) -> dict:
    auto = {k: kw.pop(k) for k in ("min_replicas", "max_replicas") if k in kw}
    return {"num_cpus": 0.25, "autoscaling": {"upscale_delay_s": 2.0, "downscale_delay_s": 10.0, **auto}, **kw}


@pytest.fixture(scope="module")
def scene():
    spec = WorldSpec()
    s = random_scene(spec, np.random.default_rng(3))
    return render(spec, s), valid_actions(spec, s)[0].text(spec)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    paths = {}
    for name, size, seed in (("fdp", "xs", 0), ("idp", "xs", 1), ("fdp_slow", "m", 2)):
        paths[name] = str(TinyWorldModel.create(WorldSpec(), size=size, seed=seed).save(root / name))
    from serve.app import build_app

    main = build_app({"generator_path": paths["fdp"], "verifier_path": paths["idp"], "max_n": 8,
                      "max_image_bytes": 64 * 1024, "max_image_pixels": 128 * 128, "api_token_env": "DYNBOOT_UNSET_TOKEN_ENV",
                      "generator": tier(min_replicas=1, max_replicas=1), "verifier": tier(min_replicas=1, max_replicas=1),
                      "ingress": tier(min_replicas=1, max_replicas=1)})
    os.environ[TOKEN_ENV] = TOKEN
    guarded = build_app({"generator_path": paths["fdp_slow"], "verifier_path": paths["idp"], "api_token_env": TOKEN_ENV,
                         "replica_retries": 0, "candidate_transport": "png", "generator_batch": {"max_batch_size": 1},
                         "generator": tier(min_replicas=1, max_replicas=1, max_ongoing_requests=1, max_queued_requests=1),
                         "verifier": tier(min_replicas=1, max_replicas=1), "ingress": tier(min_replicas=1, max_replicas=1)})
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(main, name="main", route_prefix="/", blocking=False)
        serve.run(guarded, name="guarded", route_prefix="/g", blocking=False)
        yield {"url": f"http://127.0.0.1:{port}", "paths": paths}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def post_edit(url: str, png: bytes, prompt: str | None = "move the red circle left", headers=None, files=None,
              **fields) -> httpx.Response:
    """Multipart POST; text fields go as filename-less parts so the body is multipart even without files."""
    parts = list(files if files is not None else [("image", ("before.png", png, "image/png"))])
    parts += [(k, (None, str(v))) for k, v in fields.items()]
    if prompt is not None:
        parts.append(("prompt", (None, prompt)))
    return httpx.post(f"{url}/v1/images/edits", files=parts, headers=headers, timeout=60)


def error_of(r: httpx.Response) -> dict:
    return r.json()["error"]


def test_health_ready_and_models(app):
    assert httpx.get(f"{app['url']}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{app['url']}/readyz", timeout=30).json()
    assert ready["ready"] and ready["generator"]["tokens_per_image"] == ready["verifier"]["tokens_per_image"] == 25
    assert httpx.get(f"{app['url']}/v1/models").json()["data"][0]["id"] == "dynboot-best-of-n"


def test_best_of_n_matches_direct_verifier(app, scene):
    """The served candidates are the generator's seeded sample; their scores are the verifier's own, and the
    returned image is the argmax."""
    before, action = scene
    r = post_edit(app["url"], encode_png(before), action, n=6, seed=123, temperature=1.0, return_candidates="true")
    assert r.status_code == 200, r.text
    body = r.json()
    codes = torch.tensor([c["codes"] for c in body["candidates"]])
    gen, ver = load_model(app["paths"]["fdp"]), load_model(app["paths"]["idp"])
    assert torch.equal(codes, gen.sample(before[None], [action], n=6, seed=123)[0])
    direct = score_candidates(ver, before[None], codes[None], [action])[0]
    np.testing.assert_allclose(body["scores"], direct.numpy(), atol=1e-4)
    assert len(set(np.round(body["scores"], 4))) > 1, "candidates should differ in score"
    assert body["chosen_index"] == int(np.argmax(body["scores"]))
    best = decode_image(base64.b64decode(body["data"][0]["b64_json"]))
    np.testing.assert_array_equal(best, gen.tokenizer.decode(codes[body["chosen_index"]][None])[0])
    assert body["verifier_transport"] == "codes" and body["size"] == "40x40"


def test_openai_client_round_trip_and_resize(app, scene):
    openai = pytest.importorskip("openai")
    before, action = scene
    big = np.asarray(Image.fromarray(before).resize((80, 80), Image.NEAREST))  # resized back to 40x40 by the model tier
    client = openai.OpenAI(base_url=f"{app['url']}/v1", api_key="unused", max_retries=0)
    resp = client.images.edit(image=("before.png", encode_png(big), "image/png"), prompt=action, n=4,
                              response_format="b64_json")
    assert len(resp.data) == 1 and decode_image(base64.b64decode(resp.data[0].b64_json)).shape == (40, 40, 3)
    extra = resp.model_extra
    assert len(extra["scores"]) == 4 and extra["chosen_index"] == int(np.argmax(extra["scores"]))
    assert extra["input_size"] == "80x80"
    with pytest.raises(openai.BadRequestError, match="n must be between 1 and 8"):
        client.images.edit(image=("before.png", encode_png(before), "image/png"), prompt=action, n=9)


def test_actions_caption_and_score(app, scene):
    before, action = scene
    files = {"before": ("a.png", encode_png(before)), "after": ("b.png", encode_png(before))}
    r = httpx.post(f"{app['url']}/v1/actions", files=files, timeout=60)
    assert r.status_code == 200 and r.json()["captioned"] and isinstance(r.json()["score"], float), r.text
    scored = httpx.post(f"{app['url']}/v1/actions", files=files, data={"action": action}, timeout=60).json()
    direct = load_model(app["paths"]["idp"]).action_logprob(before[None], before[None], [action])[0].item()
    assert scored["action"] == action and not scored["captioned"] and abs(scored["score"] - direct) < 1e-4


def _png(w: int, h: int, fmt: str = "PNG", noise: bool = False) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8) if noise else np.zeros((h, w, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


BAD_EDITS = {  # name: (post_edit kwargs builder, status, code, words in the message)
    "wrong file field": (lambda png: {"files": [("picture", ("x.png", png))]}, 400, "unknown_field", "picture"),
    "no image field": (lambda png: {"files": [], "n": 2}, 400, "missing_field", "image"),
    "missing prompt": (lambda png: {"prompt": None}, 400, "missing_field", "prompt"),
    "empty prompt": (lambda png: {"prompt": "  "}, 400, "empty_field", "prompt"),
    "long prompt": (lambda png: {"prompt": "x" * 1001}, 400, "field_too_long", "prompt"),
    "n too large": (lambda png: {"n": 9}, 400, "n_out_of_range", "n must be between 1 and 8"),
    "n zero": (lambda png: {"n": 0}, 400, "n_out_of_range", "got 0"),
    "n not a number": (lambda png: {"n": "many"}, 400, "invalid_field", "'n' must be an integer"),
    "temperature negative": (lambda png: {"temperature": -1}, 400, "temperature_out_of_range", "temperature"),
    "unknown field": (lambda png: {"colour": "red"}, 400, "unknown_field", "colour"),
    "mask": (lambda png: {"files": [("image", ("a.png", png)), ("mask", ("m.png", png))]}, 400, "unsupported_field", "mask"),
    "url response": (lambda png: {"response_format": "url"}, 400, "unsupported_response_format", "b64_json"),
    "two images": (lambda png: {"files": [("image[]", ("a.png", png)), ("image[]", ("b.png", png))]}, 400,
                   "too_many_images", "exactly one"),
    "image as text": (lambda png: {"files": [], "image": "not-a-file"}, 400, "invalid_field", "file upload"),
    "garbage image": (lambda png: {"files": [("image", ("a.png", b"definitely not an image"))]}, 400, "invalid_image", "decodable"),
    "truncated png": (lambda png: {"files": [("image", ("a.png", _png(64, 64, noise=True)[:400]))]}, 400, "invalid_image", "image"),
    "gif": (lambda png: {"files": [("image", ("a.gif", _png(40, 40, "GIF")))]}, 415, "unsupported_image_format", "GIF"),
    "too many pixels": (lambda png: {"files": [("image", ("a.png", _png(200, 200)))]}, 413, "image_too_many_pixels", "200x200"),
    "image too large": (lambda png: {"files": [("image", ("a.png", _png(160, 160, noise=True)))]}, 413, "image_too_large", "65536"),
    "body too large": (lambda png: {"files": [("image", ("a.png", os.urandom(300_000)))]}, 413, "body_too_large", "limit"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_bad_edit_requests_get_named_4xx(app, scene, case):
    build, status, code, words = BAD_EDITS[case]
    kw = build(encode_png(scene[0]))
    prompt = kw.pop("prompt", scene[1])
    r = post_edit(app["url"], b"", prompt, **kw)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["code"] == code and words in err["message"], err


def test_other_bad_requests_and_replica_survives(app, scene):
    url = app["url"]
    r = httpx.post(f"{url}/v1/images/edits", json={"image": "x", "prompt": "y"})
    assert r.status_code == 415 and "multipart/form-data" in error_of(r)["message"]

    def chunks():  # chunked upload without Content-Length: capped while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield os.urandom(8192)

    r = httpx.post(f"{url}/v1/images/edits", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"
    r = httpx.post(f"{url}/v1/images/edits", content=b"--b\r\nnonsense", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and error_of(r)["code"] == "malformed_body", r.text
    r = httpx.post(f"{url}/v1/actions", files={"before": ("a.png", encode_png(scene[0]))})
    assert r.status_code == 400 and error_of(r)["param"] == "after"
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    ok = post_edit(url, encode_png(scene[0]), scene[1], n=2)
    assert ok.status_code == 200, ok.text


def test_auth_on_guarded_app_and_off_on_main(app, scene):
    openai = pytest.importorskip("openai")
    url, png = f"{app['url']}/g", encode_png(scene[0])
    r = post_edit(url, png, scene[1], n=1)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "bearer token" in error_of(r)["message"]
    assert post_edit(url, png, scene[1], n=1, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
    assert client.images.edit(image=("a.png", png, "image/png"), prompt=scene[1], n=1).data[0].b64_json
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).images.edit(image=("a.png", png), prompt="x")
    assert post_edit(app["url"], png, scene[1], n=1).status_code == 200  # main app: auth off


def test_png_candidate_transport_scores_like_codes(app, scene):
    before, action = scene
    r = post_edit(f"{app['url']}/g", encode_png(before), action, n=3, seed=7, return_candidates="true",
                  headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["verifier_transport"] == "png", r.text
    codes = torch.tensor([c["codes"] for c in r.json()["candidates"]])
    direct = score_candidates(load_model(app["paths"]["idp"]), before[None], codes[None], [action])[0]
    np.testing.assert_allclose(r.json()["scores"], direct.numpy(), atol=1e-4)


def test_full_queue_gets_429_and_nothing_else_fails(app, scene):
    url, png = f"{app['url']}/g", encode_png(scene[0])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: post_edit(url, png, scene[1], n=16, headers=auth), range(12)))
    codes = [r.status_code for r in responses]
    assert codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert error_of(rejected)["code"] == "queue_full" and "generator queue is full" in error_of(rejected)["message"]
    assert int(rejected.headers["retry-after"]) >= 1
    assert post_edit(url, png, scene[1], n=1, headers=auth).status_code == 200  # the replica is fine afterwards


def _replicas(app_name: str, deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def test_killed_generator_replica_is_replaced_and_no_request_is_lost(app, scene):
    url, png = app["url"], encode_png(scene[0])
    (victim,) = _replicas("main", GENERATOR)

    def request(i: int) -> tuple[int, int]:
        for attempt in range(8):  # clients may retry 429/503; no request may be lost
            r = post_edit(url, png, scene[1], n=4)
            if r.status_code not in (429, 503):
                return r.status_code, attempt
            time.sleep(0.5)
        return r.status_code, attempt

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(request, i) for i in range(32)]
        while sum(f.done() for f in futures) < 4:  # kill mid-load: some answered, most still to come
            time.sleep(0.05)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result(timeout=180) for f in futures]
    assert [code for code, _ in results] == [200] * 32, results
    deadline = time.time() + 60
    while time.time() < deadline:
        status = serve.status().applications["main"].deployments[GENERATOR]
        if status.replica_states.get("RUNNING", 0) >= 1 and victim not in _replicas("main", GENERATOR):
            break
        time.sleep(1)
    assert _replicas("main", GENERATOR) and victim not in _replicas("main", GENERATOR)
    assert post_edit(url, png, scene[1], n=2).status_code == 200


def test_config_yaml_matches_app_defaults():
    """serve/config.yaml is a valid Serve config whose tiers equal what `dynboot serve` deploys."""
    from ray.serve.schema import ServeDeploySchema

    text = (REPO / "serve" / "config.yaml").read_text()
    assert text.startswith("# serve run serve/config.yaml")
    cfg = yaml.safe_load(text)
    ServeDeploySchema.model_validate(cfg)
    (application,) = cfg["applications"]
    assert application["import_path"] == "serve.app:build_app"
    args = AppArgs.model_validate(application["args"])
    assert args.model_dump(exclude={"generator_path", "verifier_path"}) == AppArgs().model_dump(
        exclude={"generator_path", "verifier_path"})
    deployed = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application["deployments"]}
    assert deployed == {GENERATOR: args.generator.serve_options(), VERIFIER: args.verifier.serve_options(),
                        INGRESS: args.ingress.serve_options()}


def test_app_args_reject_inconsistent_settings():
    with pytest.raises(ValueError, match="batches could never fill"):
        AppArgs(generator={"max_ongoing_requests": 2}, generator_batch={"max_batch_size": 8})
    with pytest.raises(ValueError, match="generator_path is not set"):
        AppArgs().check_paths()


def test_dynboot_serve_names_a_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dynboot.cli", "serve", f"generator_path={tmp_path}", f"verifier_path={tmp_path}"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "generator_path" in r.stderr and "dynboot.json" in r.stderr


@pytest.mark.slow
def test_dynboot_serve_prints_url_and_shuts_down_on_sigterm(app, tmp_path):
    """`dynboot serve` on its own local cluster: ready URL printed, answers, SIGTERM -> app deleted, its Ray
    processes gone, exit 0."""
    import psutil

    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dynboot.cli", "serve", f"generator_path={app['paths']['fdp']}",
                                 f"verifier_path={app['paths']['idp']}", f"port={port}", "num_cpus=2"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while "dynboot serve: ready at" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, f"dynboot serve exited before it was ready:\n{log.read_text()[-2000:]}"
            time.sleep(0.5)
        assert f"dynboot serve: ready at http://127.0.0.1:{port} " in log.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).json()["ready"]
        proc.terminate()
        assert proc.wait(timeout=90) == 0
        assert "dynboot serve: shutting down" in log.read_text()
        session = f"_{proc.pid}"
        left = [p.pid for p in psutil.process_iter(["cmdline"])
                if any(a.startswith("--session-name=session_") and a.endswith(session) for a in (p.info["cmdline"] or []))]
        assert not left, f"Ray processes of the dynboot serve session still running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
