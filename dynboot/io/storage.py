"""Paths are URIs: one way to read and write local paths and object storage (`s3://`, `gs://`, `file://`, any
scheme pyarrow knows), through pyarrow filesystems, with credentials from the standard environment.

    fs, inner = resolve("s3://bucket/run/x.parquet")      # (S3FileSystem, "bucket/run/x.parquet")
    write_bytes("s3://bucket/run/summary.json", b"...")   # whole object at once: readers never see half of it
    read_text(join(out, "config.yaml")); exists(uri); list_files(uri, suffixes=(".mp4",))
    with local_copy("s3://bucket/v/a.mp4") as path: ...    # decoders read local files
    model_dir = local_model_dir("s3://bucket/models/idp")  # fetched once per node into a local cache
    copy_dir("runs/x/model", "s3://bucket/runs/x/model")   # upload an exported model

- A key is taken as the key it is: we split `scheme://bucket/key` ourselves instead of `FileSystem.from_uri`,
  which parses `?` as a query, `#` as a fragment and rejects spaces; so keys with spaces, non-ASCII, `#` and `?`
  read and write as themselves. Percent signs are literal too (no decoding).
- S3: `S3FileSystem` reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / ~/.aws / instance
  metadata itself, but ignores AWS_ENDPOINT_URL(_S3) (apache/arrow#49643), so the endpoint (MinIO, a loopback test
  server, ...) and the region are read here from those same standard variables; nothing custom.
- Local paths stay plain paths (made absolute by `absolute`, because Ray workers do not run in the driver's
  working directory); `file://` URIs are local paths spelt as URIs.
- Errors: `is_transient(err)` says whether an I/O error is worth retrying (network, throttling, timeouts,
  expired credentials) or is the input's own (missing key, permission, corrupt data); `retry` retries the former
  with exponential back-off. Jobs record transient failures as "retry later", never as a permanent quarantine.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, TypeVar

from pyarrow import fs as pafs

__all__ = [
    "is_uri", "resolve", "absolute", "join", "parent", "name", "exists", "is_dir", "is_file", "size", "read_bytes",
    "read_text", "write_bytes", "write_text", "delete", "delete_dir", "list_files", "open_input", "local_copy",
    "copy_dir", "local_model_dir", "ray_storage", "is_transient", "retry", "StorageError",
]

T = TypeVar("T")
CACHE_ENV = "DYNBOOT_CACHE_DIR"  # where model directories fetched from object storage are cached on each node


class StorageError(OSError):
    """An object-storage operation that failed for good (the message names the URI)."""


# ---- parsing ------------------------------------------------------------------------------------------------
def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (s3, gs, file, ...); Windows drive letters are not schemes."""
    s = str(path)
    head, sep, _ = s.partition("://")
    return bool(sep) and len(head) > 1 and head.replace("+", "").replace("-", "").replace(".", "").isalnum()


def _split(uri: str) -> tuple[str, str]:
    scheme, _, rest = uri.partition("://")
    return scheme.lower(), rest


@functools.lru_cache(maxsize=64)
def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    if scheme == "file":
        return pafs.LocalFileSystem()
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        # throttling (SlowDown/503) and dropped connections are retried inside the SDK before we ever see them
        retries = pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("AWS_MAX_ATTEMPTS", "10")))
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region, retry_strategy=retries)
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem()
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")  # hdfs://, abfs://, ...: pyarrow's own parsing
    return fs


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    s = str(path)
    if not is_uri(s):
        return pafs.LocalFileSystem(), str(Path(s).expanduser().absolute())
    scheme, rest = _split(s)
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{s!r}: no bucket after {scheme}://")
    return _filesystem(scheme, bucket), rest.rstrip("/") or bucket


