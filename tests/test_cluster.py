"""The cluster definitions agree with the code. `python -m pytest -q tests/test_cluster.py` (seconds, no cluster).

Checked: every YAML under cluster/ parses; every `python -m jobs.<name>` command (RayJob entrypoints and the
commands in cluster/README.md) names a job module of the repo and its config file and `key=value` overrides
load into that job's config class (the class its `job_main(...)` call names); every repo file the manifests and
the README mention exists; Ray cluster specs put no work on the head, autoscale a GPU group and keep the job API
in-cluster with token auth; the RayService's Serve config passes Ray Serve's own schema and matches
serve/config.yaml; aws.yaml passes the cluster launcher's schema; one image and one Ray version everywhere;
the Dockerfile installs the project. Pod security, secrets, the NetworkPolicy and IAM: tests/test_cluster_security.py.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from cluster_manifests import (CLUSTER, DOCKERFILE, K8S, RAY_MANIFESTS, README, ROOT, SECRET_NAME, SECRET_VALUE,
                               containers, load_docs, manifest, ray_cluster_specs)
from dynboot.config import Config, load_config

MANIFESTS = ["raycluster.yaml", "rayjob-relabel.yaml", "rayjob-train.yaml", "rayservice.yaml", "shared-storage.yaml",
             "networkpolicy.yaml"]
# Fields of the KubeRay ray.io/v1 CRDs (KubeRay v1.7 API reference) at the levels these manifests write: a typo
# there is silently dropped by the API server's pruning, so it is caught here.
KUBERAY_FIELDS = {
    "RayClusterSpec": {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                       "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                       "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
                       "workerGroupSpecs"},
    "HeadGroupSpec": {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                      "rayStartParams", "serviceType"},
    "WorkerGroupSpec": {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                        "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"},
    "AutoscalerOptions": {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                          "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args"},
    "AuthOptions": {"enableK8sTokenAuth", "secretName", "mode"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                   "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                   "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                   "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
                   "shutdownAfterJobFinishes", "suspend"},
    "RayServiceSpec": {"rayClusterDeletionDelaySeconds", "serveService", "upgradeStrategy", "managedBy",
                       "serveConfigV2", "rayClusterConfig", "excludeHeadPodFromServeSvc", "suspend"},
}


# ---- helpers ------------------------------------------------------------------------------------------------
def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def image_workdir() -> str:
    """The project directory inside the image (the Dockerfile's last WORKDIR)."""
    return re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]


def readme_commands() -> list[str]:
    """Logical lines (backslash continuations joined) of the README's fenced code blocks."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", README.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def job_commands() -> list[tuple[str, list[str]]]:
    """(where, argv from `python -m jobs.X` on) for every job command of the manifests and the README."""
    found = [(f"{name}: entrypoint", manifest(name)["spec"]["entrypoint"]) for name in ("rayjob-relabel.yaml", "rayjob-train.yaml")]
    found += [("cluster/README.md", line) for line in readme_commands() if "python -m jobs." in line]
    out = []
    for where, text in found:
        argv = shlex.split(text[text.index("python -m jobs."):], comments=True)
        out.append((where, argv[2:]))  # drop "python -m"
    return out


def config_class(module_name: str) -> type[Config]:
    """The config class the job module's entry point uses: `job_main(<Class>, ...)`."""
    module = importlib.import_module(module_name)
    source = Path(module.__file__).read_text()
    names = re.findall(r"job_main\(([\w.]+)", source)  # `RelabelConfig` or `relabel.RelabelConfig`
    assert len(names) == 1, f"{module_name}: expected one job_main(Config, run) call, found {names}"
    cls = getattr(module, names[0].split(".")[-1])
    assert issubclass(cls, Config)
    return cls


def mentioned_repo_paths(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w/.])((?:jobs/configs|serve|cluster|tests)/[\w./-]+\.(?:yaml|py|md|txt)|cluster/Dockerfile)", text))


