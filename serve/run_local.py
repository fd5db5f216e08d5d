"""`dynboot serve`: start the best-of-N Serve app on a local Ray cluster (or an existing one) and wait.

    dynboot serve generator_path=runs/quickstart/fdp_boot/model verifier_path=runs/quickstart/idp/model
    dynboot serve my_serve.yaml port=8001 max_best_of=8 generator.autoscaling.max_replicas=4
    python -m serve.run_local generator_path=... verifier_path=...          # the same program

On a cluster use the Serve config instead: `serve run serve/config.yaml` (local) or
`serve deploy serve/config.yaml -a http://<head>:8265` (needs the dashboard; see serve/config.yaml).

Set DYNBOOT_API_TOKEN (or the env var named by `api_token_env`) to require `Authorization: Bearer <token>`.
Without it the command refuses `host=` beyond loopback (unless allow_unauthenticated=true) and, on loopback,
serves loopback clients only. Ctrl-C or SIGTERM deletes the app and stops the Ray cluster this command started
(never anyone else's).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

from pydantic import Field

from dynboot.cli import job_main
from serve.auth import UnsafeExposure, check_exposure
from serve.schemas import AppArgs


class ServeConfig(AppArgs):
    """Everything `build_app` takes (checkpoints, limits, auth, tiers) plus where to listen and which Ray to use."""

    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to listen on every interface).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the Serve proxy (0 = a free port on `host`, "
                      "chosen at start; `start` returns the URL with it).")
    app_name: str = Field("dynboot", description="Serve application name.")
    route_prefix: str = Field("/", description="URL prefix of the app.")
    ray_address: str = Field("", description="Ray cluster to join ('auto' or host:port); empty starts a local one.")
    num_cpus: int = Field(0, ge=0, description=(
        "Logical CPUs of the local cluster (0 = the machine's count; more than the cores is fine for "
        "fractional replicas)."))

    def app_args(self) -> dict:
        return self.model_dump(mode="json", include=set(AppArgs.model_fields))

    def check_exposure(self) -> None:
        """The ingress replicas refuse an exposed unauthenticated API; say so before anything starts."""
        check_exposure(self.host, bool(os.environ.get(self.api_token_env, "").strip()), self)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now. The OS picks it (bind to port 0); the Serve proxy binds it a moment later, a
    window in which another process could take it: Serve's proxy does not report the port it bound when given 0."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(cfg: ServeConfig) -> str:
    """Start Ray (unless joined) + Serve, deploy the app, return its URL (port 0: a free one, see `free_port`)."""
    import ray
    from ray import serve

    from serve.app import build_app

    cfg.check_exposure()
    app = build_app(cfg.app_args())  # checks the checkpoints before anything starts
    if not ray.is_initialized():
        if cfg.ray_address:
            ray.init(address=cfg.ray_address)
        else:
            ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False)
    port = cfg.port or free_port(cfg.host)
    serve.start(http_options={"host": cfg.host, "port": port, "request_timeout_s": cfg.proxy_timeout_s()})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{port}{cfg.route_prefix.rstrip('/')}"


def stop(cfg: ServeConfig) -> None:
    """Delete our app; shut Serve and Ray down only when this process started the cluster."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    serve.delete(cfg.app_name)
    if not cfg.ray_address:
        serve.shutdown()
        ray.shutdown()


def run(cfg: ServeConfig) -> None:
    try:
        cfg.check_paths()
        cfg.check_exposure()
    except (ValueError, UnsafeExposure) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    done = threading.Event()

    def on_signal(*_):
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        url = start(cfg)
        for sig in (signal.SIGINT, signal.SIGTERM):  # again: ray.init installs its own handler, which aborts
            signal.signal(sig, on_signal)
        print(f"dynboot serve: ready at {url}  (routes: /v1/images/edits /v1/actions /v1/models /healthz /readyz)")
        print(f"  try: curl -s {url}/readyz ; stop with Ctrl-C", flush=True)
        done.wait()
    finally:
        print("dynboot serve: shutting down", flush=True)
        stop(cfg)


if __name__ == "__main__":
    sys.exit(job_main(ServeConfig, run, doc=__doc__))
