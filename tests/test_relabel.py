"""The relabel and filter jobs on a real local Ray cluster (one per module). `pytest tests/test_relabel.py`

Covers: shards + summary, Parquet round trip bit-exact, resume after the driver is killed mid-run (same rows,
no duplicates), bad files quarantined while good videos finish, an IDP actor killed mid-run (the job completes
with the same rows), a video whose worker always dies (bounded retries, then quarantined), filter modes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dynboot.images import decode_image
from dynboot.pairs import PAIR_SCHEMA, make_row, read_pairs, to_table
from dynboot.video import read_video, write_video
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
    return RelabelConfig(videos=str(videos), out=str(out), model_path=str(idp), batch_size=8, videos_per_batch=1,
                         decode_cpus=1.0, progress_s=60, **kw)  # whole CPUs: fewer worker processes to start


def _rows(out) -> list[dict]:
    return sorted(read_pairs(Path(out) / "shards").to_pylist(), key=lambda r: r["id"])


def _same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "score"} == {k: v for k, v in w.items() if k != "score"}
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)  # batch composition may move the last bits


@pytest.fixture(scope="module")
def reference(cluster, small_world, idp, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    summary = run_relabel(_cfg(small_world / "videos", out, idp))
    return out, summary, _rows(out)


def test_relabel_writes_one_shard_per_video_and_a_summary(reference, small_world):
    out, summary, rows = reference
    truth = [json.loads(line) for line in (small_world / "videos_truth.jsonl").read_text().splitlines()]
    assert summary["videos_done"] == 12 and summary["videos_quarantined"] == summary["videos_lost"] == 0
    assert summary["pairs_written"] == len(rows) == sum(len(t["actions"]) for t in truth) == 96
    assert summary["pairs_per_s"] > 0 and set(summary["stage_s"]) >= {"decode_s", "label_s", "write_s"}
    assert sorted(p.stem for p in (out / "shards").glob("*.parquet")) == [t["video_id"] for t in truth]
    assert pq.read_schema(out / "shards" / "ep000000.parquet").equals(PAIR_SCHEMA, check_metadata=False)
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file() and "decode_stage" in (out / "stats.txt").read_text()
    assert not list((out / "attempts").glob("*"))  # every ledger entry released
    r = rows[0]
    assert r["id"] == f"{r['video_id']}:{r['frame_a']}:{r['frame_b']}" and r["source"] == "pseudo"
    assert r["model_id"].startswith("tiny:") and np.isfinite(r["score"]) and r["action"]
    assert json.loads(r["provenance"])["decoder"] == "decord"


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


def test_rerun_skips_finished_videos(reference, idp, small_world):
    out, _, rows = reference
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    summary = run_relabel(_cfg(small_world / "videos", out, idp))
    assert summary["skipped_done"] == 12 and summary["videos_todo"] == 0 and summary["pairs_total"] == 96
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")} == before


def test_resume_after_the_job_is_killed_mid_run(cluster, reference, idp, small_world, tmp_path):
    """SIGKILL the driver once some shards exist; the rerun finishes the rest: same rows, no duplicates."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "jobs.relabel", f"videos={small_world / 'videos'}", f"out={out}",
            f"model_path={idp}", "batch_size=8", "videos_per_batch=1", f"ray_address={cluster}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while len(list((out / "shards").glob("*.parquet"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    at_kill = len(list((out / "shards").glob("*.parquet")))
    assert 2 <= at_kill < 12, f"the kill should land mid-run ({at_kill} shards)"
    summary = run_relabel(_cfg(small_world / "videos", out, idp))
    assert summary["skipped_done"] >= at_kill and summary["videos_done"] == 12 - summary["skipped_done"]
    got = _rows(out)
    assert len({r["id"] for r in got}) == len(got) == 96
    _same_rows(got, reference[2])
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]  # no temp file left behind


def _kill_when(ledger_dir: Path, pattern: str, times: int, killed: list) -> threading.Thread:
    """Kill (SIGKILL) the worker named in a ledger file matching `pattern`, each time a new attempt starts."""
    def watch():
        seen = set()
        deadline = time.time() + 240
        while len(killed) < times and time.time() < deadline:
            for f in ledger_dir.glob(pattern):
                try:
                    entry = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                key = (f.name, entry["attempts"])
                if key not in seen:
                    seen.add(key)
                    os.kill(entry["pid"], signal.SIGKILL)  # a worker of this test's own Ray cluster
                    killed.append(key)
            time.sleep(0.002)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_idp_actor_killed_mid_run_restarts_and_completes(reference, idp, small_world, tmp_path):
    out, killed = tmp_path / "run", []
    watcher = _kill_when(out / "attempts", "*.label.json", times=1, killed=killed)
    summary = run_relabel(_cfg(small_world / "videos", out, idp))
    watcher.join(5)
    assert len(killed) == 1
    assert summary["videos_done"] == 12 and summary["videos_quarantined"] == 0
    _same_rows(_rows(out), reference[2])


