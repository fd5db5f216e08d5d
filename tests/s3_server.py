"""A real S3-protocol server on loopback for the object-storage tests: `moto_server` in server mode (as Ray's own
test suite uses), started by the tests themselves, in a subprocess we stop by its PID.

    with S3Server() as s3:             # sets AWS_ENDPOINT_URL + dummy credentials in os.environ
        s3.bucket("runs")              # -> "s3://runs"

Environment variables are set before any Ray cluster starts, so Ray workers inherit them, as they would on a
real cluster where the node environment carries the credentials.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    def start(self) -> "S3Server":
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1).read()
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        for k, v in {**ENV, "AWS_ENDPOINT_URL": self.url}.items():
            self._saved[k] = os.environ.get(k)
            os.environ[k] = v
        from dynboot.io import storage

        storage._filesystem.cache_clear()  # filesystems made before the endpoint was set would point elsewhere
        return self

    def bucket(self, name: str) -> str:
        from pyarrow import fs as pafs

        pafs.S3FileSystem(endpoint_override=self.url, region="us-east-1", allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        from dynboot.io import storage

        storage._filesystem.cache_clear()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
