"""The relabel and filter jobs on a real local Ray cluster (one per module). `pytest tests/test_relabel.py`

Covers: committed partitions + summary, Parquet round trip bit-exact, a rerun that does nothing, resume after the
driver is killed mid-run (same rows, exactly once, the killed run's uncommitted files removed), every bad input
recorded with its reason (bad files, no key frames, a malformed manifest row, a duplicate id) and a crashing video
retried a bounded number of times, an IDP actor killed mid-run, a CUDA-style device error in the actor (the actor
exits, Ray restarts it, the batch is retried and every video is labelled), the stages run in this process from
their own params alone (the job's rows), the filter's stratified top-K over (dataset, label) and its modes, reading
committed output only.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dynboot.io import partitions
from dynboot.io.images import decode_image
from dynboot.data.pairs import PAIR_SCHEMA, make_row, read_pairs, to_table
from dynboot.io.rundir import ConfigChanged, contract_problems
from dynboot.data.video import read_video, write_video
from jobs.filter import FilterConfig, run as run_filter, stratified_top_k
from jobs.relabel import RelabelConfig, run as run_relabel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # 4 logical CPUs on 2 cores: no deadlock
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def idp(tmp_path_factory) -> Path:
    """An untrained tiny IDP: its labels are arbitrary but deterministic, which is all plumbing needs."""
    from dynboot.models.tiny import TinyWorldModel
    from dynboot.world import WorldSpec

    return TinyWorldModel.create(WorldSpec(), size="xxs").save(tmp_path_factory.mktemp("idp") / "ckpt")


def _cfg(videos, out, idp, **kw) -> RelabelConfig:
    kw = {"batch_size": 8, "videos_per_batch": 1, "decode_cpus": 1.0, "progress_s": 60, "rows_per_file": 16,
          "pairs_per_video": 8, "keyframes": {"strategy": "stills"}, **kw}  # the world's key states are its stills;
    # 16 pairs a file = 2 world videos: several partitions from 12 videos
    return RelabelConfig(videos=str(videos), out=str(out), model_path=str(idp), **kw)


def _rows(out) -> list[dict]:
    return sorted(read_pairs(out).to_pylist(), key=lambda r: r["id"])


def _same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "score"} == {k: v for k, v in w.items() if k != "score"}
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)  # batch composition may move the last bits


def _files(out: Path, sub: str) -> list[Path]:
    return sorted(p for p in (out / sub).rglob("*") if p.is_file()) if (out / sub).is_dir() else []


@pytest.fixture(scope="module")
def reference(cluster, small_world, idp, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    summary = run_relabel(_cfg(small_world / "videos", out, idp))
    return out, summary, _rows(out)


def test_relabel_commits_partitions_of_many_videos_and_a_summary(reference, small_world):
    out, summary, rows = reference
    truth = [json.loads(line) for line in (small_world / "videos_truth.jsonl").read_text().splitlines()]
    assert summary["videos_done"] == 12 and summary["videos_quarantined"] == summary["videos_lost"] == 0
    assert summary["pairs_written"] == len(rows) == sum(len(t["actions"]) for t in truth) == 96
    assert summary["pairs_total"] == 96 and summary["videos_total"] == 12 and summary["duplicate_commits"] == 0
    assert summary["pairs_per_s"] > 0 and set(summary["stage_s"]) >= {"bookkeeping", "decode_s", "label_s", "write_s"}
    shards = _files(out, "shards")
    assert len(shards) == summary["files_written"] == 6  # 16 pairs = 2 videos a file
    assert [str(p) for p in shards] == partitions.committed_files(str(out))
    index = partitions.load_index(str(out))
    assert sorted(index.column("video_id").to_pylist()) == [t["video_id"] for t in truth]
    assert set(index.column("status").to_pylist()) == {"ok"} and sum(index.column("pairs").to_pylist()) == 96
    commits = [p.name for p in _files(out, "commits")]  # compacted at the end: no loose record is left
    assert len(commits) == 2 and commits[0] == "_format.json" and commits[1].startswith("_index-")
    assert pq.read_schema(shards[0]).equals(PAIR_SCHEMA, check_metadata=False)
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file() and "decode_stage" in (out / "stats.txt").read_text()
    assert not _files(out, "attempts") and not _files(out, "commits/_pending")  # ledger and intents released
    r = rows[0]
    assert r["id"] == f"{r['video_id']}:{r['frame_a']}:{r['frame_b']}" and r["source"] == "pseudo"
    assert r["model_id"].startswith("tiny:") and np.isfinite(r["score"]) and r["action"]
    assert r["dataset"] == small_world.name and r["label"] == ""  # the world manifest names no class
    prov = json.loads(r["provenance"])
    assert prov["decoder"] == "decord" and prov["strategy"] == "stills" and prov["meta"]["fps"] > 0  # + the manifest's columns


def test_parquet_images_round_trip_bit_exact(reference, small_world):
    _, _, rows = reference
    frames = {}
    for r in rows[:16]:
        if r["video_id"] not in frames:
            frames[r["video_id"]], _ = read_video(small_world / "videos" / f"{r['video_id']}.mp4")
        assert np.array_equal(decode_image(r["before"]), frames[r["video_id"]][r["frame_a"]])
        assert np.array_equal(decode_image(r["after"]), frames[r["video_id"]][r["frame_b"]])
    row = make_row("v", 1, 2, frames[rows[0]["video_id"]][0], rows[0]["after"], "a", "pseudo")
    back = to_table([row]).to_pylist()[0]
    assert back["before"] == row["before"] and back["after"] == rows[0]["after"]
    assert back["dataset"] == back["label"] == ""  # keyword defaults: gold rows written without them still work


def test_rerun_does_nothing(reference, idp, small_world):
    out, _, _ = reference
    before = {p: p.stat().st_mtime_ns for p in _files(out, "shards")}
    summary = run_relabel(_cfg(small_world / "videos", out, idp, progress_s=30))  # an operational change is fine
    assert summary["skipped_done"] == 12 and summary["videos_todo"] == 0 and summary["pairs_total"] == 96
    assert {p: p.stat().st_mtime_ns for p in _files(out, "shards")} == before
    with pytest.raises(ConfigChanged, match="keyframes.min_still"):  # a change of what is computed is not
        run_relabel(_cfg(small_world / "videos", out, idp, keyframes={"strategy": "stills", "min_still": 4}))


@pytest.mark.slow  # a relabel run or two on a real cluster: ~30-100 s on 2 shared cores
def test_resume_after_the_job_is_killed_mid_run(cluster, reference, idp, small_world, tmp_path):
    """SIGKILL the driver once two partitions are committed (later commits stall); the rerun finishes the rest: same rows, each once,
    and the files of partitions the killed run had not committed are gone."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "jobs.relabel", f"videos={small_world / 'videos'}", f"out={out}",
            f"model_path={idp}", "batch_size=8", "videos_per_batch=1", "decode_cpus=1.0", "rows_per_file=16",
            "pairs_per_video=8", "progress_s=60", f"ray_address={cluster}", "keyframes.strategy=stills",
            "fault_injection=stall_after_2_commits"]  # later commits hang: the kill lands mid-run on any machine
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if len([p for p in _files(out, "commits") if p.name.startswith("p-")]) >= 2:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    at_kill = len([p for p in _files(out, "commits") if p.name.startswith("p-")])
    assert 2 <= at_kill < 6, f"the kill should land mid-run ({at_kill} partitions committed)"
    summary = run_relabel(_cfg(small_world / "videos", out, idp))
    assert summary["skipped_done"] >= 2 * at_kill and summary["videos_done"] == 12 - summary["skipped_done"]
    got = _rows(out)
    assert len({r["id"] for r in got}) == len(got) == 96
    _same_rows(got, reference[2])
    assert [str(p) for p in _files(out, "shards")] == partitions.committed_files(str(out))  # nothing uncommitted left
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]  # no temp file left behind


