"""Multi-node fault tests on one machine: a Ray cluster of a head and two worker nodes on loopback
(`ray.cluster_utils.Cluster`), a worker node removed while a job runs on it. `pytest tests/test_multinode.py`

- relabel: the job runs across both workers (the head has no CPUs, as on a real cluster); when shards start
  to appear, the node hosting an IDP actor is removed. Its actor, tasks and objects are gone; the job goes on
  on the other node, or, if it cannot, a rerun resumes. Either way the output equals an uninterrupted run's:
  every video a shard or a quarantine row, no duplicate pair ids, the same rows.
- train: a 2-worker Ray Train + DeepSpeed run checkpointing every few steps; after the first checkpoint the
  node hosting its workers is removed. The worker group restarts from that checkpoint (`max_failures`) on the
  remaining node and finishes every step.

The cluster's nodes are stopped by the test (`cluster.shutdown()`), never with `ray stop`; the machine-wide
"current cluster" address file is left alone, so other Ray users of the machine never see this cluster.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from dynboot.manifest import build_manifest
from dynboot.pairs import read_pairs
from dynboot.rundir import read_jsonl

pytestmark = pytest.mark.slow

WORKER_CPUS = 2  # logical CPUs per worker node (2 nodes on a 2-core machine: fractional resources below)
VIDEOS = 12


# ---- the cluster ----------------------------------------------------------------------------------------------
def start_cluster(attempts: int = 3):
    """Head (no CPUs, no dashboard) + 2 worker nodes. A node that does not register within Ray's fixed 30 s
    (a busy shared machine) fails the attempt: what it started (our own child processes) is killed, and the
    cluster is started again."""
    from ray.cluster_utils import Cluster

    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        c = None
        try:
            c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
            ensure_workers(c)
            return c
        except Exception:
            if c is not None:
                c.shutdown()
            for proc in me.children(recursive=True):
                if proc.pid not in before:
                    proc.kill()
            if attempt == attempts:
                raise


@pytest.fixture(scope="module")
def cluster():
    import ray
    import ray._common.utils
    import ray._private.utils

    # Cluster() writes (and shutdown() deletes) /tmp/ray/ray_current_cluster, through which any plain ray.init()
    # on this shared machine would join this cluster: keep that file out of it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        c = start_cluster()
        try:
            ray.init(address=c.address, log_to_driver=False)
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


def ensure_workers(cluster, n: int = 2) -> None:
    while len(cluster.worker_nodes) < n:
        cluster.add_node(num_cpus=WORKER_CPUS)
    cluster.wait_for_nodes()


def nodes_running(cluster, marker: str) -> list:
    """Worker nodes with a Ray worker process whose title contains `marker` (e.g. an actor class name)."""
    from ray._private import ray_constants

    found = []
    for node in list(cluster.worker_nodes):
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        try:
            children = psutil.Process(raylet).children(recursive=True)
        except psutil.Error:
            continue
        for proc in children:
            try:
                if marker in " ".join(proc.cmdline()):
                    found.append(node)
                    break
            except psutil.Error:
                continue
    return found


class NodeRemover(threading.Thread):
    """Once `ready()` holds, remove the worker node that hosts a process titled with `marker`, once."""

    def __init__(self, cluster, ready: Callable[[], bool], marker: str, snapshot: Callable[[], object], timeout: float = 400):
        super().__init__(daemon=True)
        self.cluster, self.ready, self.marker, self.snapshot, self.timeout = cluster, ready, marker, snapshot, timeout
        self.at_removal = None
        self.error: BaseException | None = None

    def run(self):
        deadline = time.time() + self.timeout
        try:
            while time.time() < deadline:
                if self.ready():
                    nodes = nodes_running(self.cluster, self.marker)
                    if nodes:
                        self.at_removal = self.snapshot()
                        self.cluster.remove_node(nodes[0])
                        return
                time.sleep(0.02)
        except BaseException as err:  # surfaced by the test, not lost in the thread
            self.error = err


# ---- data -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from dynboot.world.generate import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(out=str(out), gold=10, videos=VIDEOS, test=5, workers=1))
    return out


@pytest.fixture(scope="module")
def idp(tmp_path_factory) -> Path:
    """An untrained tiny IDP: arbitrary but deterministic labels, all that plumbing needs."""
    from dynboot.models.tiny import TinyWorldModel
    from dynboot.world import WorldSpec

    return Path(TinyWorldModel.create(WorldSpec(), size="xxs").save(tmp_path_factory.mktemp("idp") / "ckpt"))


# ---- relabel ----------------------------------------------------------------------------------------------------
def relabel_config(world: Path, out: Path, idp: Path, cluster):
    from jobs.relabel import RelabelConfig

    # Fractional CPUs: two IDP actors, decode and write tasks all fit on the 2-CPU workers, and on one of them
    # once the other is gone (whole CPUs deadlock a small cluster: reference/ray_feasibility.md).
    return RelabelConfig(videos=str(world / "videos"), out=str(out), model_path=str(idp), batch_size=8,
                         videos_per_batch=1, min_actors=1, max_actors=2, idp_cpus=0.5, decode_cpus=0.5,
                         write_cpus=0.25, progress_s=60, ray_address=cluster.address, keyframes={"strategy": "stills"})


def shard_ids(out: Path) -> set[str]:
    return {p.stem for p in (out / "shards").glob("*.parquet") if not p.name.startswith(".")}


def quarantine_ids(out: Path) -> set[str]:
    return {p.stem for p in (out / "quarantine").glob("*.json")}


def pair_rows(out: Path) -> list[dict]:
    return sorted(read_pairs(out / "shards").to_pylist(), key=lambda r: r["id"])


@pytest.mark.timeout(600)
def test_relabel_completes_without_loss_or_duplicates_when_a_worker_node_dies(cluster, world, idp, tmp_path):
    from jobs.relabel import run as run_relabel

    ensure_workers(cluster)
    reference = tmp_path / "reference"
    assert run_relabel(relabel_config(world, reference, idp, cluster))["videos_done"] == VIDEOS
    want = pair_rows(reference)

    out = tmp_path / "faulty"
    remover = NodeRemover(cluster, ready=lambda: 1 <= len(shard_ids(out)) < VIDEOS, marker="IDPLabeler",
                          snapshot=lambda: len(shard_ids(out)))
    remover.start()
    try:
        summary = run_relabel(relabel_config(world, out, idp, cluster))
        failed = None
    except Exception as err:  # the job may fail when the node dies: then a rerun must resume and complete
        summary, failed = None, err
    remover.join(30)
    assert remover.error is None, remover.error
    assert remover.at_removal is not None, "no worker node was removed while the job ran"
    assert remover.at_removal < VIDEOS, "the node was removed after every video was done"
    assert len(cluster.worker_nodes) == 1
    print(f"worker node removed with {remover.at_removal}/{VIDEOS} shards published")

    if failed is not None or summary["videos_lost"] or len(shard_ids(out) | quarantine_ids(out)) < VIDEOS:
        print(f"relabel after node loss: {'failed: ' + repr(failed)[:200] if failed else summary}; rerunning")
        rerun = run_relabel(relabel_config(world, out, idp, cluster))
        assert rerun["skipped_done"] >= remover.at_removal and rerun["videos_lost"] == 0

    shards, quarantined = shard_ids(out), quarantine_ids(out)
    assert shards | quarantined == {it["video_id"] for it in build_manifest(str(world / "videos"))}
    assert not shards & quarantined and len(shards) + len(quarantined) == VIDEOS
    got = pair_rows(out)
    assert len({r["id"] for r in got}) == len(got), "duplicate pair ids"
    assert [r["id"] for r in got] == [r["id"] for r in want], "pairs lost or added"
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "score"} == {k: v for k, v in w.items() if k != "score"}
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)  # batch composition may move the last bits
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")], "a temp file was left behind"


# ---- train ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_training_resumes_from_its_checkpoint_when_a_worker_node_dies(cluster, world, tmp_path):
    from dynboot.mixture import Source
    from dynboot.models.registry import load_model
    from jobs.train import TrainConfig, run as run_train

    ensure_workers(cluster)
    out, steps, every = tmp_path / "idp", 40, 4
    cfg = TrainConfig(task="idp", size="xxs", data=[Source(path=str(world))], eval_data="", out=str(out),
                      steps=steps, batch_size=16, warmup=1, num_workers=2, cpus_per_worker=0.5, threads=1,
                      checkpoint_every=every, keep=2, max_failures=2)

    def checkpointed() -> bool:
        """A checkpoint the controller has registered (its snapshot names it), not merely one on disk: a report
        still queued in a worker when its node dies is lost, and the group would restart from the one before."""
        snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
        try:
            return "step_" in snapshot.read_text()
        except OSError:
            return False

    def last_step() -> int:
        return max([r["step"] for r in read_jsonl(out / "metrics.jsonl")], default=0)

    remover = NodeRemover(cluster, ready=checkpointed, marker="RayTrainWorker", snapshot=last_step)
    remover.start()
    summary = run_train(cfg)
    remover.join(30)
    assert remover.error is None, remover.error
    assert remover.at_removal is not None and remover.at_removal < steps, "the node was not removed mid-run"
    assert len(cluster.worker_nodes) == 1
    print(f"worker node removed after step {remover.at_removal}; run starts: {summary['attempts']}")

    first, *restarts = summary["attempts"]
    assert first == 0 and restarts, f"the run did not restart after the node died: {summary['attempts']}"
    assert all(0 < s < steps and s % every == 0 for s in restarts), "a restart did not start from a checkpoint"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, steps + 1))
    assert summary["steps"] == steps and summary["final_loss"] is not None
    model = load_model(out / "model")  # the export of the finished run loads
    assert model.backend == "tiny"
