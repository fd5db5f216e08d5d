"""The cluster's security settings (cluster/README.md, "Security"). `python -m pytest -q tests/test_cluster_security.py`
(seconds, no cluster).

Checked: every pod (Ray heads and workers, RayJob submitters) and the autoscaler sidecar run non-root, without
privilege escalation or capabilities, on a read-only root with /tmp on an emptyDir; only the autoscaler holds a
Kubernetes API token; every pod that can run the Serve ingress has the serve token from a non-optional Secret;
the NetworkPolicy admits the job API from the namespace (and the KubeRay operator) only; aws.yaml gives the head
and the workers their own least-privilege instance profiles (cluster/iam/); the Dockerfile bakes in no secret and
drops the base image's passwordless sudo, and no cluster file holds a secret-looking value.
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from cluster_manifests import (CLUSTER, DOCKERFILE, K8S, RAY_MANIFESTS, README, ROOT, SECRET_NAME, SECRET_VALUE,
                               containers, load_docs, manifest, ray_cluster_specs)

SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
IAM = CLUSTER / "iam"


# ---- helpers ------------------------------------------------------------------------------------------------
def pod_specs(name: str, spec: dict) -> dict[str, dict]:
    """Every pod template a manifest makes KubeRay create from its Ray cluster `spec`: head, each worker group, the
    RayJob submitter."""
    doc = manifest(name)
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
    """What in a Ray manifest (or `doc_spec`, an edited copy of its Ray cluster spec) breaks the pod-security rules
    (README, "Security")."""
    spec = doc_spec or ray_cluster_specs()[name]
    out = []
    for pod_name, pod in pod_specs(name, spec).items():
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


# ---- secrets --------------------------------------------------------------------------------------------------------
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


# ---- pods -----------------------------------------------------------------------------------------------------------
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
    found = " | ".join(hardening_violations("rayservice.yaml", spec))
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
