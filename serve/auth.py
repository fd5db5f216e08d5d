"""Bearer-token auth of the HTTP API, failing closed.

    policy = AuthPolicy.from_env(args, bind_host)   # in each ingress replica, where the request is served
    policy.check(request)                           # 401 (OpenAI error shape) unless authorised

- The token is read from the environment of the process that serves the request (the ingress replica), so
  it never travels in deployment arguments and a replica started on another node reads its own copy: every
  node (every pod) must carry the secret.
- No token: the replica refuses to start when Serve's HTTP proxy listens beyond loopback (`0.0.0.0`, a LAN
  address, or an address it cannot read), unless `allow_unauthenticated` was set explicitly; on loopback it
  starts, serves loopback clients only and logs that auth is off.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass

from starlette.requests import Request

from serve.schemas import AppArgs
from serve.validate import ApiError

log = logging.getLogger("ray.serve")


class UnsafeExposure(RuntimeError):
    """Serving without a token on an address other hosts can reach."""


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_digest(token: str) -> str:
    """What the ingress keeps of the API token (compared in constant time; the token itself is not kept)."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_exposure(bind_host: str | None, has_token: bool, args: AppArgs) -> None:
    """Raise UnsafeExposure when the API would be open to other hosts without a token."""
    if has_token or args.allow_unauthenticated or is_loopback(bind_host):
        return
    raise UnsafeExposure(
        f"refusing to serve without authentication on {bind_host or 'an unknown address'}: the environment "
        f"variable {args.api_token_env} is empty or unset in this process. Set it (from a secret) on every node "
        "that can run the ingress, bind the HTTP proxy to 127.0.0.1, or set allow_unauthenticated=true to "
        "serve an open API on purpose.")


def serve_bind_host() -> str | None:
    """The host Serve's HTTP proxies listen on, from the Serve controller; None when it cannot be read
    (treated as beyond loopback). Ray has no public API for it inside a replica: this reads the client's
    cached HTTP options (ray.serve.context, Ray 2.60)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception as err:  # noqa: BLE001 - unknown means "not loopback": fail closed
        log.warning("could not read Serve's HTTP bind address (%s); assuming it is reachable from other hosts",
                    type(err).__name__)
        return None


@dataclass(frozen=True)
class AuthPolicy:
    digest: str | None  # sha256 of the token; None = no token configured
    loopback_only: bool  # no token: only loopback clients are served (unless allow_unauthenticated)

    @classmethod
    def from_env(cls, args: AppArgs, bind_host: str | None) -> "AuthPolicy":
        token = os.environ.get(args.api_token_env, "").strip()
        check_exposure(bind_host, bool(token), args)
        if not token:
            log.warning("API auth is OFF: %s is not set; %s", args.api_token_env,
                        "serving every client (allow_unauthenticated=true)" if args.allow_unauthenticated
                        else "serving loopback clients only")
        return cls(token_digest(token) if token else None, loopback_only=not token and not args.allow_unauthenticated)

    def authorised(self, request: Request) -> bool:
        try:
            self.check(request)
            return True
        except ApiError:
            return False

    def check(self, request: Request) -> None:
        if self.digest is None:
            client = request.client.host if request.client else None
            if self.loopback_only and not is_loopback(client):
                raise ApiError(401, "this server has no API token configured and serves loopback clients only",
                               code="auth_not_configured", headers={"WWW-Authenticate": "Bearer"})
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'", code="missing_token",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token_digest(token.strip()), self.digest):
            raise ApiError(401, "invalid bearer token", code="invalid_token", headers={"WWW-Authenticate": "Bearer"})
