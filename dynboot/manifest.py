"""Video manifests: which videos a job reads, each with a stable, unique id.

    items = build_manifest("runs/world/videos")          # [{"video_id": "ep000000", "path": "/abs/.../ep000000.mp4"}, ...]
    build_manifest("videos.txt")                         # a list file: one path or URI a line ('#' comments)
    build_manifest("data/manifest.jsonl")                # {"path": ..., "video_id"?: ...} a line
    build_manifest("s3://bucket/videos/")                # any pyarrow filesystem URI (file://, s3://, gs://, ...)

- A directory with a `manifest.jsonl` is read through it (the world writes one); otherwise every file under
  it whose extension is in `extensions` is a video (recursive, sorted).
- Relative paths in a list or manifest are relative to its directory, or to the parent of that directory
  (the world's manifest names `videos/<id>.mp4` relative to the world root).
- Ids: a manifest's `video_id`, else the path relative to the input root without its extension, `/` -> `__`.
  Ids are sanitised to `[A-Za-z0-9._-]` (they name files and pair ids). They depend only on the file's own
  path, so adding videos never renames others; two files that differ only by extension keep theirs.
- Paths stay as given for URIs (decoders copy the object to a local temp file); local paths are absolute.
  A listed file that does not exist is kept: the job quarantines it with a clear error.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from pyarrow import fs as pafs

__all__ = ["build_manifest", "video_id_of"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def video_id_of(relative_path: str, keep_extension: bool = False) -> str:
    """Stable id of a video from its path relative to the input root (a URI or absolute path: the whole
    path without its scheme)."""
    p = PurePosixPath(_SCHEME.sub("", relative_path.replace("\\", "/")).lstrip("/"))
    name = p.name if keep_extension else p.stem
    text = "__".join([*p.parent.parts, name]) if str(p.parent) not in ("", ".") else name
    return _UNSAFE.sub("_", text).strip("._") or "video"


def _is_uri(path: str) -> bool:
    return "://" in path


def _open(path: str) -> tuple[pafs.FileSystem, str]:
    if _is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def _join(base: str, rel: str) -> str:
    return rel if _is_uri(rel) or rel.startswith("/") else f"{base.rstrip('/')}/{rel}"


def _exists(path: str) -> bool:
    fs, inner = _open(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def _resolve(parent: str, rel: str) -> str:
    """`rel` against the list's directory, else against that directory's parent (world layout)."""
    first = _join(parent, rel)
    if _is_uri(rel) or rel.startswith("/") or _exists(first):
        return first
    grand = parent.rstrip("/").rsplit("/", 1)[0]
    second = _join(grand, rel)
    return second if grand and _exists(second) else first


def _read_text(path: str) -> str:
    fs, inner = _open(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def _parent(path: str, fs_path: str) -> str:
    """Directory of a list file, spelt like the input (URI or absolute path)."""
    return path.rstrip("/").rsplit("/", 1)[0] if _is_uri(path) else str(Path(fs_path).parent)


def _from_list(path: str, fs_path: str) -> list[dict[str, Any]]:
    parent, rows = _parent(path, fs_path), []
    jsonl = path.endswith(".jsonl")
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if jsonl:
            try:
                rec = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{n}: not a JSON object: {err}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not rec["path"]:
                raise ValueError(f"{path}:{n}: a manifest row needs a string 'path' (got {line[:200]!r})")
            rel, vid = rec["path"], rec.get("video_id")
        else:
            rel, vid = line, None
        rows.append({"video_id": None if vid is None else str(vid), "path": _resolve(parent, rel), "rel": rel})
    return rows


def _from_directory(path: str, fs: pafs.FileSystem, fs_path: str, extensions: list[str]) -> list[dict[str, Any]]:
    exts = tuple(e.lower() for e in extensions)
    infos = fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(exts)
                   and not PurePosixPath(i.path).name.startswith("."))
    root = fs_path.rstrip("/") + "/"
    return [{"video_id": None, "path": _join(path, f[len(root):]) if _is_uri(path) else f, "rel": f[len(root):]}
            for f in files]


def build_manifest(videos: str, extensions: list[str] | None = None) -> list[dict[str, str]]:
    """[{video_id, path}] for `videos` (see module doc); raises ValueError / FileNotFoundError on bad input."""
    extensions = extensions or [".mp4", ".avi", ".mov", ".mkv", ".webm"]
    fs, fs_path = _open(videos)
    kind = fs.get_file_info(fs_path).type
    if kind == pafs.FileType.Directory:
        manifest = _join(videos, "manifest.jsonl") if _is_uri(videos) else str(Path(fs_path) / "manifest.jsonl")
        if _exists(manifest):
            rows = _from_list(manifest, _open(manifest)[1])
        else:
            rows = _from_directory(videos, fs, fs_path, extensions)
    elif kind == pafs.FileType.File:
        rows = _from_list(videos, fs_path)
    else:
        raise FileNotFoundError(f"videos={videos!r}: no such directory, list file or manifest")
    stems = Counter(video_id_of(r["rel"]) for r in rows if r["video_id"] is None)
    for r in rows:
        if r["video_id"] is None:
            vid = video_id_of(r["rel"])
            r["video_id"] = video_id_of(r["rel"], keep_extension=True) if stems[vid] > 1 else vid
        else:
            r["video_id"] = _UNSAFE.sub("_", r["video_id"]).strip("._") or "video"
    dup = sorted(v for v, c in Counter(r["video_id"] for r in rows).items() if c > 1)
    if dup:
        raise ValueError(f"videos={videos!r}: duplicate video ids {dup[:10]} (give each row a unique video_id)")
    return [{"video_id": r["video_id"], "path": r["path"]} for r in rows]