def absolute(path: str) -> str:
    """A URI unchanged; a local path made absolute ('' stays '')."""
    if not path or is_uri(path):
        return path
    return str(Path(path).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base` / parts, spelt like `base` (URI or local path)."""
    s = str(base)
    if not is_uri(s):
        return str(Path(s).joinpath(*parts))
    return "/".join([s.rstrip("/"), *(p.strip("/") for p in parts if p)])


def parent(path: str | os.PathLike) -> str:
    s = str(path)
    if not is_uri(s):
        return str(Path(s).parent)
    scheme, rest = _split(s)
    head = rest.rstrip("/").rsplit("/", 1)[0] if "/" in rest.rstrip("/") else rest
    return f"{scheme}://{head}"


def name(path: str | os.PathLike) -> str:
    return PurePosixPath(str(path).rstrip("/")).name


# ---- reading and writing ------------------------------------------------------------------------------------
def _info(path: str) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def exists(path: str | os.PathLike) -> bool:
    return _info(str(path)).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    return _info(str(path)).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """A directory, or on object storage a prefix holding objects."""
    s = str(path)
    info = _info(s)
    if info.type == pafs.FileType.Directory:
        return True
    if info.type == pafs.FileType.File or not is_uri(s):
        return False
    fs, inner = resolve(s)
    return bool(fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True, recursive=False)))


def size(path: str | os.PathLike) -> int:
    info = _info(str(path))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {path}")
    return int(info.size)


def open_input(path: str | os.PathLike):
    """A readable binary stream; FileNotFoundError names the path."""
    fs, inner = resolve(path)
    try:
        return fs.open_input_stream(inner)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except OSError as err:
        if "not found" in str(err).lower() or "does not exist" in str(err).lower():
            raise FileNotFoundError(f"no such file: {path}") from None
        raise


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_input(path) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Publish `data` whole: locally a temp file beside `path` then a rename; on object storage one PUT, which
    object stores publish atomically (a reader sees the old object or the whole new one)."""
    s = str(path)
    if not is_uri(s) or s.startswith("file://"):
        _, local = resolve(s)
        p = Path(local)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return s
    fs, inner = resolve(s)
    with fs.open_output_stream(inner) as f:
        f.write(data)
    return s


def write_text(path: str | os.PathLike, text: str) -> str:
    return write_bytes(path, text.encode())


def delete(path: str | os.PathLike, missing_ok: bool = True) -> None:
    fs, inner = resolve(path)
    try:
        fs.delete_file(inner)
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError as err:
        if not (missing_ok and "not found" in str(err).lower()):
            raise


def delete_dir(path: str | os.PathLike) -> None:
    """Remove a directory tree (a prefix on object storage); absent is fine."""
    fs, inner = resolve(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(inner)


def list_files(path: str | os.PathLike, recursive: bool = True, suffixes: tuple[str, ...] | None = None,
               hidden: bool = False) -> list[str]:
    """Files under a directory/prefix, sorted, spelt like `path` (URIs stay URIs). Hidden names (a leading '.' or
    '_' in the file name: temp files, commit markers) are left out unless `hidden`."""
    s = str(path)
    fs, inner = resolve(s)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
    root = inner.rstrip("/") + "/"
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        base = PurePosixPath(info.path).name
        if not hidden and base[:1] in (".", "_"):
            continue
        if suffixes and not base.lower().endswith(tuple(x.lower() for x in suffixes)):
            continue
        out.append(join(s, info.path[len(root):]) if info.path.startswith(root) else info.path)
    return sorted(out)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike, chunk: int = 8 << 20) -> Iterator[str]:
    """A local file path for `path`: itself when local, else a temp copy of the object (removed afterwards)."""
    s = str(path)
    if not is_uri(s) or s.startswith("file://"):
        local = resolve(s)[1]
        if not os.path.isfile(local):
            raise FileNotFoundError(f"no such file: {s}")
        yield local
        return
    fd, tmp = tempfile.mkstemp(suffix=PurePosixPath(s).suffix, prefix="dynboot-")
    try:
        with os.fdopen(fd, "wb") as dst, open_input(s) as src:
            while block := src.read(chunk):
                dst.write(block)
        yield tmp
    finally:
        os.unlink(tmp)


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Copy a directory tree between any two filesystems (e.g. an exported model to a bucket)."""
    sfs, sin = resolve(src)
    dfs, din = resolve(dst)
    if not is_uri(str(dst)):
        Path(din).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(sin, din, source_filesystem=sfs, destination_filesystem=dfs)
    return str(dst)


# ---- model directories on object storage ------------------------------------------------------------------
def _listing(uri: str) -> list[list]:
    fs, inner = resolve(uri)
    root = inner.rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted([i.path[len(root):], int(i.size)] for i in infos if i.type == pafs.FileType.File)


def local_model_dir(path: str | os.PathLike) -> Path:
    """A local directory holding the model at `path`: itself when local; for a URI, a copy in this node's cache
    (`$DYNBOOT_CACHE_DIR`, default ~/.cache/dynboot/models), fetched once per node: concurrent actors wait on a
    file lock, and a copy is reused while the remote listing (names and sizes) is unchanged."""
    s = str(path)
    if not is_uri(s) or s.startswith("file://"):
        local = Path(resolve(s)[1])
        if not local.is_dir():
            raise FileNotFoundError(f"model path {s!r} is not a directory")
        return local
    listing = _listing(s)
    if not listing:
        raise FileNotFoundError(f"model path {s!r}: no files under it")
    digest = hashlib.sha256(json.dumps([s, listing]).encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dynboot" / "models")
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name(s)[:64] or 'model'}-{digest}"
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies mid-fetch
        if (target / ".complete").is_file():
            return target
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
        try:
            retry(lambda: copy_dir(s, staging), what=f"fetching {s}")
            (staging / ".complete").write_text(json.dumps(listing))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def ray_storage(path: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: local paths as they are, URIs as the path
    inside our filesystem (so the endpoint and credentials are the ones this module resolves)."""
    if not is_uri(path) or path.startswith("file://"):
        return resolve(path)[1], None
    fs, inner = resolve(path)
    return inner, fs


# ---- transient errors ---------------------------------------------------------------------------------------
_TRANSIENT_WORDS = (  # as pyarrow's S3/GCS errors and socket errors spell them
    "network_connection", "connection reset", "connection refused", "connection aborted", "broken pipe",
    "timed out", "timeout", "slow_down", "slowdown", "throttl", "too many requests", "service_unavailable",
    "service unavailable", "internal_failure", "internalerror", "request_timeout", "expired_token", "expiredtoken",
    "token has expired", "requesttimetooskewed", "curlcode", "temporarily", "try again",
    "http 429", "http 500", "http 502", "http 503", "http 504", "status code: 5", "status code 5",
    "http status 429", "http status 500", "http status 502", "http status 503", "http status 504",  # pyarrow's S3
)
_PERMANENT_TYPES = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError,
                    UnicodeError)


def is_transient(err: BaseException) -> bool:
    """Worth retrying later: network and service errors, throttling, timeouts, expired credentials. Not: a
    missing file, a permission error, bad data."""
    if isinstance(err, _PERMANENT_TYPES):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, OSError) and any(w in text for w in _TRANSIENT_WORDS)


def retry(fn: Callable[[], T], attempts: int = 4, base_s: float = 0.5, what: str = "",
          sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, retried with exponential back-off and jitter while it raises a transient error."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts or not is_transient(err):
                raise
            sleep(base_s * 2 ** (attempt - 1) * (1 + random.random() / 2))
    raise AssertionError(f"unreachable: {what}")
