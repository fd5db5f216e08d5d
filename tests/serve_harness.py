"""What the serve test modules share: tiny checkpoints, a local Ray cluster running several apps, HTTP helpers.

    with serve_apps({"main": ("/", args), ...}, env={"TOKEN_VAR": "x"}) as url: ...

Checkpoints are untrained tiny models (generator and verifier differ, so scores must come from the verifier);
nothing here depends on accuracy. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from dynboot.models.tiny import TinyWorldModel
from dynboot.world import WorldSpec, random_scene, render
from dynboot.world.actions import valid_actions

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tier(**kw) -> dict:
    """A small test tier: a quarter CPU, fixed replica count unless given, quick health checks."""
    auto = {k: kw.pop(k) for k in ("min_replicas", "max_replicas") if k in kw}
    return {"num_cpus": 0.25, "autoscaling": {"upscale_delay_s": 2.0, "downscale_delay_s": 10.0,
                                              "min_replicas": 1, "max_replicas": 1, **auto}, **kw}


def checkpoints(root: Path, specs: dict[str, tuple[str, int]]) -> dict[str, str]:
    """{name: (tiny size, seed)} -> {name: checkpoint dir}."""
    return {name: str(TinyWorldModel.create(WorldSpec(), size=size, seed=seed).save(root / name))
            for name, (size, seed) in specs.items()}


def world_scene(seed: int = 3) -> tuple[np.ndarray, str]:
    spec = WorldSpec()
    s = random_scene(spec, np.random.default_rng(seed))
    return render(spec, s), valid_actions(spec, s)[0].text(spec)


def png(w: int, h: int, fmt: str = "PNG", noise: bool = False) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8) if noise else np.zeros((h, w, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def post_edit(url: str, before: bytes, prompt: str | None = "move the red circle left", headers=None, files=None,
              timeout: float = 60, **fields) -> httpx.Response:
    """Multipart POST of `before` (PNG bytes) unless `files` replaces it; text fields go as filename-less parts so
    the body is multipart even without files."""
    parts = list(files if files is not None else [("image", ("before.png", before, "image/png"))])
    parts += [(k, (None, str(v))) for k, v in fields.items()]
    if prompt is not None:
        parts.append(("prompt", (None, prompt)))
    return httpx.post(f"{url}/v1/images/edits", files=parts, headers=headers, timeout=timeout)


def post_rollout(url: str, image: bytes, actions, timeout: float = 120, headers=None, **fields) -> httpx.Response:
    """Multipart POST to /v1/rollouts: `image` (PNG bytes) unless None, `actions` as a JSON array unless given as a
    string (or None: left out), text fields as for post_edit."""
    parts = [("image", ("start.png", image, "image/png"))] if image is not None else []
    parts += [(k, (None, str(v))) for k, v in fields.items()]
    if actions is not None:
        parts.append(("actions", (None, actions if isinstance(actions, str) else json.dumps(actions))))
    return httpx.post(f"{url}/v1/rollouts", files=parts, headers=headers, timeout=timeout)


def error_of(r: httpx.Response) -> dict:
    """The OpenAI error object of a response, checked for its shape."""
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["type"], err
    return err


def wait_ready(url: str, timeout_s: float = 240, headers=None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", headers=headers, timeout=15).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


@contextmanager
def serve_apps(apps: dict[str, tuple[str, dict]], env: dict[str, str] | None = None, num_cpus: int = 4):
    """A local Ray cluster running `apps` ({name: (route_prefix, build_app args)}); yields the base URL.
    `env` is set before Ray starts, so every replica inherits it (as pods inherit their Secrets)."""
    import ray
    from ray import serve

    from serve.app import build_app

    env = env or {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    built = {name: (prefix, build_app(args)) for name, (prefix, args) in apps.items()}
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, (prefix, app) in built.items():
            serve.run(app, name=name, route_prefix=prefix, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def replicas(app_name: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))
