"""Multi-node fault tests on one machine: a Ray cluster of a head and two worker nodes on loopback
(`ray.cluster_utils.Cluster`), a worker node removed while a job runs on it. `pytest tests/test_multinode.py`

- relabel: from and to the loopback S3 bucket (the model too), across both workers (the head has no CPUs, as
  on a real cluster); each node runs in its own working directory with its own model cache, so no node sees
  another's relative paths or files. When partitions start to be committed, the node hosting an IDP actor is
  removed. Its actor, tasks and objects are gone; the job goes on on the other node, or, if it cannot, a rerun
  resumes. Either way every video's rows are in the bucket exactly once, and a rerun does nothing.
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

from dynboot.data.pairs import read_pairs
from dynboot.io.rundir import read_jsonl

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
def cluster(s3_server, tmp_path_factory):
    """The S3 server comes first: its AWS_* environment is then every node's, as on a real cluster."""
    import ray
    import ray._common.utils
    import ray._private.utils

    # Cluster() writes (and shutdown() deletes) /tmp/ray/ray_current_cluster, through which any plain ray.init()
    # on this shared machine would join this cluster: keep that file out of it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        NODE_DIRS.append(tmp_path_factory.mktemp("nodes"))
        c = start_cluster()
        try:
            ray.init(address=c.address, log_to_driver=False)
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


NODE_DIRS: list[Path] = []  # where this module's nodes live


def ensure_workers(cluster, n: int = 2) -> None:
    """Worker nodes, each started in a working directory of its own (its raylet and workers inherit it) with a
    model cache of its own."""
    import os

    while len(cluster.worker_nodes) < n:
        home = NODE_DIRS[0] / f"node{len(NODE_DIRS)}"
        NODE_DIRS.append(home)
        home.mkdir()
        here = os.getcwd()
        os.chdir(home)
        try:
            cluster.add_node(num_cpus=WORKER_CPUS, env_vars={"DYNBOOT_CACHE_DIR": str(home / "cache")})
        finally:
            os.chdir(here)
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
def relabel_config(videos: str, out: str, model: str, cluster):
    from jobs.relabel import RelabelConfig

    # Fractional CPUs: two IDP actors, decode and write tasks all fit on the 2-CPU workers, and on one of them
    # once the other is gone (whole CPUs deadlock a small cluster: reference/ray_feasibility.md).
    return RelabelConfig(videos=videos, out=out, model_path=model, batch_size=8, videos_per_batch=1, min_actors=1,
                         max_actors=2, idp_cpus=0.5, decode_cpus=0.5, write_cpus=0.25, videos_per_task=2,
                         rows_per_file=16, pairs_per_video=8, progress_s=60, ray_address=cluster.address,
                         keyframes={"strategy": "stills"})  # the world's key states are its stills


def committed_partitions(out: str) -> int:
    from dynboot.io import storage

    return len([p for p in storage.list_files(storage.join(out, "commits"), recursive=False) if "/p-" in p])


@pytest.mark.timeout(600)
def test_relabel_from_and_to_the_bucket_is_exactly_once_when_a_worker_node_dies(cluster, world, idp, bucket):
    import json

    from dynboot.io import storage
    from jobs.relabel import run as run_relabel

    ensure_workers(cluster)
    for p in sorted((world / "videos").iterdir()):  # the world's videos and its manifest (relative paths)
        storage.write_bytes(f"{bucket}/world/videos/{p.name}", p.read_bytes())
    videos, out = f"{bucket}/world/videos", f"{bucket}/runs/relabel"
    model = storage.copy_dir(idp, f"{bucket}/models/idp")
    truth = {t["video_id"]: len(t["actions"]) for t in map(json.loads, (world / "videos_truth.jsonl").read_text().splitlines())}

    remover = NodeRemover(cluster, ready=lambda: 1 <= committed_partitions(out) < VIDEOS // 2, marker="IDPLabeler",
                          snapshot=lambda: committed_partitions(out))
    remover.start()
    try:
        summary = run_relabel(relabel_config(videos, out, model, cluster))
        failed = None
    except Exception as err:  # the job may fail when the node dies: then a rerun must resume and complete
        summary, failed = None, err
    remover.join(30)
    assert remover.error is None, remover.error
    assert remover.at_removal is not None, "no worker node was removed while the job ran"
    assert len(cluster.worker_nodes) == 1
    print(f"worker node removed with {remover.at_removal}/{VIDEOS // 2} partitions committed")

    if failed is not None or summary["videos_lost"] or summary["videos_total"] < VIDEOS:
        print(f"relabel after node loss: {'failed: ' + repr(failed)[:200] if failed else summary}; rerunning")
        rerun = run_relabel(relabel_config(videos, out, model, cluster))
        assert rerun["videos_lost"] == 0

    again = run_relabel(relabel_config(videos, out, model, cluster))  # a rerun of a finished run does nothing
    assert again["videos_todo"] == 0 and again["skipped_done"] == VIDEOS and again["videos_total"] == VIDEOS
    assert again["duplicate_commits"] == 0 and again["quarantine_total"] == 0
    rows = read_pairs(out).to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "duplicate pair ids"
    per_video: dict[str, int] = {}
    for r in rows:
        per_video[r["video_id"]] = per_video.get(r["video_id"], 0) + 1
    assert per_video == truth, "a video's pairs are missing or written twice"
    assert not [p for p in Path.cwd().glob("s3:*")], "output landed in a local folder"
    for home in NODE_DIRS[1:]:  # each node fetched the model into its own cache, and wrote nothing locally
        assert not [p for p in home.rglob("*.parquet")]


# ---- train ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_training_resumes_from_its_checkpoint_when_a_worker_node_dies(cluster, world, tmp_path):
    from dynboot.data.mixture import Source
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
