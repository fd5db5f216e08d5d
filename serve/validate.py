"""Request checks of the HTTP ingress: every bad request becomes an `ApiError` (a 4xx with an OpenAI-style
JSON body naming the problem) before anything reaches a model replica.

    {"error": {"message": "n must be between 1 and 16, got 100", "type": "invalid_request_error",
               "param": "n", "code": "n_out_of_range"}}

Order of checks: bearer token (serve/auth.py) -> declared body size -> streamed body size and body deadline ->
multipart form -> fields -> image bytes -> image header (format, pixels) -> full decode. Images are checked from
their header before they are decoded, so a small file that claims a huge canvas is refused without allocating
it. Prompt lengths are counted in tokens by the model tiers, which own the tokenizers (serve/tiers.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from PIL import Image
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse

from dynboot.io.images import decode_image
from serve.schemas import AppArgs

log = logging.getLogger("ray.serve")

# /v1/images/edits: what the openai client may send, plus dynboot's extension fields (best_of and sampling);
# and what it may send that best-of-N cannot honour (refused by name). Of the accepted OpenAI fields, only
# `user` and `safety_identifier` (caller metadata) are accepted without meaning here; every other one is
# honoured or refused with the values allowed (serve/app.py).
EDIT_FIELDS = {"image", "image[]", "prompt", "n", "best_of", "response_format", "model", "size", "quality", "user",
               "background", "output_format", "safety_identifier", "stream", "temperature", "top_k", "seed",
               "return_candidates", "verifier_score"}
EDIT_UNSUPPORTED = {"mask": "best-of-N edits the whole image; masks are not supported",
                    "markup": "markup images are not supported", "partial_images": "streaming is not supported",
                    "output_compression": "images are returned as lossless PNG",
                    "input_fidelity": "the generator has no input-fidelity setting"}
ACTION_FIELDS = {"before", "after", "action", "model"}
ROLLOUT_FIELDS = {"image", "image[]", "actions", "best_of", "model", "response_format", "temperature", "top_k", "seed",
                  "verifier_score", "user"}
# OpenAI options this server can honour only with these values (anything else: 400 naming them); `size` is
# checked against the model's own side at request time.
CHOICES = {"response_format": ["b64_json"], "output_format": ["png"], "quality": ["auto"], "background": ["auto", "opaque"]}
# dynboot's sampling fields: (type, lowest, highest, default).
SAMPLING = {"temperature": (float, 0.0, 10.0, 1.0), "top_k": (int, 0, 1_000_000, 0), "seed": (int, 0, 2**31 - 1, None)}

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
         408: "timeout", 413: "request_too_large", 415: "unsupported_media_type", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "service_unavailable", 504: "timeout"}


class ApiError(Exception):
    """A request the API refuses, with the HTTP status and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def __reduce__(self):  # raised inside a model tier, it crosses to the ingress whole (Exception pickles args only)
        return ApiError, (self.status, self.message, self.param, self.code, self.headers)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": TYPES.get(self.status, "api_error"), "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def install_error_handlers(api: FastAPI) -> None:
    """Every error the app returns, its own, FastAPI's (404, 405, validation) or an unexpected exception (500),
    has the same JSON shape; a 500 names no internals (they go to the replica's log)."""

    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return ApiError(err.status_code, str(err.detail), code="http_error", headers=getattr(err, "headers", None)).response()

    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        where = ", ".join(".".join(map(str, e.get("loc", ()))) for e in err.errors())
        return ApiError(400, f"invalid request: {where or 'malformed input'}", code="invalid_request").response()

    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s: %s", request.method, request.url.path, type(err).__name__, exc_info=err)
        return ApiError(500, "internal server error", code="internal_error").response()

    api.add_exception_handler(ApiError, api_error)
    api.add_exception_handler(HTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, unexpected)


