"""Bearer tokens and who may write the registry.

An optional client token guards every /v1 route; a separate admin token guards registry
writes (POST/DELETE /v1/adapters). Both come from environment variables (never from a config
file), are compared in constant time, and are never logged.

The rule for registry writes:
- admin token set: only the admin token opens them (a client token gets 403);
- no admin token: they are open only while no token at all is set, and a server that listens
  beyond loopback refuses to start in that state (`exposure_problem`) unless the operator says
  `allow_unauthenticated_admin: true` (a trusted network) or turns the admin API off;
- a client token never opens them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os

from cold_ray.serve.errors import APIError

log = logging.getLogger(__name__)


def _matches(token: str | None, secret: str | None) -> bool:
    return (
        token is not None
        and secret is not None
        and hmac.compare_digest(token.encode(), secret.encode())
    )


def _missing_or_invalid(token: str | None, what: str) -> str:
    if token is None:
        return f"missing {what} token: send the header 'Authorization: Bearer <token>'"
    return f"invalid {what} token"


class Tokens:
    def __init__(self, api_key_env: str, admin_key_env: str):
        self.api_key_env, self.admin_key_env = api_key_env, admin_key_env
        self.api_key = os.environ.get(api_key_env) or None
        self.admin_key = os.environ.get(admin_key_env) or None

    def __repr__(self) -> str:  # never the secrets themselves
        return f"Tokens(client={'on' if self.api_key else 'off'}, admin={'on' if self.admin_key else 'off'})"

    def check(self, authorization: str, admin: bool = False) -> None:
        """Raise a 401 (missing/unknown token) or 403 (a token that may not do this).

        No client token configured: client routes are open. The admin token also opens client
        routes. Admin routes: see the module docstring."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        if admin and self.admin_key is not None:
            if _matches(token, self.admin_key):
                return
            if _matches(token, self.api_key):
                raise APIError(403, "this endpoint needs the admin token", "admin_required")
            raise APIError(401, _missing_or_invalid(token, "admin"), "invalid_api_key")
        if admin and self.api_key is not None:
            raise APIError(
                403, f"registry writes need the admin token, and the server has none: set "
                f"{self.admin_key_env} in its environment (a client token never opens them)",
                "admin_required",
            )  # fmt: skip
        if self.api_key is None or _matches(token, self.api_key):
            return
        if _matches(token, self.admin_key):
            return
        raise APIError(401, _missing_or_invalid(token, "API"), "invalid_api_key")


def is_loopback(host: str) -> bool:
    """Whether `host` (Serve's http_options.host) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def needs_admin_token(host: str | None, args) -> bool:
    """Whether a server listening on `host` (Serve's http_options.host; None: no HTTP proxy)
    starts only with an admin token: its admin API is on, reachable beyond loopback, and not
    declared open on purpose. `args` is AppArgs."""
    return (
        args.admin_api
        and not args.allow_unauthenticated_admin
        and host is not None
        and not is_loopback(host)
    )


def exposure_problem(host: str | None, tokens: Tokens, args) -> str | None:
    """Why a server with these settings must not start (None: it may). `host`: Serve's
    http_options.host (None: Serve runs no HTTP proxy). `args` is AppArgs."""
    if tokens.admin_key is not None or not needs_admin_token(host, args):
        return None
    return (
        f"the HTTP server listens on {host!r}, beyond loopback, and no admin "
        f"token is set, so anyone who reaches the port could register and delete adapters. "
        f"Set {args.admin_key_env} (and {args.api_key_env} for clients) in the environment "
        "of `serve run`, or set `allow_unauthenticated_admin: true` in the app's args on a "
        "trusted network, or `admin_api: false`, or listen on 127.0.0.1 "
        "(http_options.host)."
    )


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies listen on (None: no HTTP proxy), asked of the running
    Serve controller. Raises LookupError when no Serve instance runs (e.g. a Python caller
    composing the app before `serve.run`, whose ingress checks again when it starts)."""
    import ray

    if not ray.is_initialized():
        raise LookupError("Ray is not initialised")
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise LookupError("no Serve instance runs")
    return client.http_config.host
