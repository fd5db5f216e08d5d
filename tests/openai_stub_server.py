"""A real OpenAI-compatible HTTP server on loopback for judge tests: `POST /v1/chat/completions`.

    with StubJudgeServer(api_key="sk-test-123") as server:
        Judge("stub-judge", base_url=server.base_url, api_key_env="MY_KEY")
        server.requests            # every request seen: {"instruction", "status"}

It checks the request the way a strict server would (bearer key, model, temperature 0, one text part
holding the instruction, two decodable base64 PNG data URLs) and answers 400/401 otherwise. Replies are
computed from the images, so the judge's numbers are checkable:
    success = 0 if the two images are identical else 7;  minimal = round(10 * fraction of unchanged pixels)
Markers in the instruction script failures:
    [malformed]   200 with a reply holding no score list
    [ratelimit]   429 (Retry-After: 0) the first time this exact request is seen, then a normal reply
    [error500]    500 the first time, then a normal reply
    [alwaysfail]  500 every time

Run by hand (for `dynboot eval` against it): python tests/openai_stub_server.py --port 8011 --key sk-x
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

MARKER = "Editing instruction: "


class StubJudgeServer:
    def __init__(self, api_key: str | None = None, model: str = "stub-judge", port: int = 0):
        self.api_key, self.model = api_key, model
        self.requests: list[dict] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "StubJudgeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def count(self, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if status is None or r["status"] == status)

    # ---- request handling -------------------------------------------------------------------------
    def _answer(self, headers, body: bytes) -> tuple[int, dict, dict]:
        if self.api_key is not None and headers.get("Authorization") != f"Bearer {self.api_key}":
            # like api.openai.com, echo what was sent (the judge must redact it)
            sent = str(headers.get("Authorization", "")).removeprefix("Bearer ")
            return 401, {"error": {"message": f"Incorrect API key provided: {sent}", "type": "invalid_request_error"}}, {}
        try:
            req = json.loads(body)
            assert req["model"] == self.model, f"model {req['model']!r}"
            assert req.get("temperature") == 0, "temperature must be 0"
            parts = req["messages"][0]["content"]
            texts = [p["text"] for p in parts if p["type"] == "text"]
            urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
            assert len(texts) == 1 and MARKER in texts[0], "one text part with the instruction"
            assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls), "two PNG data URLs"
            images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB")) for u in urls]
        except (AssertionError, KeyError, TypeError, ValueError, OSError) as err:
            return 400, {"error": {"message": f"bad request: {err}", "type": "invalid_request_error"}}, {}
        instruction = texts[0].split(MARKER, 1)[1].strip()
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            first = digest not in self._seen
            self._seen.add(digest)
        if "[alwaysfail]" in instruction or ("[error500]" in instruction and first):
            return 500, {"error": {"message": "server error", "type": "server_error"}}, {}
        if "[ratelimit]" in instruction and first:
            return 429, {"error": {"message": "rate limited", "type": "rate_limit_error"}}, {"Retry-After": "0"}
        if "[malformed]" in instruction:
            content = "I am not able to rate these images."
        else:
            a, b = images
            same = a.shape == b.shape and np.array_equal(a, b)
            unchanged = float((a == b).all(-1).mean()) if a.shape == b.shape else 0.0
            success, minimal = (0 if same else 7), int(round(10 * unchanged))
            content = json.dumps({"score": [success, minimal], "reasoning": "computed by the stub"})
        return 200, {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": self.model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}, {}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    status, payload, extra = 404, {"error": {"message": f"no route {self.path}"}}, {}
                else:
                    status, payload, extra = server._answer(self.headers, body)
                instruction = ""
                try:
                    text = [p["text"] for p in json.loads(body)["messages"][0]["content"] if p["type"] == "text"][0]
                    instruction = text.split(MARKER, 1)[1].strip()
                except Exception:  # noqa: BLE001 - the log is best effort
                    pass
                with server._lock:
                    server.requests.append({"instruction": instruction, "status": status})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        return Handler


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--key", default=None, help="required bearer key (default: any)")
    ap.add_argument("--model", default="stub-judge")
    args = ap.parse_args()
    with StubJudgeServer(args.key, args.model, args.port) as s:
        print(f"stub judge at {s.base_url} (model {args.model})", flush=True)
        threading.Event().wait()
