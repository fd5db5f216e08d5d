"""The cluster definitions agree with the code. `python -m pytest -q tests/test_cluster.py` (seconds, no cluster).

Checked: every YAML under cluster/ parses; every `python -m jobs.<name>` command (RayJob entrypoints and the
commands in cluster/README.md) names a job module of the repo and its config file and `key=value` overrides
load into that job's config class (the class its `job_main(...)` call names); every repo file the manifests and
the README mention exists; Ray cluster specs put no work on the head, autoscale a GPU group and keep the job API
in-cluster with token auth; the RayService's Serve config passes Ray Serve's own schema and matches
serve/config.yaml; aws.yaml passes the cluster launcher's schema; one image and one Ray version everywhere;
the Dockerfile installs the project, bakes in no secret and drops the base image's passwordless sudo. Security:
every pod (Ray heads and workers, RayJob submitters) and the autoscaler sidecar run non-root, without privilege
escalation or capabilities, on a read-only root with /tmp on an emptyDir; only the autoscaler holds a Kubernetes
API token; every pod that can run the Serve ingress has the serve token from a non-optional Secret; the
NetworkPolicy admits the job API from the namespace (and the KubeRay operator) only; aws.yaml gives the head and
the workers their own least-privilege instance profiles (cluster/iam/).
"""

from __future__ import annotations

import copy
import importlib
import json
import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from dynboot.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S = CLUSTER / "k8s"
README = CLUSTER / "README.md"
DOCKERFILE = CLUSTER / "Dockerfile"
MANIFESTS = ["raycluster.yaml", "rayjob-relabel.yaml", "rayjob-train.yaml", "rayservice.yaml", "shared-storage.yaml",
             "networkpolicy.yaml"]
RAY_MANIFESTS = ["raycluster.yaml", "rayjob-relabel.yaml", "rayjob-train.yaml", "rayservice.yaml"]
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
IAM = CLUSTER / "iam"
SECRET_NAME = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD|ACCESS_KEY)$", re.I)
SECRET_VALUE = re.compile(r"sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|-----BEGIN [A-Z ]*PRIVATE KEY|"
                          r"xox[abp]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{30,}")
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
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest(name: str) -> dict:
    (doc,) = load_docs(K8S / name)
    return doc


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def image_workdir() -> str:
    """The project directory inside the image (the Dockerfile's last WORKDIR)."""
    return re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]


def ray_cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": manifest("raycluster.yaml")["spec"],
            "rayjob-relabel.yaml": manifest("rayjob-relabel.yaml")["spec"]["rayClusterSpec"],
            "rayjob-train.yaml": manifest("rayjob-train.yaml")["spec"]["rayClusterSpec"],
            "rayservice.yaml": manifest("rayservice.yaml")["spec"]["rayClusterConfig"]}


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def pod_specs(name: str) -> dict[str, dict]:
    """Every pod template a manifest makes KubeRay create: head, each worker group, the RayJob submitter."""
    doc = manifest(name)
    spec = ray_cluster_specs()[name]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods |= {g["groupName"]: g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])}
    if doc["kind"] == "RayJob":
        pods["submitter"] = doc["spec"]["submitterPodTemplate"]["spec"]
    return pods


def container_violations(where: str, sc: dict | None) -> list[str]:
    sc = sc or {}
    out = []
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{where}: allowPrivilegeEscalation is not false")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.append(f"{where}: root filesystem is writable")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
        out.append(f"{where}: capabilities not dropped")
    if sc.get("privileged") or sc.get("runAsUser") == 0:
        out.append(f"{where}: privileged or root")
    return out


def hardening_violations(name: str, doc_spec: dict | None = None) -> list[str]:
    """What in a Ray manifest breaks the pod-security rules (README, "Security")."""
    spec = doc_spec or ray_cluster_specs()[name]
    out = []
    for pod_name, pod in pod_specs(name).items():
        where = f"{name} {pod_name}"
        if pod.get("automountServiceAccountToken") is not False:
            out.append(f"{where}: service-account token mounted")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            out.append(f"{where}: may run as root")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            out.append(f"{where}: no RuntimeDefault seccomp profile")
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in pod["containers"]:
            out += container_violations(f"{where} {c['name']}", c.get("securityContext"))
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if mounts.get("/tmp") not in empty_dirs:
                out.append(f"{where} {c['name']}: /tmp is not an emptyDir (Ray writes /tmp/ray)")
            if SA_TOKEN_PATH in mounts:
                out.append(f"{where} {c['name']}: holds a Kubernetes API token")
    if spec.get("enableInTreeAutoscaling"):
        options = spec.get("autoscalerOptions", {})
        out += container_violations(f"{name} autoscaler", options.get("securityContext"))
        mounts = {m["mountPath"]: m["name"] for m in options.get("volumeMounts", [])}
        head_volumes = {v["name"]: v for v in spec["headGroupSpec"]["template"]["spec"].get("volumes", [])}
        token = head_volumes.get(mounts.get(SA_TOKEN_PATH), {}).get("projected", {}).get("sources", [])
        if not any("serviceAccountToken" in src for src in token):
            out.append(f"{name} autoscaler: no projected service-account token (it must scale the cluster)")
        if mounts.get("/tmp") not in head_volumes or "emptyDir" not in head_volumes[mounts["/tmp"]]:
            out.append(f"{name} autoscaler: /tmp is not an emptyDir")
    return out


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
@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-relabel.yaml", "rayjob-train.yaml", "rayservice.yaml"])
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


