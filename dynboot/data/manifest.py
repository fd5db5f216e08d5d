"""Video manifests: which videos a job reads, each with a stable, unique id, its dataset name and class label.

    src = manifest_source("s3://bucket/ucf101/")          # what `videos=` names, and how to read it
    rows = build_manifest("runs/world/videos")            # in-process, for small inputs and tests
    video_id_of("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi")   # -> 'applyeyemakeup__v_applyeyemakeup_g01_c01.avi~3f...'

`videos=` may be (`manifest_source` decides which, without reading more than one line):
- a directory (local or a URI prefix): its `manifest.jsonl` when it holds one (the embedded world writes one), else
  every file under it whose extension is a video's (recursive; names starting with '.' are skipped);
- a JSONL manifest (`.jsonl`): `{"path": ..., "video_id"?, "label"?, "dataset"?, ...any metadata}` a line;
- a Parquet manifest (`.parquet`): the same columns;
- a list file (anything else): one path or URI a line, '#' comments.
Jobs read these in parallel (`jobs/relabel_manifest.py` runs the row functions below in Ray Data tasks); the
functions here turn raw lines / records / listings into MANIFEST_SCHEMA rows and never touch the videos.

Paths. Relative paths in a list or manifest resolve against one base for the whole file: its directory, or that
directory's parent when the first relative path exists only there (the world's manifest names `videos/<id>.mp4`
relative to the world root). One check for the whole file, never one per row (a HEAD per row on object storage).
A listed file that does not exist is kept: the job records it as missing.

Ids (`video_id_of`) are a function of the path relative to the input root, extension included, so adding `a.avi`
beside `a.mp4` renames nothing: a single lower-case name of safe characters is its own id (`clip_01.mp4`); any
other path becomes a readable, file-system-safe prefix plus `~` and 16 hex digits of the SHA-256 of the path
(NFC), so names in any script stay distinct (`видео.mp4` -> `v_.mp4~...`) and every id is at most 97
characters. A manifest's own `video_id` is kept when it is made of safe characters (the world's `ep000000`),
else it gets the same treatment.

Labels and datasets. A manifest row's `label` / `dataset` columns win. A directory listing laid out as
`<class>/<video>` gives the class from the first folder under the root; the dataset is the input root's name.
Other columns of a manifest row travel as `meta` (a JSON object) into the pair rows' provenance.

Listing a local tree follows directory symlinks but lists every file once: a symlink (to a file or a directory)
whose target lies inside the input root is skipped, because the walk reaches that target by its own path, and
a directory already visited (a symlink loop) is never entered again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterator, Literal

import pyarrow as pa

from dynboot.io import storage

__all__ = ["MANIFEST_SCHEMA", "VIDEO_EXTENSIONS", "ManifestSource", "manifest_source", "video_id_of", "clean_id",
           "rows_from_lines", "rows_from_records", "rows_from_listing", "walk_local", "list_tree", "build_manifest"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
MANIFEST_SCHEMA = pa.schema([  # one row per listed video, before any video is opened
    ("video_id", pa.string()), ("path", pa.string()),
    ("key", pa.string()),       # identity for "listed once": the resolved path (with the manifest's own id)
    ("dataset", pa.string()), ("label", pa.string()),
    ("meta", pa.string()),      # JSON object: the manifest row's other columns
    ("error", pa.string()),     # non-empty: the row itself is malformed (the job records it, never drops it)
])
_PLAIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,95}")       # a path-derived id that needs no hash
_GIVEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a manifest's own id kept as it is
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PREFIX_CHARS = 80
_RESERVED = {"path", "video_id", "label", "dataset"}

Kind = Literal["directory", "jsonl", "parquet", "list"]


# ---- ids ----------------------------------------------------------------------------------------------------
def _normal(text: str) -> str:
    return unicodedata.normalize("NFC", text.replace("\\", "/"))


def _hashed(text: str) -> str:
    readable = "__".join(_UNSAFE.sub("_", part) for part in text.split("/") if part)[:_PREFIX_CHARS]
    if not readable[:1].isalnum():  # never a hidden name ('.', '_'), whatever the script of the original
        readable = "v" + readable[:_PREFIX_CHARS - 1]
    return f"{readable}~{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def video_id_of(relative_path: str) -> str:
    """Stable, unique, file-system-safe id of the video at `relative_path` (relative to the input root; a URI or
    absolute path counts as relative to the file system's root: its scheme is dropped)."""
    text = _normal(relative_path)
    if storage.is_uri(text):
        text = text.split("://", 1)[1]
    text = "/".join(p for p in text.split("/") if p not in ("", "."))
    if not text:
        raise ValueError(f"no path to make a video id of: {relative_path!r}")
    return text if _PLAIN.fullmatch(text) else _hashed(text)


def clean_id(given: str) -> str:
    """A manifest's own `video_id`: kept when safe (`[A-Za-z0-9._-]`, at most 128), else made safe and unique."""
    text = _normal(str(given)).strip()
    if not text:
        raise ValueError("empty video_id")
    return text if _GIVEN.fullmatch(text) else _hashed(text)


# ---- what `videos=` names -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestSource:
    """How to read `videos=`: `kind`, the file or directory `uri`, the `base` relative paths resolve against,
    and the dataset name rows get when they name none."""

    kind: Kind
    uri: str
    base: str
    dataset: str


def _first_relative_path(uri: str, kind: Kind) -> str | None:
    """The first relative path of a list / JSONL manifest (reads its first 64 KiB, not the whole file)."""
    with storage.open_input(uri) as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace")
    for line in head.splitlines()[:-1] or head.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if kind == "jsonl":
            try:
                line = json.loads(line).get("path") or ""
            except (ValueError, AttributeError):
                continue
        if line and not storage.is_uri(line) and not line.startswith("/"):
            return line
    return None


def manifest_source(videos: str) -> ManifestSource:
    """What `videos` is (see module doc); FileNotFoundError when nothing is there."""
    uri = storage.absolute(videos).rstrip("/") if not storage.is_uri(videos) else videos.rstrip("/")
    if storage.is_dir(uri):
        inner = storage.join(uri, "manifest.jsonl")
        if not storage.is_file(inner):
            return ManifestSource("directory", uri, uri, storage.name(uri))
        uri = inner
    elif not storage.is_file(uri):
        raise FileNotFoundError(f"videos={videos!r}: no such directory, list file or manifest")
    lower = uri.lower()
    kind: Kind = "jsonl" if lower.endswith(".jsonl") else "parquet" if lower.endswith(".parquet") else "list"
    base = storage.parent(uri)
    first = _first_relative_path(uri, kind) if kind != "parquet" else None
    if first and not storage.exists(storage.join(base, first)):
        grand = storage.parent(base)
        if grand != base and storage.exists(storage.join(grand, first)):
            base = grand
    return ManifestSource(kind, uri, base, storage.name(base))


# ---- rows ---------------------------------------------------------------------------------------------------
def _resolve(base: str, path: str) -> str:
    if storage.is_uri(path) or path.startswith("/"):
        return path
    return storage.join(base, path)


def _key(path: str) -> str:
    return path if storage.is_uri(path) else os.path.realpath(path)


def _relative(base: str, path: str, given: str) -> str:
    """The path the id is made of: relative to the base when under it, else the path itself."""
    prefix = base.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else given


def _row(src: ManifestSource, rec: dict[str, Any], folder_label: bool = False) -> dict[str, Any]:
    given = rec.get("path")
    if not isinstance(given, str) or not given.strip():
        raise ValueError(f"a manifest row needs a string 'path' (got {json.dumps(rec, default=str)[:200]})")
    given = given.strip()
    path = _resolve(src.base, given)
    rel = _relative(src.base, path, given)
    own = rec.get("video_id")
    vid = clean_id(own) if own not in (None, "") else video_id_of(rel)
    label = rec.get("label")
    if label in (None, "") and folder_label:
        parts = [p for p in _normal(rel).split("/") if p]
        label = parts[0] if len(parts) > 1 else ""
    meta = {k: v for k, v in rec.items() if k not in _RESERVED and v is not None}
    # listed again = the same file (under the same own id, if any); the same id on another file is a collision
    key = _key(path) if own in (None, "") else f"{vid}\n{_key(path)}"
    return {"video_id": vid, "path": path, "key": key,
            "dataset": str(rec.get("dataset") or src.dataset), "label": "" if label is None else str(label),
            "meta": json.dumps(meta, default=str, sort_keys=True), "error": ""}


def _bad_row(src: ManifestSource, text: str, why: str) -> dict[str, Any]:
    vid = "manifest-row~" + hashlib.sha256(f"{src.uri}\n{text}".encode()).hexdigest()[:16]
    return {"video_id": vid, "path": "", "key": f"id:{vid}", "dataset": src.dataset, "label": "",
            "meta": json.dumps({"row": text[:500]}), "error": f"{src.uri}: {why}"}


def rows_from_lines(lines: list[str], src: ManifestSource) -> list[dict[str, Any]]:
    """MANIFEST_SCHEMA rows of the lines of a list file or a JSONL manifest; a malformed line becomes a row
    whose `error` says why."""
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if src.kind != "jsonl":
            out.append(_row(src, {"path": line}))
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"not a JSON object: {line[:200]!r}")
            out.append(_row(src, rec))
        except ValueError as err:
            out.append(_bad_row(src, line, str(err)))
    return out


