"""Real network faults between the tests and the loopback S3 server: an HTTP proxy in front of `moto_server` that
forwards every request, except those a test tells it to fail the way object stores fail under load.

    with FaultyS3(s3_server) as proxy:          # AWS_ENDPOINT_URL now points at the proxy
        proxy.throttle("videos/throttled")      # GETs of keys containing this answer 503 SlowDown
        proxy.down()                            # the port refuses connections (a server gone mid-run)
        proxy.up()                              # serving again on the same port

The faults are real: a 503 with S3's XML error body (what S3 sends when it throttles), and a closed port (what a
client sees when the server stops). Nothing in the code under test knows about the proxy.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your '
             b'request rate.</Message><RequestId>dynboot-test</RequestId></Error>')
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy.connections.add(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.server.proxy.connections.discard(self.connection)  # type: ignore[attr-defined]
        super().finish()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # what the AWS SDK sends for uploads
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        proxy: FaultyS3 = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        key = unquote(urlsplit(self.path).path)
        if self.command in ("GET", "HEAD") and any(t in key for t in proxy.throttled):
            proxy.throttled_hits += 1
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"expect"}}
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # forwarded as it came
                headers["Transfer-Encoding"] = "chunked"
                upstream.request(self.command, self.path, body=iter([body] if body else []), headers=headers,
                                 encode_chunked=True)
            else:
                upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            # a HEAD answer carries the object's length, not its (empty) body's
            self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve


class FaultyS3:
    """A loopback proxy to an `S3Server` (tests/s3_server.py) that can throttle keys or stop listening."""

    def __init__(self, s3_server):
        self.s3 = s3_server
        parts = urlsplit(s3_server.url)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        from s3_server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.throttled: set[str] = set()
        self.throttled_hits = 0
        self.connections: set = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._saved: str | None = None

    def up(self) -> None:
        if self._httpd is not None:
            return
        ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="faulty-s3")
        self._thread.start()

    def down(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        for conn in list(self.connections):  # kept-alive connections die with the server, as they would
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)
        self._httpd = self._thread = None

    def throttle(self, key_part: str) -> None:
        self.throttled.add(key_part)

    def clear(self) -> None:
        self.throttled.clear()

    def __enter__(self) -> "FaultyS3":
        self.up()
        self._saved = os.environ.get("AWS_ENDPOINT_URL")
        os.environ["AWS_ENDPOINT_URL"] = self.url
        from dynboot.io import storage

        storage._filesystem.cache_clear()
        return self

    def __exit__(self, *exc) -> None:
        self.down()
        os.environ["AWS_ENDPOINT_URL"] = self._saved or self.s3.url
        from dynboot.io import storage

        storage._filesystem.cache_clear()