# ---- every file parses ----------------------------------------------------------------------------------------
def test_every_cluster_yaml_parses_into_documents():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {*MANIFESTS, "aws.yaml", "runtime_env.yaml"}
    for f in files:
        docs = load_docs(f)
        assert docs and all(isinstance(d, dict) for d in docs), f
    for name in MANIFESTS:
        kind = load_docs(K8S / name)[0]["kind"]
        assert kind in {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim", "NetworkPolicy"}, (name, kind)


def test_kuberay_fields_are_known():
    def check(level: str, obj: dict, where: str):
        unknown = set(obj) - KUBERAY_FIELDS[level]
        assert not unknown, f"{where}: fields unknown to KubeRay's {level}: {sorted(unknown)}"

    for name, spec in ray_cluster_specs().items():
        check("RayClusterSpec", spec, name)
        check("HeadGroupSpec", spec["headGroupSpec"], name)
        check("AutoscalerOptions", spec.get("autoscalerOptions", {}), name)
        check("AuthOptions", spec.get("authOptions", {}), name)
        for group in spec["workerGroupSpecs"]:
            check("WorkerGroupSpec", group, f"{name} {group['groupName']}")
    for name in ("rayjob-relabel.yaml", "rayjob-train.yaml"):
        check("RayJobSpec", manifest(name)["spec"], name)
    check("RayServiceSpec", manifest("rayservice.yaml")["spec"], "rayservice.yaml")


# ---- job entrypoints ------------------------------------------------------------------------------------------
def test_job_commands_name_existing_modules_and_valid_config_keys():
    commands = job_commands()
    modules = {argv[0] for _, argv in commands}
    assert {"jobs.relabel", "jobs.train", "jobs.filter", "jobs.evaluate"} <= modules
    for where, argv in commands:
        module, args = argv[0], argv[1:]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{where}: no module {module}"
        cls = config_class(module)
        if args and "=" not in args[0]:  # a leading config file, relative to the job's working dir (the repo)
            assert (ROOT / args[0]).is_file(), f"{where}: config file {args[0]} does not exist"
            args = [str(ROOT / args[0]), *args[1:]]
        cfg = load_config(cls, args)  # raises ConfigError on an unknown key or a bad value
        if "out" in cls.model_fields:  # on a cluster, outputs must leave the pod: object storage (eval: the volume)
            kept = cfg.out.startswith("/mnt/shared/") if module == "jobs.evaluate" else cfg.out.startswith("s3://")
            assert kept, f"{where}: out={cfg.out} would stay in the pod (object storage; eval: /mnt/shared)"
        if module == "jobs.relabel":  # else the driver (on the CPU head) loads the IDP to read its input size
            assert cfg.image_size > 0, f"{where}: set image_size on a cluster"


def test_a_bad_override_would_be_caught():
    """The check above is only worth something if load_config rejects what a typo produces."""
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(config_class("jobs.relabel"), ["max_actor=8"])
    with pytest.raises(ValueError):
        load_config(config_class("jobs.train"), ["num_workers=zero"])


def test_rayjobs_run_the_image_code_and_clean_up():
    for name in ("rayjob-relabel.yaml", "rayjob-train.yaml"):
        spec = manifest(name)["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0, name
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == f"local://{image_workdir()}", name
        assert not [k for k in runtime_env.get("env_vars", {}) if SECRET_NAME.search(k)], f"{name}: secret in runtime env"


def test_files_mentioned_exist():
    texts = {p: p.read_text() for p in [README, DOCKERFILE, *CLUSTER.rglob("*.yaml")]}
    for path, text in texts.items():
        for rel in mentioned_repo_paths(text):
            assert (ROOT / rel).exists(), f"{path.relative_to(ROOT)} mentions {rel}, which does not exist"
    for line in readme_commands():
        argv = shlex.split(line, comments=True)
        for flag in ("--runtime-env", "--working-dir"):
            if flag in argv:
                assert (ROOT / argv[argv.index(flag) + 1]).exists(), line


# ---- Ray clusters -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_ray_cluster_spec_cpu_head_gpu_workers_private_api(name):
    spec = ray_cluster_specs()[name]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: the head must take no tasks or actors"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits, f"{name}: GPU on the head"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), name
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"], name
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, f"{name}: no GPU worker group"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], (name, g["groupName"])
    if spec.get("enableInTreeAutoscaling"):
        assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), f"{name}: GPU group cannot scale"
    for c in containers(spec):
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']} not from a Secret"
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert {"/mnt/shared", "/dev/shm"} <= mounts, f"{name}: {c['name']} lacks the shared volume or /dev/shm"


def test_one_image_and_one_ray_version_everywhere():
    image = f"dynboot:{project_version()}"
    seen = {}
    for name, spec in ray_cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, name
        seen |= {f"{name}:{c['name']}": c["image"] for c in containers(spec)}
    seen["aws.yaml:docker"] = load_docs(CLUSTER / "aws.yaml")[0]["docker"]["image"]
    assert set(seen.values()) == {image}, seen
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(p.startswith("ray[") and p.endswith(f"=={ray.__version__}") for p in pins)
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311"), base
    assert image in README.read_text() and image in DOCKERFILE.read_text()