def _kill_when(ledger_dir: Path, stage: str, video: str | None, times: int, killed: list) -> threading.Thread:
    """SIGKILL the worker named in a ledger entry of `stage` (holding `video`, if given) each time a new attempt
    starts."""
    def watch():
        seen = set()
        deadline = time.time() + 300
        while len(killed) < times and time.time() < deadline:
            for f in ledger_dir.glob(f"{stage}-*.json"):
                try:
                    entry = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                key = (f.name, entry["attempts"])
                if key not in seen and (video is None or video in entry["videos"]):
                    seen.add(key)
                    os.kill(entry["pid"], signal.SIGKILL)  # a worker of this test's own Ray cluster
                    killed.append(key)
            time.sleep(0.002)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # a relabel run or two on a real cluster: ~30-100 s on 2 shared cores
def test_idp_actor_killed_mid_run_restarts_and_completes(reference, idp, small_world, tmp_path):
    out, killed = tmp_path / "run", []
    watcher = _kill_when(out / "attempts", "label", None, times=1, killed=killed)
    summary = run_relabel(_cfg(small_world / "videos", out, idp))
    watcher.join(5)
    assert len(killed) == 1
    assert summary["videos_done"] == 12 and summary["videos_quarantined"] == 0
    _same_rows(_rows(out), reference[2])