async def read_form(request: Request, max_body: int, timeout_s: float, max_fields: int = 32) -> FormData:
    """The multipart body, read with a hard cap (chunked bodies without Content-Length included) and a
    deadline: a client that sends its body too slowly gets 408 and frees its ingress slot."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError(415, f"expected a multipart/form-data body, got content-type {ctype or 'none'!r}",
                       code="unsupported_content_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {max_body} bytes",
                       code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise ApiError(413, f"request body exceeds the limit of {max_body} bytes", code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout") from None
    body = b"".join(chunks)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=4, max_fields=max_fields, max_part_size=64 * 1024)
    except (MultiPartException, HTTPException) as err:
        detail = getattr(err, "detail", None) or getattr(err, "message", None) or str(err)
        raise ApiError(400, f"malformed multipart body: {detail}", code="malformed_body") from None


def reject_unknown(form: FormData, accepted: set[str], unsupported: dict[str, str]) -> None:
    for key in form.keys():
        if key in unsupported:
            raise ApiError(400, f"field {key!r} is not supported: {unsupported[key]}", param=key, code="unsupported_field")
        if key not in accepted:
            raise ApiError(400, f"unknown field {key!r}; accepted fields: {', '.join(sorted(accepted))}", param=key,
                           code="unknown_field")


def text_field(form: FormData, key: str, required: bool = False) -> str | None:
    """One text value (stripped); a multipart text part is at most 64 KiB (read_form), and prompt lengths are
    checked in tokens by the model tiers."""
    values = form.getlist(key)
    if not values:
        if required:
            raise ApiError(400, f"missing required field {key!r}", param=key, code="missing_field")
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise ApiError(400, f"field {key!r} must be one text value", param=key, code="invalid_field")
    value = values[0].strip()
    if required and not value:
        raise ApiError(400, f"field {key!r} must not be empty", param=key, code="empty_field")
    return value


def choice_field(form: FormData, key: str, allowed: list[str], default: str | None = None) -> str | None:
    """A text value that must be one of `allowed` (so an option the server cannot honour is refused, never ignored)."""
    value = text_field(form, key)
    if value is None or value == "":
        return default
    if value not in allowed:
        raise ApiError(400, f"{key} {value!r} is not supported; allowed: {', '.join(allowed)}", param=key,
                       code=f"unsupported_{key}")
    return value


def number_field(form: FormData, key: str, kind: type, lo: float, hi: float, default):
    raw = text_field(form, key)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError
    except ValueError:
        raise ApiError(400, f"field {key!r} must be {'an integer' if kind is int else 'a number'}, got {raw!r}",
                       param=key, code="invalid_field") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be between {lo} and {hi}, got {value}", param=key, code=f"{key}_out_of_range")
    return value


def actions_field(form: FormData, key: str, max_steps: int) -> list[str]:
    """A JSON array of 1..max_steps non-empty action strings (their token lengths are checked by the model tiers)."""
    raw = text_field(form, key, required=True)
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ApiError(400, f"field {key!r} must be a JSON array of non-empty strings (one action per step), got "
                       f"{raw[:80]!r}", param=key, code="invalid_field")
    if not 1 <= len(value) <= max_steps:
        raise ApiError(400, f"{key} must hold between 1 and {max_steps} actions, got {len(value)}", param=key,
                       code=f"{key}_out_of_range")
    return [v.strip() for v in value]


def bool_field(form: FormData, key: str) -> bool:
    raw = (text_field(form, key) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(400, f"field {key!r} must be true or false, got {raw!r}", param=key, code="invalid_field")
    return raw in ("true", "1")


@dataclass
class CheckedImage:
    data: bytes  # the encoded bytes as uploaded (what travels to the model replicas)
    array: np.ndarray  # decoded RGB uint8 [H, W, 3]
    format: str


async def image_field(form: FormData, keys: tuple[str, ...], args: AppArgs) -> CheckedImage:
    """Exactly one uploaded image under one of `keys` (the openai client names a single file `image`,
    a list `image[]`), checked for size, format and pixel count, then decoded."""
    files = [(k, v) for k in keys for v in form.getlist(k)]
    name = keys[0]
    if not files:
        raise ApiError(400, f"missing required image file field {name!r}", param=name, code="missing_field")
    if len(files) > 1:
        raise ApiError(400, f"exactly one image is accepted in {name!r}, got {len(files)}", param=name,
                       code="too_many_images")
    key, upload = files[0]
    if not isinstance(upload, UploadFile):
        raise ApiError(400, f"field {key!r} must be a file upload (multipart file part), not a text value", param=key,
                       code="invalid_field")
    data = await upload.read(args.max_image_bytes + 1)
    if len(data) > args.max_image_bytes:
        raise ApiError(413, f"image {key!r} exceeds the limit of {args.max_image_bytes} bytes", param=key,
                       code="image_too_large")
    return check_image(data, key, args)


def check_image(data: bytes, key: str, args: AppArgs) -> CheckedImage:
    if not data:
        raise ApiError(400, f"image {key!r} is empty", param=key, code="invalid_image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format or "unknown", im.size
    except Exception as err:  # PIL raises many types for undecodable headers
        raise ApiError(400, f"image {key!r} is not a decodable image ({type(err).__name__})", param=key,
                       code="invalid_image") from None
    if fmt not in args.image_formats:
        raise ApiError(415, f"image {key!r} is {fmt}; supported formats: {', '.join(args.image_formats)}", param=key,
                       code="unsupported_image_format")
    if w * h > args.max_image_pixels:
        raise ApiError(413, f"image {key!r} is {w}x{h} = {w * h} pixels; the limit is {args.max_image_pixels}",
                       param=key, code="image_too_many_pixels")
    try:
        array = decode_image(data)
    except ValueError as err:  # a valid header over truncated or corrupt pixel data
        raise ApiError(400, f"image {key!r}: {err}", param=key, code="invalid_image") from None
    return CheckedImage(data, array, fmt)