# ---- serving ------------------------------------------------------------------------------------------------------
def test_rayservice_serve_config_matches_serve_config_yaml():
    from ray.serve.schema import ServeDeploySchema

    from serve.schemas import AppArgs

    embedded = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(embedded)  # Ray Serve's own checks (rejects a local working_dir, bad keys)
    assert [a["name"] for a in embedded["applications"]] == [a["name"] for a in local["applications"]]
    for app, ref in zip(embedded["applications"], local["applications"]):
        assert app["import_path"] == ref["import_path"] == "serve.app:build_app"
        assert app["route_prefix"] == ref["route_prefix"]
        assert [d["name"] for d in app["deployments"]] == [d["name"] for d in ref["deployments"]]
        assert set(app["args"]) == set(ref["args"]), "args keys differ from serve/config.yaml"
        args = AppArgs.model_validate(app["args"])  # valid builder args (paths are checked when the app builds)
        assert args.generator_path.startswith("s3://") and args.verifier_path.startswith("s3://")
        working_dir = app.get("runtime_env", {}).get("working_dir", "")
        assert not working_dir or "://" in working_dir, "Serve configs reject a local working_dir"
        deployments = {d["name"]: d for d in app["deployments"]}
        for tier, batch in (("Generator", args.generator_batch), ("Verifier", args.verifier_batch)):
            dep = deployments[tier]
            assert batch.max_rows >= args.max_best_of, f"{tier}: a request with best_of = max_best_of fits no batch"
            scaling = dep["autoscaling_config"]  # each model tier scales on its own
            assert scaling["min_replicas"] < scaling["max_replicas"], tier
            assert dep["ray_actor_options"]["num_gpus"] > 0, f"{tier} should run on a GPU"
        assert deployments["Generator"]["autoscaling_config"] != deployments["Verifier"]["autoscaling_config"]
        longest = args.request_deadline_s + args.body_timeout_s
        for dep in app["deployments"]:  # a stopping replica finishes its longest request; the proxy outwaits the ingress
            assert dep["graceful_shutdown_timeout_s"] > longest, dep["name"]
        assert embedded["http_options"]["request_timeout_s"] >= args.proxy_timeout_s()
        assert not args.allow_unauthenticated and args.api_token_env == "DYNBOOT_API_TOKEN"
    assert embedded["http_options"]["host"] == "0.0.0.0"  # the Kubernetes serve service reaches the proxies


def test_rayservice_gpu_group_covers_model_replicas():
    spec = manifest("rayservice.yaml")["spec"]
    app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
    gpus_needed = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"].get("num_gpus", 0)
                      for d in app["deployments"])
    gpus_floor = sum(d["autoscaling_config"]["min_replicas"] * d["ray_actor_options"].get("num_gpus", 0)
                     for d in app["deployments"])
    (gpu_group,) = [g for g in spec["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    per_pod = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpu_group["maxReplicas"] * per_pod >= gpus_needed
    assert gpu_group["minReplicas"] * per_pod >= gpus_floor
    assert spec["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}


# ---- VMs: the cluster launcher ----------------------------------------------------------------------------------
def test_aws_launcher_yaml_passes_the_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_docs(CLUSTER / "aws.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(cfg)))  # the checks `ray up` runs before any cloud call
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types and all(t["min_workers"] < t["max_workers"] for t in gpu_types)
    assert cfg["max_workers"] == sum(t.get("max_workers", 0) for n, t in types.items() if n != cfg["head_node_type"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert all(SECRET_VALUE.search(v) is None for v in map(str, cfg["file_mounts"].values()))


# ---- the image recipe -----------------------------------------------------------------------------------------------
def test_dockerfile_installs_the_project_and_prebuilds_deepspeed():
    text = DOCKERFILE.read_text()
    assert re.search(r"^RUN pip install [^\n]*-e \.\s*$", text, re.M), "the project is not installed"
    copied = re.findall(r"^COPY (?:--\S+ )*(.+?)\s+\S+$", text, re.M)
    sources = {s for line in copied for s in line.split()}
    assert {"pyproject.toml", "dynboot", "jobs", "serve"} <= sources and "." not in sources
    assert all((ROOT / s).exists() for s in sources)
    assert "DS_BUILD_" in text and "ShareMemCommBuilder" in text and "ds_report" in text
    assert f"deepspeed=={importlib.metadata.version('deepspeed')}" in text
    assert f"torch=={importlib.metadata.version('torch').split('+')[0]}" in text
    assert not re.search(r"^EXPOSE\b.*\b(8265|6379|10001)\b", text, re.M), "the job API / GCS must not be exposed"