@pytest.mark.slow  # a relabel run or two on a real cluster: ~30-100 s on 2 shared cores
def test_a_device_error_restarts_the_actor_and_the_batch_is_retried(reference, idp, small_world, tmp_path):
    """The first IDP call raises a CUDA device-side assert (fault_injection): the actor exits instead of failing
    every later video; Ray restarts it, the culprit batch is retried, and every video is labelled."""
    out = tmp_path / "run"
    summary = run_relabel(_cfg(small_world / "videos", out, idp, fault_injection="cuda_once"))
    assert (out / "_fault_cuda_once").is_file()  # the fault fired
    assert summary["videos_done"] == 12 and summary["videos_quarantined"] == 0 and summary["videos_retry_later"] == 0
    _same_rows(_rows(out), reference[2])


def test_the_stages_run_from_their_own_params_alone_and_give_the_jobs_rows(reference, idp, small_world, tmp_path):
    """Each stage takes only its params, no job config: run in this process, without Ray, on two videos, decode ->
    label -> commit write exactly the rows the job wrote for them."""
    import pyarrow as pa

    from dynboot.data.keyframes import KeyframeConfig
    from dynboot.data.manifest import MANIFEST_SCHEMA, build_manifest
    from jobs.relabel_stages import DecodeParams, IDPLabeler, LabelParams, WriteParams, decode_stage, write_stage

    out, size = str(tmp_path / "run"), reference[1]["image_size"]
    partitions.mark_dataset(out)
    listed = pa.Table.from_pylist(build_manifest(str(small_world / "videos"))[:2], schema=MANIFEST_SCHEMA)
    videos = decode_stage(listed, DecodeParams(out=out, keyframes=KeyframeConfig(strategy="stills"), image_size=size,
                                               max_attempts=2, io_attempts=1, io_backoff_s=0.0))
    labelled = IDPLabeler(LabelParams(out=out, model_path=str(idp), backend="tiny", device="cpu", threads=1,
                                      batch_size=8, max_attempts=2))(videos)
    results = write_stage(labelled, WriteParams(out=out, rows_per_file=16, image_size=size)).to_pylist()
    assert [r["status"] for r in results] == ["ok", "ok"] and sum(r["pairs"] for r in results) == 16
    ids = {r["video_id"] for r in results}
    _same_rows(_rows(out), [r for r in reference[2] if r["video_id"] in ids])


