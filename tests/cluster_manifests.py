"""What the cluster test modules share: where the cluster files are, how to read them, what a secret looks like.

Used by tests/test_cluster.py (the files agree with the code) and tests/test_cluster_security.py (pod security,
secrets, network and IAM policies).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S = CLUSTER / "k8s"
README = CLUSTER / "README.md"
DOCKERFILE = CLUSTER / "Dockerfile"
RAY_MANIFESTS = ["raycluster.yaml", "rayjob-relabel.yaml", "rayjob-train.yaml", "rayservice.yaml"]
SECRET_NAME = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD|ACCESS_KEY)$", re.I)
SECRET_VALUE = re.compile(r"sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|-----BEGIN [A-Z ]*PRIVATE KEY|"
                          r"xox[abp]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{30,}")


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest(name: str) -> dict:
    (doc,) = load_docs(K8S / name)
    return doc


def ray_cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": manifest("raycluster.yaml")["spec"],
            "rayjob-relabel.yaml": manifest("rayjob-relabel.yaml")["spec"]["rayClusterSpec"],
            "rayjob-train.yaml": manifest("rayjob-train.yaml")["spec"]["rayClusterSpec"],
            "rayservice.yaml": manifest("rayservice.yaml")["spec"]["rayClusterConfig"]}


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]