def test_no_secret_is_baked_into_the_image_or_written_in_the_cluster_files():
    text = DOCKERFILE.read_text()
    for line in re.findall(r"^(?:ENV|ARG)\s+(.+)$", text, re.M):
        for name, value in re.findall(r"(\w+)=(\S*)", line):
            assert not (SECRET_NAME.search(name) and value), f"Dockerfile sets {name}"
    for path in [DOCKERFILE, README, *CLUSTER.rglob("*.yaml"), *CLUSTER.glob("*.dockerignore")]:
        hit = SECRET_VALUE.search(path.read_text())
        assert hit is None, f"{path.relative_to(ROOT)} holds a secret-looking value: {hit.group(0)[:12]}..."


def test_secret_scan_catches_a_planted_key():
    planted = "ENV OPENAI_API_KEY=sk-" + "a1B2" * 8
    assert SECRET_VALUE.search(planted)
    name, value = re.findall(r"(\w+)=(\S*)", planted[4:])[0]
    assert SECRET_NAME.search(name) and value


# ---- security -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_every_pod_is_non_root_read_only_unprivileged_and_tokenless(name):
    assert hardening_violations(name) == []


def test_the_hardening_check_catches_each_violation():
    """The check above is only worth something if it flags what a careless edit introduces."""
    spec = copy.deepcopy(ray_cluster_specs()["rayservice.yaml"])
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["securityContext"] = {**worker["containers"][0]["securityContext"], "readOnlyRootFilesystem": False}
    worker["automountServiceAccountToken"] = True
    spec["autoscalerOptions"]["volumeMounts"] = []
    original = ray_cluster_specs

    def patched():
        return {**original(), "rayservice.yaml": spec}

    globals()["ray_cluster_specs"] = patched
    try:
        found = " | ".join(hardening_violations("rayservice.yaml", spec))
    finally:
        globals()["ray_cluster_specs"] = original
    assert "root filesystem is writable" in found and "service-account token mounted" in found
    assert "no projected service-account token" in found


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml"])
def test_every_pod_that_can_run_the_serve_ingress_has_the_token_from_a_required_secret(name):
    """Ray may place the ingress (and build the app) on any pod: each gets DYNBOOT_API_TOKEN, never optional."""
    for c in containers(ray_cluster_specs()[name]):
        (env,) = [e for e in c.get("env", []) if e["name"] == "DYNBOOT_API_TOKEN"]
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "dynboot-serve-token" and not ref.get("optional", False), (name, c["name"])


def test_network_policy_admits_the_job_api_from_the_namespace_only():
    (policy,) = load_docs(K8S / "networkpolicy.yaml")
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}} and "Ingress" in spec["policyTypes"]
    for rule in spec["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address range may reach Ray pods"
            if "namespaceSelector" in peer:  # another namespace: the KubeRay operator, to the job API only
                assert set(peer["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
                assert [p["port"] for p in rule["ports"]] == [8265]
            else:
                assert peer == {"podSelector": {}}, peer  # pods of this namespace


def test_aws_head_and_workers_have_their_own_least_privilege_profiles():
    cfg = load_docs(CLUSTER / "aws.yaml")[0]
    types = cfg["available_node_types"]
    profile = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in types.items()}
    head = profile.pop(cfg["head_node_type"])
    assert head.endswith("instance-profile/dynboot-ray-head") and set(profile.values()) == {
        head.replace("dynboot-ray-head", "dynboot-ray-worker")}

    def statements(name: str) -> list[dict]:
        doc = json.loads((IAM / name).read_text())
        return [{**st, "Action": [st["Action"]] if isinstance(st["Action"], str) else st["Action"]} for st in doc["Statement"]]

    head_st, worker_st = statements("head-policy.json"), statements("worker-policy.json")
    for st in head_st + worker_st:
        assert st["Effect"] == "Allow" and not any(a == "*" or a.endswith(":*") for a in st["Action"]), st
        if any(a.startswith("s3:") for a in st["Action"]):
            resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
            assert all(r.startswith("arn:aws:s3:::my-bucket") for r in resources), st
    assert not [a for st in worker_st for a in st["Action"] if a.split(":")[0] in ("ec2", "iam")], "workers need no EC2/IAM"
    (pass_role,) = [st for st in head_st if "iam:PassRole" in st["Action"]]
    assert pass_role["Resource"] == "arn:aws:iam::ACCOUNT_ID:role/dynboot-ray-worker"
    for st in head_st:  # launching, tagging and terminating are tied to this cluster's tag
        if {"ec2:TerminateInstances", "ec2:CreateTags"} & set(st["Action"]) or st["Resource"] == "arn:aws:ec2:us-west-2:ACCOUNT_ID:instance/*":
            assert "Condition" in st, st


def test_dockerfile_drops_passwordless_sudo():
    text = DOCKERFILE.read_text()
    assert "sed -i '/^ray ALL=NOPASSWD: ALL$/d' /etc/sudoers" in text and "gpasswd -d ray sudo" in text
    after_user = text[text.rindex("USER ray"):]
    assert "RUN ! sudo -n true" in after_user, "the build must fail if ray can still sudo"


def test_readme_has_a_security_section():
    text = README.read_text()
    section = text[text.index("## 8. Security"):]
    section = section[: section.find("\n## ", 5)] if "\n## " in section[5:] else section
    for words in ("exposed", "Secret", "checkpoint", "unpickl", "allow_unauthenticated", "NetworkPolicy", "IAM", "sudo"):
        assert words in section, f"Security section does not mention {words!r}"