@pytest.mark.slow  # a relabel run or two on a real cluster: ~30-100 s on 2 shared cores
def test_every_bad_input_is_recorded_with_its_reason_and_a_crashing_video_is_retried_a_bounded_number_of_times(
        cluster, idp, small_world, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    src = small_world / "videos"
    for i in range(3):
        shutil.copy(src / f"ep00000{i}.mp4", videos / f"good{i}.mp4")
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (videos / "image.mp4").write_bytes((small_world / "gold" / "images" / "000000_a.png").read_bytes())
    (videos / "text.mp4").write_text("not a video\n")
    write_video(videos / "still.mp4", np.full((30, 40, 40, 3), 128, np.uint8))  # no motion: one key state, no pair
    frames = np.zeros((3000, 40, 40, 3), np.uint8)  # long: decoding it takes long enough to be killed mid-way
    frames[:, :, :, 0] = (np.arange(3000) % 256)[:, None, None]
    write_video(videos / "crashes.mp4", frames)
    names = sorted(p.name for p in videos.iterdir())
    lines = [json.dumps({"path": n, "video_id": n.split(".")[0]}) for n in names] + [
        json.dumps({"path": "missing.mp4", "video_id": "missing"}), "this line is not JSON",
        json.dumps({"path": "good1.mp4", "video_id": "good0"}),  # a second video claiming good0's id
        json.dumps({"path": "good2.mp4", "video_id": "good2"})]  # listed twice: once is kept
    (videos / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out, killed = tmp_path / "run", []
    watcher = _kill_when(out / "attempts", "decode", "crashes", times=3, killed=killed)
    summary = run_relabel(_cfg(videos, out, idp, max_attempts=2, videos_per_task=4))
    watcher.join(5)
    assert len(killed) == 3  # the batch once, then the video alone twice: given up
    assert summary["videos_done"] == 3 and summary["pairs_written"] == 24 and summary["duplicates_dropped"] == 1
    want = {"zero": "empty_file", "garbage": "unreadable", "image": "too_short", "text": "unreadable",
            "still": "no_keyframes", "missing": "missing", "crashes": "worker_crashed"}
    rows = {r["input"]: r for r in partitions.read_quarantine_rows(str(out))}
    bad_row = [v for v in rows if v.startswith("manifest-row~")]
    dup = [v for v in rows if v.startswith("duplicate-id~")]
    assert len(bad_row) == 1 and rows[bad_row[0]]["reason"] == "bad_manifest_row"
    assert len(dup) == 1 and rows[dup[0]]["reason"] == "duplicate_id" and "'good0'" in rows[dup[0]]["error"]
    assert {v: r["reason"] for v, r in rows.items() if v in want} == want
    assert summary["by_reason"] == dict(Counter([*want.values(), "bad_manifest_row", "duplicate_id"]))
    assert not contract_problems(out)  # every quarantine row has exactly the contract's fields
    assert rows["zero"]["attempts"] == 1 and rows["crashes"]["attempts"] == 2 and rows["missing"]["error_class"] == "FileNotFoundError"
    assert "2 time(s)" in rows["crashes"]["error"] and rows["missing"]["path"] == str(videos / "missing.mp4")
    assert len(_files(out, "quarantine")) < len(rows)  # quarantine rows share files, not one per video
    again = run_relabel(_cfg(videos, out, idp))  # quarantined videos are skipped unless retried
    assert again["videos_todo"] == 0 and again["quarantine_total"] == 9 and again["by_reason_total"] == summary["by_reason"]
    assert again["skipped_done"] == 13  # the 12 committed, and the row whose id good0 holds


# ---- filter ---------------------------------------------------------------------------------------------------
def _shard(path: Path, rows: list[tuple]) -> None:
    """Hand-made pair rows: (video, action, score[, dataset, label])."""
    img = np.zeros((8, 8, 3), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table([make_row(r[0], i, i + 1, img, img, r[1], "pseudo", "m", r[2], dataset=r[3] if len(r) > 3 else "",
                                      label=r[4] if len(r) > 4 else "") for i, r in enumerate(rows)]), path)


def _naive_top_k(ids, classes, scores, k):
    """Algorithm 1 as written: rounds over classes, each round's heads taken best first."""
    by_class = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    for rows in by_class.values():
        rows.sort(key=lambda i: (-scores[i], ids[i]))
    chosen, depth, limit = [], 0, k or len(ids)
    while len(chosen) < limit:
        heads = sorted((rows[depth] for rows in by_class.values() if depth < len(rows)), key=lambda i: (-scores[i], ids[i]))
        if not heads:
            break
        chosen += heads[: limit - len(chosen)]
        depth += 1
    return chosen


def test_stratified_top_k_is_algorithm_1_per_dataset():
    ids = [f"v:{i}:0" for i in range(7)]
    classes = ["move", "move", "move", "add", "add", "swap", "remove"]
    scores = [-0.1, -0.2, -0.3, -0.5, -0.05, -2.0, -1.0]
    # round 1 heads: add(4, -0.05), move(0, -0.1), remove(6, -1.0), swap(5, -2.0); round 2: move(1), add(3); ...
    assert stratified_top_k(ids, classes, scores, 3) == [4, 0, 6]
    assert stratified_top_k(ids, classes, scores, 6) == [4, 0, 6, 5, 1, 3]
    assert sorted(stratified_top_k(ids, classes, scores, 0)) == list(range(7))
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        ids = [f"v{i:03d}" for i in rng.permutation(n)]
        classes = [f"c{c}" for c in rng.integers(0, 5, n)]
        scores = np.round(rng.normal(size=n), 1).tolist()  # ties: broken by id
        k = int(rng.integers(0, n + 2))
        assert stratified_top_k(ids, classes, scores, k) == _naive_top_k(ids, classes, scores, k)
        datasets = [f"d{d}" for d in rng.integers(0, 3, n)]
        got = stratified_top_k(ids, classes, scores, k, datasets)
        for d in set(datasets):  # K per data set, each one Algorithm 1 on its own rows
            mine = [i for i in range(n) if datasets[i] == d]
            sub = _naive_top_k([ids[i] for i in mine], [classes[i] for i in mine], [scores[i] for i in mine], k)
            assert [i for i in got if datasets[i] == d] == [mine[j] for j in sub]


def test_filter_modes_and_class_labels(cluster, tmp_path):
    src = tmp_path / "relabel" / "shards"
    _shard(src / "a.parquet", [("a", "move the red square up", -0.1), ("a", "move the blue circle up", -0.2),
                               ("a", "move the red circle up", -0.3), ("a", "", -0.01)])
    _shard(src / "b.parquet", [("b", "add a red square above the blue circle", -0.5), ("b", "swap the red square and the blue circle", -2.0),
                               ("b", "remove the red square", float("nan"))])
    out = tmp_path / "filtered"
    s = run_filter(FilterConfig(shards=str(tmp_path / "relabel"), out=str(out), mode="disable"))
    assert s["pairs_kept"] == 7 and len(read_pairs(out)) == 7
    with pytest.raises(ConfigChanged, match="mode"):  # a rerun with other settings is another run: say so
        run_filter(FilterConfig(shards=str(tmp_path / "relabel"), out=str(out), mode="score-only", min_score=-1.0))
    s = run_filter(FilterConfig(shards=str(tmp_path / "relabel"), out=str(out), mode="score-only", min_score=-1.0,
                                resume="force"))
    assert s["pairs_kept"] == 4 and s["malformed"] == 2 and s["below_min_score"] == 1
    assert sorted(read_pairs(out).column("score").to_pylist()) == pytest.approx([-0.5, -0.3, -0.2, -0.1])
    s = run_filter(FilterConfig(shards=str(tmp_path / "relabel"), out=str(out), mode="enable", top_k=3, resume="force"))
    kept = read_pairs(out).to_pylist()
    assert s["pairs_kept"] == 3 and sorted(r["action"].split()[0] for r in kept) == ["add", "move", "swap"]
    assert s["stratified_by"] == {"": "caption_word"}
    s = run_filter(FilterConfig(shards=str(tmp_path / "relabel"), out=str(out), mode="enable", min_score=-1.0, top_k=1,
                                resume="force"))
    assert s["per_class_enable"] == {"/move": 1} and len(_files(out, "shards")) == 1  # earlier outputs' files removed
    assert [p.name for p in _files(out, "commits")] == ["_format.json", "_index-filter.parquet"]

    # class labels: K per data set, stratified by the video class; the caption word only where no label exists
    lab = tmp_path / "labelled" / "shards"
    rows = [(f"u{i}", f"move the thing {i}", -0.01 * i, "ucf", "ApplyEyeMakeup" if i < 6 else "Biking") for i in range(9)]
    rows += [(f"k{i}", f"{w} it", -0.01 * i, "kinetics", "") for i, w in enumerate(["open", "open", "open", "close"])]
    rows += [("u9", "", 0.0, "ucf", "Biking")]  # the best score, but an empty caption (training skips it): malformed
    _shard(lab / "x.parquet", rows)
    s = run_filter(FilterConfig(shards=str(lab), out=str(tmp_path / "f2"), mode="enable", top_k=4))
    kept = read_pairs(tmp_path / "f2").to_pylist()
    assert s["stratified_by"] == {"ucf": "label", "kinetics": "caption_word"} and s["malformed"] == 1
    assert "u9" not in {r["video_id"] for r in kept}
    assert Counter(r["dataset"] for r in kept) == {"ucf": 4, "kinetics": 4}
    assert Counter(r["label"] for r in kept if r["dataset"] == "ucf") == {"ApplyEyeMakeup": 2, "Biking": 2}
    assert s["per_class_enable"] == {"kinetics/close": 1, "kinetics/open": 3, "ucf/ApplyEyeMakeup": 2, "ucf/Biking": 2}


def test_filter_reads_committed_relabel_output_only(reference, tmp_path):
    out, _, rows = reference
    orphan = out / "shards" / "p-orphan.parquet"  # what a killed relabel leaves before it commits
    shutil.copy(_files(out, "shards")[0], orphan)
    try:
        s = run_filter(FilterConfig(shards=str(out), out=str(tmp_path / "f"), mode="disable"))
        assert s["pairs_in"] == s["pairs_kept"] == 96 and len(read_pairs(out)) == 96
        assert s["files_in"] == 6
    finally:
        orphan.unlink()
    _same_rows(_rows(tmp_path / "f"), rows)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules")  # runpy re-runs modules this test module imported
def test_cli_runs_relabel_and_filter_by_name(capsys):
    from dynboot.cli import main

    assert main(["relabel", "--help"]) == 0 and "rows_per_file" in capsys.readouterr().out
    assert main(["filter", "--help"]) == 0 and "top_k" in capsys.readouterr().out
    assert main(["relabel", "batch_size=0"]) == 2
