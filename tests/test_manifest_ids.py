"""Video ids and manifests (dynboot/data/manifest.py), without Ray. `pytest tests/test_manifest_ids.py`

Property tests (hypothesis) over generated file trees — names in any script, spaces, the same stem with other
extensions, long names, symlink loops — prove ids unique, unchanged when files are added beside them, short and
safe; then the manifest forms: a directory's manifest.jsonl, a listing with <class>/<video> labels, a list file,
a JSONL manifest with metadata and a malformed line, file:// URIs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynboot.data.manifest import build_manifest, clean_id, manifest_source, video_id_of

SAFE = re.compile(r"[A-Za-z0-9._~-]{1,97}")
EXTS = [".mp4", ".avi", ".mkv", ".MP4"]
_name_chars = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00")
names = st.text(_name_chars, min_size=1, max_size=60).filter(
    lambda n: not n.startswith(".") and n.strip() == n and len(n.encode()) <= 200)
trees = st.lists(st.tuples(st.lists(names, max_size=2), names, st.sampled_from(EXTS)), min_size=1, max_size=12)


def _make(root: Path, entries) -> list[str]:
    """Create the files of `entries` under `root`; returns their paths relative to root (created ones only)."""
    made = []
    for dirs, stem, ext in entries:
        rel = Path(*dirs, stem + ext)
        path = root / rel
        if any(p.exists() and not p.is_dir() for p in path.parents if root in p.parents):
            continue  # a file where this entry wants a folder
        if path.exists() or path.is_dir():
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        except OSError:  # e.g. a name the file system refuses
            continue
        made.append(str(rel))
    return made


def _ids(root: Path) -> dict[str, str]:
    rows = build_manifest(str(root))
    return {os.path.relpath(r["path"], root): r["video_id"] for r in rows}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=trees, added=trees)
def test_ids_are_unique_short_safe_and_stable_when_files_are_added(first, added):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        root.mkdir()
        made = _make(root, first)
        before = _ids(root)
        assert sorted(before) == sorted(os.path.normpath(m) for m in made)  # every file listed, once
        assert len(set(before.values())) == len(before), "two files share an id"
        assert all(SAFE.fullmatch(v) for v in before.values()), [v for v in before.values() if not SAFE.fullmatch(v)]
        _make(root, added)
        after = _ids(root)
        assert len(set(after.values())) == len(after)
        assert {k: after[k] for k in before} == before, "adding files renamed an existing id"


@settings(max_examples=15, deadline=None)
@given(entries=trees)
def test_symlink_loops_and_links_into_the_tree_list_each_file_once(entries):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        root.mkdir()
        made = _make(root, entries)
        (root / "loop").symlink_to(root, target_is_directory=True)  # a loop to the root
        sub = root / "sub"
        sub.mkdir(exist_ok=True)
        (sub / "back").symlink_to("..", target_is_directory=True)  # a loop through a parent
        outside = Path(tmp) / "elsewhere"
        outside.mkdir()
        (outside / "far.mp4").write_bytes(b"x")
        (outside / "again").symlink_to(root, target_is_directory=True)  # outside, leading back in
        (root / "ext").symlink_to(outside, target_is_directory=True)
        if made:
            (root / "alias.mp4").symlink_to(root / made[0])  # a second name for a file of the tree
        listed = _ids(root)
        assert sorted(listed) == sorted([*(os.path.normpath(m) for m in made), "ext/far.mp4"])


def test_ids_of_names_in_any_script_stay_distinct_and_keep_their_extension():
    ids = [video_id_of(n) for n in ("видео.mp4", "фильм.mp4", "動画 1.mp4", "動画 2.mp4", "a.mp4", "a.avi", "A.mp4")]
    assert len(set(ids)) == len(ids) and ids[4:6] == ["a.mp4", "a.avi"]
    assert not any(i in ("mp4", "") for i in ids) and all(SAFE.fullmatch(i) for i in ids)
    assert all(".mp4~" in i for i in ids[:4]) and ids[6].startswith("A.mp4~")  # the extension stays readable
    long = video_id_of("x" * 300 + ".mp4")
    assert len(long) <= 97 and long != video_id_of("x" * 301 + ".mp4")
    assert video_id_of("s3://bucket/x/clip 1.mp4").startswith("bucket__x__clip_1.mp4~")
    assert video_id_of("sub/./clip.mp4") == video_id_of("sub/clip.mp4")
    assert clean_id("ep000000") == "ep000000" and clean_id("Kinetics_ABC-1") == "Kinetics_ABC-1"
    assert SAFE.fullmatch(clean_id("has space/and slash")) and clean_id("a b") != clean_id("a_b")
    with pytest.raises(ValueError):
        video_id_of("")


def test_manifest_forms_labels_datasets_and_metadata(tmp_path, small_world):
    world = build_manifest(str(small_world / "videos"))  # through the world's manifest.jsonl: its own ids kept
    assert [m["video_id"] for m in world] == [f"ep{i:06d}" for i in range(12)]
    assert all((small_world / "videos" / f"{m['video_id']}.mp4").samefile(m["path"]) for m in world)
    assert {m["dataset"] for m in world} == {small_world.name} and {m["label"] for m in world} == {""}
    assert json.loads(world[0]["meta"])["fps"] > 0  # the manifest's other columns

    ucf = tmp_path / "UCF-101"
    for rel in ("ApplyEyeMakeup/v_a.avi", "ApplyEyeMakeup/v_a.mp4", "Biking/sub/v b.mp4", "top.mp4", "notes.txt"):
        (ucf / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_world / "videos" / "ep000000.mp4", ucf / rel)
    listed = {os.path.relpath(m["path"], ucf): m for m in build_manifest(str(ucf))}
    assert sorted(listed) == ["ApplyEyeMakeup/v_a.avi", "ApplyEyeMakeup/v_a.mp4", "Biking/sub/v b.mp4", "top.mp4"]
    assert {k: m["label"] for k, m in listed.items()} == {"ApplyEyeMakeup/v_a.avi": "ApplyEyeMakeup",
                                                          "ApplyEyeMakeup/v_a.mp4": "ApplyEyeMakeup",
                                                          "Biking/sub/v b.mp4": "Biking", "top.mp4": ""}
    assert {m["dataset"] for m in listed.values()} == {"UCF-101"} and listed["top.mp4"]["video_id"] == "top.mp4"
    uris = build_manifest(f"file://{ucf}")
    assert [m["video_id"] for m in uris] == [listed[k]["video_id"] for k in sorted(listed)]
    assert uris[0]["path"].startswith("file://")

    (tmp_path / "list.txt").write_text(f"# videos\nUCF-101/top.mp4\n{tmp_path}/missing.mp4\n")
    rows = build_manifest(str(tmp_path / "list.txt"))
    assert rows[0]["path"] == str(ucf / "top.mp4") and rows[0]["video_id"] == video_id_of("UCF-101/top.mp4")
    assert rows[1]["path"] == str(tmp_path / "missing.mp4")  # kept: the job records it as missing
    (tmp_path / "m.jsonl").write_text("\n".join([
        json.dumps({"path": "UCF-101/top.mp4", "label": "Jumping", "dataset": "ucf101", "subject": 7}),
        "not json", json.dumps({"video_id": "x"}), json.dumps({"path": "UCF-101/top.mp4", "label": "Jumping",
                                                              "dataset": "ucf101", "subject": 7})]) + "\n")
    rows = build_manifest(str(tmp_path / "m.jsonl"))  # the repeated row is listed once
    assert len(rows) == 3 and rows[0]["label"] == "Jumping" and rows[0]["dataset"] == "ucf101"
    assert json.loads(rows[0]["meta"]) == {"subject": 7} and rows[0]["error"] == ""
    assert [r["error"] != "" for r in rows[1:]] == [True, True]  # malformed rows are kept, with their reason
    assert "needs a string 'path'" in rows[2]["error"]
    assert manifest_source(str(small_world / "videos")).base == str(small_world)  # one check, not one per row
    with pytest.raises(FileNotFoundError):
        build_manifest(str(tmp_path / "nowhere"))
