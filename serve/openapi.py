"""The OpenAPI schema the ingress serves (openapi=true): FastAPI's routes, plus what FastAPI cannot see.

The routes parse their multipart bodies by hand (to cap sizes while streaming), so FastAPI's generated schema
has no request bodies. They are described here from the same constants and settings the checks use
(serve/validate.py, AppArgs), so a client or a fuzzer (tests/test_serve_fuzz.py) built from the schema sends
what the server really accepts, and every error response is declared in the OpenAI error shape.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI

from serve.schemas import AppArgs
from dynboot.method.verify import VERIFIER_SCORES
from serve.validate import CHOICES, SAMPLING

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
ERROR_STATUSES = {"400": "bad request", "401": "missing or wrong bearer token", "404": "unknown route or model",
                  "408": "request body too slow", "413": "body or image too large", "415": "unsupported media type",
                  "429": "queue full", "500": "model call failed", "503": "replica unavailable",
                  "504": "deadline passed"}


def _number(kind: type, lo, hi, default, description: str) -> dict:
    out = {"type": "integer" if kind is int else "number", "minimum": lo, "maximum": hi, "description": description}
    return out | ({"default": default} if default is not None else {})


def _image(description: str) -> dict:
    return {"type": "string", "format": "binary", "description": description}


def edit_form(args: AppArgs, side: int) -> dict:
    props = {
        "image": _image(f"The before image ({', '.join(args.image_formats)}; at most {args.max_image_bytes} bytes and "
                        f"{args.max_image_pixels} pixels)."),
        "prompt": {"type": "string", "minLength": 1,
                   "description": f"The action, in words (at most {args.max_prompt_tokens} tokens of the model)."},
        "n": _number(int, 1, args.max_best_of, 1, "Images returned: the top n candidates by verifier score."),
        "best_of": _number(int, 1, args.max_best_of, None,
                           f"Candidates sampled (>= n; default max({args.default_best_of}, n))."),
        "size": {"type": "string", "enum": ["auto", f"{side}x{side}"], "description": "The model's own output size."},
        "model": {"type": "string", "enum": [args.model_name]},
        "user": {"type": "string"}, "safety_identifier": {"type": "string"},
        "stream": {"type": "boolean", "enum": [False]},
        "return_candidates": {"type": "boolean", "description": "Add every candidate's codes, PNG and score."},
        "verifier_score": _verifier_score(args),
    }
    props |= {key: {"type": "string", "enum": allowed} for key, allowed in CHOICES.items()}
    props |= {key: _number(*spec, description=f"Sampling: {key}.") for key, spec in SAMPLING.items()}
    return {"type": "object", "required": ["image", "prompt"], "properties": props, "additionalProperties": False}


def _verifier_score(args: AppArgs) -> dict:
    return {"type": "string", "enum": list(VERIFIER_SCORES),
            "description": f"How candidates are ranked (dynboot.method.verify; default {args.verification.score!r})."}


def rollout_form(args: AppArgs) -> dict:
    props = {
        "image": _image("The start image."),
        "actions": {"type": "string", "contentMediaType": "application/json",
                    "description": f"A JSON array of 1 to {args.max_rollout_steps} actions, applied in order."},
        "best_of": _number(int, 1, args.max_best_of, args.default_best_of, "Candidates sampled per step."),
        "model": {"type": "string", "enum": [args.model_name]}, "user": {"type": "string"},
        "response_format": {"type": "string", "enum": CHOICES["response_format"]},
        "verifier_score": _verifier_score(args),
    }
    props |= {key: _number(*spec, description=f"Sampling: {key}.") for key, spec in SAMPLING.items()}
    return {"type": "object", "required": ["image", "actions"], "properties": props, "additionalProperties": False}


def action_form(args: AppArgs) -> dict:
    return {"type": "object", "required": ["before", "after"], "properties": {
        "before": _image("The before image."), "after": _image("The after image."),
        "action": {"type": "string", "description": "Score this action instead of captioning the pair."},
        "model": {"type": "string", "enum": [args.model_name]}}, "additionalProperties": False}


def openapi_schema(api: FastAPI, args: AppArgs, side: int, bearer: bool) -> dict:
    schema = copy.deepcopy(api.openapi())
    errors = {status: {"description": what, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
              for status, what in ERROR_STATUSES.items()}
    for path, ops in schema["paths"].items():
        for op in ops.values():
            op.setdefault("responses", {}).update(errors)
            op["responses"].pop("422", None)  # FastAPI's validation errors are answered as 400 (validate.py)
            if bearer and path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
    for path, form in (("/v1/images/edits", edit_form(args, side)), ("/v1/actions", action_form(args)),
                       ("/v1/rollouts", rollout_form(args))):
        schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
    if bearer:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    return schema
