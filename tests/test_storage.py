"""dynboot.io.storage against a real S3-protocol server on loopback (moto) and the local filesystem: the same calls,
keys with spaces / non-ASCII / '#' / '?', model directories cached once per node, transient vs permanent errors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dynboot.io import storage

ODD_KEYS = ["plain.txt", "with space.txt", "hash#tag.txt", "query?x=1.txt", "pct%20lit.txt", "日本語/動画 1.mp4"]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket") + "/run"


def test_write_read_list_delete_roundtrip(root):
    for key in ODD_KEYS:
        storage.write_text(storage.join(root, "d", key), f"content of {key}")
    listed = storage.list_files(storage.join(root, "d"))
    assert listed == sorted(storage.join(root, "d", k) for k in ODD_KEYS)
    for uri in listed:  # every listed name reads back as the key it is
        assert storage.read_text(uri) == f"content of {uri.split('/d/', 1)[1]}"
    assert storage.is_file(storage.join(root, "d", "hash#tag.txt"))
    assert storage.is_dir(storage.join(root, "d"))
    assert not storage.exists(storage.join(root, "d", "hash"))  # '#' is not a fragment separator
    storage.delete(storage.join(root, "d", "query?x=1.txt"))
    assert not storage.exists(storage.join(root, "d", "query?x=1.txt"))
    assert storage.exists(storage.join(root, "d", "plain.txt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(storage.join(root, "d", "absent.txt"))


def test_hidden_and_suffix_filters(root):
    for key in ["a.parquet", ".a.parquet.tmp", "_commit.json", "b.PARQUET", "c.json"]:
        storage.write_bytes(storage.join(root, key), b"x")
    assert [storage.name(p) for p in storage.list_files(root, suffixes=(".parquet",))] == ["a.parquet", "b.PARQUET"]
    assert "_commit.json" in [storage.name(p) for p in storage.list_files(root, hidden=True)]


def test_local_copy_of_an_object(bucket):
    uri = f"{bucket}/videos/clip #1.mp4"
    storage.write_bytes(uri, b"\x00" * 1000)
    with storage.local_copy(uri) as path:
        assert Path(path).read_bytes() == b"\x00" * 1000
    assert not Path(path).exists()


def test_model_dir_fetched_once_per_node_and_refetched_when_changed(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"w" * 4096)
    uri = storage.copy_dir(src, f"{bucket}/models/idp v1")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(storage.local_model_dir(uri))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1, "concurrent callers share one cached copy"
    local = results[0]
    assert (local / "sub" / "weights.bin").read_bytes() == b"w" * 4096
    marker = (local / ".complete").stat().st_mtime_ns
    assert storage.local_model_dir(uri) == local and (local / ".complete").stat().st_mtime_ns == marker
    storage.write_bytes(f"{uri}/sub/weights.bin", b"v" * 10)  # re-exported model: the cache must not serve it stale
    fresh = storage.local_model_dir(uri)
    assert fresh != local and (fresh / "sub" / "weights.bin").read_bytes() == b"v" * 10
    assert storage.local_model_dir(src) == src  # local directories are used in place
    with pytest.raises(FileNotFoundError):
        storage.local_model_dir(f"{bucket}/models/absent")


def test_transient_errors_are_retried_and_permanent_ones_are_not():
    assert storage.is_transient(OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your rate"))
    assert storage.is_transient(OSError("AWS Error NETWORK_CONNECTION during HeadObject: curlCode: 7"))
    assert storage.is_transient(ConnectionResetError("reset by peer"))
    assert storage.is_transient(OSError("AWS Error EXPIRED_TOKEN: The provided token has expired"))
    assert storage.is_transient(OSError("When reading information for key 'v/a.mp4' in bucket 'b': AWS Error UNKNOWN "
                                        "(HTTP status 503) during HeadObject operation: No response body."))
    assert not storage.is_transient(FileNotFoundError("no such file: s3://b/ep000500.mp4"))
    assert not storage.is_transient(OSError("AWS Error ACCESS_DENIED during GetObject operation"))
    assert not storage.is_transient(ValueError("timeout=3 is not a video"))
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SERVICE_UNAVAILABLE: try again")
        return "ok"

    assert storage.retry(flaky, attempts=4, sleep=slept.append) == "ok" and len(calls) == 3
    assert slept[1] > slept[0] > 0  # exponential back-off
    with pytest.raises(FileNotFoundError):
        storage.retry(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), sleep=slept.append)


def test_uri_helpers():
    assert storage.is_uri("s3://b/k") and storage.is_uri("file:///tmp/x") and not storage.is_uri("/tmp/x")
    assert not storage.is_uri("C://x") and not storage.is_uri("relative/dir")
    assert storage.join("s3://b/run/", "shards", "x.parquet") == "s3://b/run/shards/x.parquet"
    assert storage.parent("s3://b/run/x.json") == "s3://b/run" and storage.name("s3://b/run/x.json") == "x.json"
    fs, inner = storage.resolve("s3://bucket/a b#c?d")
    assert inner == "bucket/a b#c?d"
    assert storage.resolve("file:///tmp/x y")[1] == "/tmp/x y"
    assert storage.absolute("s3://b/x") == "s3://b/x" and Path(storage.absolute("rel")).is_absolute()
    path, fs = storage.ray_storage("s3://b/runs/train")
    assert path == "b/runs/train" and fs is not None
    assert storage.ray_storage("/tmp/runs") == ("/tmp/runs", None)