def rows_from_records(records: list[dict[str, Any]], src: ManifestSource) -> list[dict[str, Any]]:
    """MANIFEST_SCHEMA rows of manifest records (a Parquet manifest's rows)."""
    out = []
    for rec in records:
        try:
            out.append(_row(src, rec))
        except ValueError as err:
            out.append(_bad_row(src, json.dumps(rec, default=str), str(err)))
    return out


def rows_from_listing(paths: list[str], src: ManifestSource) -> list[dict[str, Any]]:
    """MANIFEST_SCHEMA rows of files found under a directory (labels from `<class>/<video>` folders)."""
    return [_row(src, {"path": p}, folder_label=True) for p in paths]


# ---- listing a tree -----------------------------------------------------------------------------------------
def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def walk_local(root: str, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> Iterator[str]:
    """Video files under a local directory, each once, in sorted order (see module doc on symlinks)."""
    exts = tuple(e.lower() for e in extensions)
    real_root = os.path.realpath(root)
    visited: set[str] = set()

    def walk(directory: str) -> Iterator[str]:
        real = os.path.realpath(directory)
        if real in visited:
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return  # unreadable directory: nothing listed from it
        for entry in entries:
            if entry.name.startswith("."):
                continue
            full = os.path.join(directory, entry.name)
            linked_in = entry.is_symlink() and _inside(os.path.realpath(full), real_root)
            if entry.is_dir(follow_symlinks=True):
                if not linked_in:  # a link to inside the root: the walk reaches its target by its own path
                    yield from walk(full)
            elif entry.is_file(follow_symlinks=True) and entry.name.lower().endswith(exts) and not linked_in:
                yield full

    yield from walk(root)


def list_tree(root: str, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> Iterator[str]:
    """Video files under a local directory or an object-storage prefix, spelt like `root`."""
    if not storage.is_uri(root) or root.startswith("file://"):
        local = storage.resolve(root)[1]
        for path in walk_local(local, extensions):
            yield path if not root.startswith("file://") else "file://" + path
        return
    yield from (p for p in storage.list_files(root, recursive=True, suffixes=extensions, hidden=True)
                if not PurePosixPath(p).name.startswith("."))


def build_manifest(videos: str, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> list[dict[str, Any]]:
    """Every MANIFEST_SCHEMA row of `videos`, read in this process (small inputs, tests; jobs stream it), each
    video listed once (the first of rows with the same key)."""
    src = manifest_source(videos)
    if src.kind == "directory":
        rows = rows_from_listing(list(list_tree(src.uri, tuple(extensions))), src)
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        fs, inner = storage.resolve(src.uri)
        rows = rows_from_records(pq.read_table(inner, filesystem=fs).to_pylist(), src)
    else:
        rows = rows_from_lines(storage.read_text(src.uri).splitlines(), src)
    seen: set[str] = set()
    return [r for r in rows if not (r["key"] in seen or seen.add(r["key"]))]