def test_bad_files_are_quarantined_and_a_crashing_video_is_retried_a_bounded_number_of_times(cluster, idp, small_world, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    src = small_world / "videos"
    for i in range(3):
        shutil.copy(src / f"ep00000{i}.mp4", videos / f"good{i}.mp4")
    data = (src / "ep000000.mp4").read_bytes()
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (videos / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (videos / "image.mp4").write_bytes((small_world / "gold" / "images" / "000000_a.png").read_bytes())
    (videos / "text.mp4").write_text("not a video\n")
    frames = np.zeros((3000, 40, 40, 3), np.uint8)  # long: decoding it takes long enough to be killed mid-way
    frames[:, :, :, 0] = (np.arange(3000) % 256)[:, None, None]
    write_video(videos / "crashes.mp4", frames)
    names = sorted(p.name for p in videos.iterdir())
    lines = [json.dumps({"path": n}) for n in names] + [json.dumps({"path": "missing.mp4"})]
    (videos / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out, killed = tmp_path / "run", []
    watcher = _kill_when(out / "attempts", "crashes.decode.json", times=2, killed=killed)
    summary = run_relabel(_cfg(videos, out, idp, max_attempts=2))
    watcher.join(5)
    assert len(killed) == 2
    assert summary["videos_done"] == 3 and summary["pairs_written"] == 24
    bad = {"zero", "truncated", "garbage", "image", "text", "missing", "crashes"}
    assert summary["videos_quarantined"] == len(bad) and summary["quarantined_by_stage"] == {"decode": len(bad)}
    rows = {p.stem: json.loads(p.read_text()) for p in (out / "quarantine").glob("*.json")}
    assert set(rows) == bad and all(set(r) == {"video_id", "path", "error", "stage"} for r in rows.values())
    assert "0 bytes" in rows["zero"]["error"] and "no such file" in rows["missing"]["error"]
    assert "decodable frame" in rows["image"]["error"] and "unreadable video" in rows["garbage"]["error"]
    assert "WorkerCrashed" in rows["crashes"]["error"] and "2 time(s)" in rows["crashes"]["error"]
    assert rows["missing"]["path"] == str(videos / "missing.mp4")
    again = run_relabel(_cfg(videos, out, idp))  # quarantined videos are skipped unless retried
    assert again["skipped_done"] == 10 and again["videos_todo"] == 0


def _shard(path: Path, rows: list[tuple[str, str, float]]) -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table([make_row(v, i, i + 1, img, img, a, "pseudo", "m", s) for i, (v, a, s) in enumerate(rows)]), path)


def test_stratified_top_k_round_robin_by_descending_score():
    ids = [f"v:{i}:0" for i in range(7)]
    classes = ["move", "move", "move", "add", "add", "swap", "remove"]
    scores = [-0.1, -0.2, -0.3, -0.5, -0.05, -2.0, -1.0]
    # round 1 heads: add(4, -0.05), move(0, -0.1), remove(6, -1.0), swap(5, -2.0); round 2: move(1), add(3); ...
    assert stratified_top_k(ids, classes, scores, 3) == [4, 0, 6]
    assert stratified_top_k(ids, classes, scores, 6) == [4, 0, 6, 5, 1, 3]
    assert sorted(stratified_top_k(ids, classes, scores, 0)) == list(range(7))


def test_filter_modes(tmp_path):
    src = tmp_path / "relabel" / "shards"
    _shard(src / "a.parquet", [("a", "move the red square up", -0.1), ("a", "move the blue circle up", -0.2),
                               ("a", "move the red circle up", -0.3), ("a", "", -0.01)])
    _shard(src / "b.parquet", [("b", "add a red square above the blue circle", -0.5), ("b", "swap the red square and the blue circle", -2.0),
                               ("b", "remove the red square", float("nan"))])
    out = tmp_path / "filtered"
    s = run_filter(FilterConfig(shards=str(tmp_path / "relabel"), out=str(out), mode="disable"))
    assert s["pairs_kept"] == 7 and len(read_pairs(out / "shards")) == 7
    s = run_filter(FilterConfig(shards=str(tmp_path / "relabel"), out=str(out), mode="score-only", min_score=-1.0))
    assert s["pairs_kept"] == 4 and s["malformed"] == 2 and s["below_min_score"] == 1
    assert sorted(read_pairs(out / "shards").column("score").to_pylist()) == pytest.approx([-0.5, -0.3, -0.2, -0.1])
    s = run_filter(FilterConfig(shards=str(tmp_path / "relabel"), out=str(out), mode="enable", top_k=3))
    kept = read_pairs(out / "shards").to_pylist()
    assert s["pairs_kept"] == 3 and sorted(r["action"].split()[0] for r in kept) == ["add", "move", "swap"]
    assert [r["score"] for r in kept if r["action"].startswith("move")] == [pytest.approx(-0.1)]
    s = run_filter(FilterConfig(shards=str(tmp_path / "relabel"), out=str(out), mode="enable", min_score=-1.0, top_k=1))
    assert [p.name for p in (out / "shards").glob("*.parquet")] == ["a.parquet"]  # b's stale shard removed
    assert s["per_class_enable"] == {"move": 1} and json.loads((out / "summary.json").read_text())["pairs_kept"] == 1


@pytest.mark.filterwarnings("ignore:.*found in sys.modules")  # runpy re-runs modules this test module imported
def test_cli_runs_relabel_and_filter_by_name(capsys):
    from dynboot.cli import main

    assert main(["relabel", "--help"]) == 0 and "videos_per_batch" in capsys.readouterr().out
    assert main(["filter", "--help"]) == 0 and "top_k" in capsys.readouterr().out
    assert main(["relabel", "batch_size=0"]) == 2
