"""serve/config.yaml, the app's settings (serve.schemas.AppArgs) and the `dynboot serve` command, without the test
Serve cluster of tests/test_serve.py (the command starts its own)."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import yaml

from serve.schemas import GENERATOR, INGRESS, VERIFIER, AppArgs
from serve_harness import REPO, checkpoints, free_port

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    return checkpoints(tmp_path_factory.mktemp("serve_command"), {"fdp": ("xs", 0), "idp": ("xs", 1)})


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
    assert cfg["http_options"] == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": args.proxy_timeout_s()}


def test_app_args_reject_inconsistent_settings():
    with pytest.raises(ValueError, match="would fit no batch"):
        AppArgs(max_best_of=16, generator_batch={"max_rows": 8})
    with pytest.raises(ValueError, match="must exceed the longest request"):
        AppArgs(request_deadline_s=200, ingress={"graceful_shutdown_timeout_s": 60})
    with pytest.raises(ValueError, match="default_best_of"):
        AppArgs(max_best_of=4, default_best_of=8)
    with pytest.raises(ValueError, match="generator_path is not set"):
        AppArgs().check_paths()


def test_dynboot_serve_names_a_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dynboot.cli", "serve", f"generator_path={tmp_path}", f"verifier_path={tmp_path}"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "generator_path" in r.stderr and "dynboot.json" in r.stderr


def test_dynboot_serve_refuses_an_open_api_beyond_loopback(paths):
    """No token and host=0.0.0.0: refused before anything starts or binds, naming the variable and the opt-out."""
    base = [sys.executable, "-m", "dynboot.cli", "serve", f"generator_path={paths['fdp']}",
            f"verifier_path={paths['idp']}", "host=0.0.0.0", "api_token_env=DYNBOOT_UNSET_TOKEN_ENV"]
    r = subprocess.run(base, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "refusing to serve without authentication on 0.0.0.0" in r.stderr, r.stderr
    assert "DYNBOOT_UNSET_TOKEN_ENV" in r.stderr and "allow_unauthenticated=true" in r.stderr


@pytest.mark.slow
def test_dynboot_serve_prints_url_and_shuts_down_on_sigterm(paths, tmp_path):
    """`dynboot serve` on its own local cluster: ready URL printed, answers, SIGTERM -> app deleted, its Ray
    processes gone, exit 0."""
    import psutil

    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dynboot.cli", "serve", f"generator_path={paths['fdp']}",
                                 f"verifier_path={paths['idp']}", f"port={port}", "num_cpus=2"],
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
