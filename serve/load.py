"""Load benchmark of the best-of-N app on loopback: latency by N, sustained load, replica counts over time.

    python -m serve.load generator_path=CKPT verifier_path=CKPT out=runs/serve_load
    python -m serve.load out=runs/serve_load         # no checkpoints given: untrained tiny ones (plumbing numbers)

Starts its own local Ray cluster and app (loopback only, bounded in time and request count), then:
  1. latency: `latency_requests` sequential best-of-N requests (best_of = N, n = 1 image returned) for each N in
     `ns` -> p50/p95 (client side)
     and the server's own generate/verify split; goal p50(N=8) <= 2 x p50(N=1);
  2. best-of-N load: `clients` concurrent clients for `load_s` -> status counts (goal: 0 5xx), latency;
  3. idle for `idle_s` (tiers scale back down);
  4. verifier-only load: `clients` clients on /v1/actions for `actions_s` (only the IDP tier is busy);
  5. idle for `idle_s` again.
Replica counts of each deployment are sampled every `sample_every_s` throughout. Prints a summary and
writes `<out>/load.json`. Metrics push intervals are shortened (env, before Ray starts) so scaling shows
within minutes; delays come from the tier settings below.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import Field

from dynboot.cli import job_main
from dynboot.io.rundir import write_json
from serve.run_local import ServeConfig, start, stop
from serve.schemas import GENERATOR, INGRESS, TIER_DEFAULTS, VERIFIER, DeploymentOptions, merged

# scaling must show within a bounded run: react after 3 s of load, give replicas back after 15 s of idle
QUICK = {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 3.0, "downscale_delay_s": 15.0}}


def quick_tier(name: str) -> DeploymentOptions:
    return DeploymentOptions.model_validate(merged(TIER_DEFAULTS[name], QUICK))


class LoadConfig(ServeConfig):
    """The app (as `dynboot serve` takes it, with quicker autoscaling) plus the load phases."""

    out: str = Field("runs/serve_load", description="Output directory (load.json; tiny checkpoints when none are given).")
    port: int = Field(0, ge=0, le=65535, description="HTTP port (0 = a free loopback port).")
    num_cpus: int = Field(4, ge=1, description="Logical CPUs of the local Ray cluster.")
    ns: list[int] = Field([1, 4, 8], description="N values (best_of: candidates sampled and verified) of the latency phase.")
    latency_requests: int = Field(30, ge=3, description="Sequential requests per N (after 3 warm-up requests).")
    clients: int = Field(8, ge=1, description="Concurrent clients in the load phases.")
    load_n: int = Field(8, ge=1, description="N (best_of) of the best-of-N load phase.")
    load_s: float = Field(75.0, gt=0, le=600, description="Seconds of best-of-N load.")
    actions_s: float = Field(60.0, ge=0, le=600, description="Seconds of verifier-only (/v1/actions) load.")
    idle_s: float = Field(45.0, ge=0, le=600, description="Seconds of idle after each load phase.")
    max_requests: int = Field(20000, ge=1, description="Hard cap on requests per load phase.")
    sample_every_s: float = Field(1.0, gt=0, description="Replica-count sampling period.")
    generator: DeploymentOptions = Field(default_factory=lambda: quick_tier("generator"), description=(
        "Generator tier (quicker autoscaling than the serving default)."))
    verifier: DeploymentOptions = Field(default_factory=lambda: quick_tier("verifier"), description=(
        "Verifier tier (quicker autoscaling than the serving default)."))


def world_requests(count: int, seed: int = 0) -> list[tuple[bytes, bytes, str]]:
    """(before PNG, after PNG, action) triples from the embedded world."""
    from dynboot.io.images import encode_png
    from dynboot.world import WorldSpec, apply_action, random_scene, render
    from dynboot.world.actions import valid_actions

    spec, rng, out = WorldSpec(), np.random.default_rng(seed), []
    while len(out) < count:
        scene = random_scene(spec, rng)
        actions = valid_actions(spec, scene)
        if actions:
            act = actions[int(rng.integers(len(actions)))]
            out.append((encode_png(render(spec, scene)), encode_png(render(spec, apply_action(spec, scene, act))), act.text(spec)))
    return out


def ensure_checkpoints(cfg: LoadConfig) -> LoadConfig:
    if cfg.generator_path and cfg.verifier_path:
        return cfg
    from dynboot.models.tiny import TinyWorldModel
    from dynboot.world import WorldSpec

    root = Path(cfg.out) / "tiny_checkpoints"
    for name, seed in (("fdp", 0), ("idp", 1)):
        if not (root / name / "dynboot.json").is_file():
            TinyWorldModel.create(WorldSpec(), seed=seed).save(root / name)
    return cfg.model_copy(update={"generator_path": str(root / "fdp"), "verifier_path": str(root / "idp")})


class Sampler(threading.Thread):
    """Replica counts of each deployment over time (RUNNING, and `<name>_starting`: the autoscaler's new
    replicas still loading), tagged with the current phase."""

    def __init__(self, app_name: str, every_s: float):
        super().__init__(daemon=True)
        self.app_name, self.every_s, self.phase, self.rows, self.stop_event = app_name, every_s, "start", [], threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        from ray import serve

        while not self.stop_event.is_set():
            try:
                deps = serve.status().applications[self.app_name].deployments
                row = {}
                for name in (GENERATOR, VERIFIER, INGRESS):
                    states = {str(getattr(k, "value", k)): v for k, v in deps[name].replica_states.items()}
                    row[name] = states.get("RUNNING", 0)
                    row[f"{name}_starting"] = sum(states.get(k, 0) for k in ("STARTING", "RECOVERING", "UPDATING"))
                self.rows.append({"t": round(time.time() - self.t0, 1), "phase": self.phase, **row})
            except Exception as err:  # the status call can time out on a busy box; keep sampling
                self.rows.append({"t": round(time.time() - self.t0, 1), "phase": self.phase, "error": repr(err)})
            self.stop_event.wait(self.every_s)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values) * 1000
    return {"count": len(a), "p50_ms": round(float(np.percentile(a, 50)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1),
            "mean_ms": round(float(a.mean()), 1)}


def post(client, url: str, pair: tuple[bytes, bytes, str], n: int | None) -> tuple[int, float, dict]:
    before, after, action = pair
    t = time.perf_counter()
    if n is None:
        r = client.post(f"{url}/v1/actions", files={"before": ("a.png", before), "after": ("b.png", after)})
    else:
        r = client.post(f"{url}/v1/images/edits", files={"image": ("a.png", before, "image/png")},
                        data={"prompt": action, "best_of": str(n)})
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    return r.status_code, time.perf_counter() - t, body


def latency_phase(url: str, cfg: LoadConfig, pairs) -> dict:
    import httpx

    out = {}
    with httpx.Client(timeout=120) as client:
        for n in cfg.ns:
            for i in range(3):
                post(client, url, pairs[i], n)
            lat, gen, ver, codes = [], [], [], Counter()
            for i in range(cfg.latency_requests):
                code, dt, body = post(client, url, pairs[i % len(pairs)], n)
                codes[code] += 1
                if code == 200:
                    lat.append(dt)
                    gen.append(body["timings_ms"]["generate"])
                    ver.append(body["timings_ms"]["verify"])
            out[str(n)] = {**percentiles(lat), "status": dict(codes),
                           "server_generate_p50_ms": round(float(np.median(gen)), 1) if gen else None,
                           "server_verify_p50_ms": round(float(np.median(ver)), 1) if ver else None}
            print(f"  N={n}: p50 {out[str(n)].get('p50_ms')} ms, p95 {out[str(n)].get('p95_ms')} ms "
                  f"(server generate {out[str(n)]['server_generate_p50_ms']} ms, verify {out[str(n)]['server_verify_p50_ms']} ms)")
    return out


def load_phase(url: str, cfg: LoadConfig, pairs, seconds: float, n: int | None) -> dict:
    """`cfg.clients` threads, each looping requests until the time or the request cap runs out."""
    import httpx

    deadline, lock = time.time() + seconds, threading.Lock()
    codes, latencies, issued, errors = Counter(), [], [0], Counter()

    def client_loop(k: int) -> None:
        with httpx.Client(timeout=120) as client:
            i = k
            while time.time() < deadline:
                with lock:
                    if issued[0] >= cfg.max_requests:
                        return
                    issued[0] += 1
                try:
                    code, dt, _ = post(client, url, pairs[i % len(pairs)], n)
                except Exception as err:  # transport failure: counted, never silent
                    code, dt = -1, 0.0
                    errors[type(err).__name__] += 1
                with lock:
                    codes[code] += 1
                    if code == 200:
                        latencies.append(dt)
                i += cfg.clients

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(cfg.clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    total = sum(codes.values())
    return {"seconds": round(elapsed, 1), "requests": total, "ok": codes.get(200, 0),
            "status": {str(k): v for k, v in sorted(codes.items())}, "5xx": sum(v for k, v in codes.items() if k >= 500),
            "429": codes.get(429, 0), "transport_errors": dict(errors), "throughput_rps": round(total / elapsed, 2),
            **percentiles(latencies)}


def scaling_summary(rows: list[dict]) -> dict:
    out = {}
    for name in (GENERATOR, VERIFIER, INGRESS):
        per_phase: dict[str, list[int]] = {}
        for r in rows:
            if name in r:
                per_phase.setdefault(r["phase"], []).append(r[name])
        out[name] = {"phases": {phase: {"min": min(v), "max": max(v), "last": v[-1]} for phase, v in per_phase.items()}}
        for label, key in (("first_scale_up_decided_at", f"{name}_starting"), ("first_2nd_replica_running_at", name)):
            hits = [(r["t"], r["phase"]) for r in rows if r.get(key, 0) > (0 if key.endswith("_starting") else 1)]
            out[name][label] = {"t": hits[0][0], "phase": hits[0][1]} if hits else None
    return out


def run(cfg: LoadConfig) -> dict:
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("error: the load script only talks to loopback; host must be 127.0.0.1")
    for var in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ.setdefault(var, "2")
    cfg = ensure_checkpoints(cfg)
    pairs = world_requests(64)
    url = start(cfg)
    print(f"load: app at {url}")
    sampler = Sampler(cfg.app_name, cfg.sample_every_s)
    sampler.start()
    result: dict = {"config": cfg.model_dump(mode="json")}
    try:
        sampler.phase = "latency"
        print("latency by N (sequential):")
        result["latency"] = latency_phase(url, cfg, pairs)
        p1, p8 = result["latency"].get("1", {}).get("p50_ms"), result["latency"].get("8", {}).get("p50_ms")
        result["p50_ratio_n8_over_n1"] = round(p8 / p1, 2) if p1 and p8 else None
        for phase, seconds, n in (("load_best_of_n", cfg.load_s, cfg.load_n), ("idle_1", cfg.idle_s, None),
                                  ("load_actions", cfg.actions_s, None), ("idle_2", cfg.idle_s, None)):
            sampler.phase = phase
            print(f"{phase}: {seconds:.0f} s")
            if phase.startswith("idle"):
                time.sleep(seconds)
                continue
            result[phase] = load_phase(url, cfg, pairs, seconds, n)
            print(f"  {result[phase]}")
    finally:
        sampler.stop_event.set()
        sampler.join(timeout=30)
        result["replicas"] = sampler.rows
        result["scaling"] = scaling_summary(sampler.rows)
        stop(cfg)
    path = write_json(Path(cfg.out) / "load.json", result)
    print(f"p50(N=8)/p50(N=1) = {result['p50_ratio_n8_over_n1']}")
    for name, s in result["scaling"].items():
        print(f"  {name} running replicas (min-max) by phase: "
              + ", ".join(f"{ph} {v['min']}-{v['max']}" for ph, v in s["phases"].items())
              + f"; scale-up decided at {s['first_scale_up_decided_at']}")
    print(f"written {path}")
    return result


if __name__ == "__main__":
    sys.exit(job_main(LoadConfig, run, doc=__doc__))
