"""Shared fixtures: a loopback S3 server, small generated worlds and tiny models (session-scoped), one torch thread."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ACCEPT_ENV_VAR_OVERRIDES", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback for the whole session; AWS_* variables point at it."""
    from s3_server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A fresh bucket per test: `s3://<name>`."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{id(request) % 10**6}"
    return s3_server.bucket(name)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A small embedded world: 200 gold pairs, 12 videos, 100 test pairs."""
    from dynboot.world.generate import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(out=str(out), gold=200, videos=12, test=100, seed=0, workers=1))
    return out


@pytest.fixture(scope="session")
def world_models(tmp_path_factory):
    """A tiny world (40 gold pairs, 2 videos, 10 test pairs) and two untrained xxs models, the FDP (seed 0) and the
    IDP (seed 1), saved beside it: (root, spec, fdp, idp) with root/world, root/fdp, root/idp. Tests only read them."""
    from dynboot.models.tiny import TinyWorldModel
    from dynboot.world.generate import WorldConfig, generate_world, load_spec

    root = tmp_path_factory.mktemp("world_models")
    with torch_on_one_thread():  # set up before any module's one_torch_thread (session scope comes first)
        generate_world(WorldConfig(out=str(root / "world"), gold=40, videos=2, test=10, seed=5, workers=1))
        spec = load_spec(root / "world")
        fdp, idp = TinyWorldModel.create(spec, "xxs", seed=0), TinyWorldModel.create(spec, "xxs", seed=1)
        fdp.save(root / "fdp")
        idp.save(root / "idp")
    return root, spec, fdp.eval(), idp.eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: they gain nothing from intra-op threads and lose a lot
    when the cores are shared (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    with torch_on_one_thread():
        yield


@contextmanager
def torch_on_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
