"""Bearer tokens and who may write the registry.

An optional client token guards every /v1 route; a separate admin token guards registry
writes (POST/DELETE /v1/adapters). Both come from environment variables (never from a config
file), are compared in constant time, and are never logged.

The rule for registry writes:
- admin token set: only the admin token opens them (a client token gets 403);
- no admin token: they are open only while no token at all is set;
- a client token never opens them.

A server that listens beyond loopback starts only with both tokens set (`exposure_problem`),
or with each missing one opted out of on purpose: `allow_unauthenticated_admin: true` (or
`admin_api: false`) for registry writes, `allow_unauthenticated_clients: true` for the rest.
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
                403,
                f"registry writes need the admin token, and the server has none: set "
                f"{self.admin_key_env} in its environment (a client token never opens them)",
                "admin_required",
            )
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


def required_tokens(host: str | None, args) -> list[str]:
    """The environment variables a server listening on `host` (Serve's http_options.host;
    None: no HTTP proxy) must have set to start: none on loopback; beyond it, the admin token
    (unless the admin API is off or opted out of) and the client token (unless opted out of).
    `args` is AppArgs."""
    if host is None or is_loopback(host):
        return []
    needed = []
    if args.admin_api and not args.allow_unauthenticated_admin:
        needed.append(args.admin_key_env)
    if not args.allow_unauthenticated_clients:
        needed.append(args.api_key_env)
    return needed


def exposure_problem(host: str | None, tokens: Tokens, args) -> str | None:
    """Why a server with these settings must not start (None: it may). `host`: Serve's
    http_options.host (None: Serve runs no HTTP proxy). `args` is AppArgs."""
    have = {args.admin_key_env: tokens.admin_key, args.api_key_env: tokens.api_key}
    missing = [env for env in required_tokens(host, args) if not have[env]]
    if not missing:
        return None
    risks = []
    if args.admin_key_env in missing:
        risks.append(f"register and delete adapters ({args.admin_key_env} unset)")
    if args.api_key_env in missing:
        risks.append(f"use the model and list the adapters ({args.api_key_env} unset)")
    outs = []
    if args.admin_key_env in missing:
        outs.append("`allow_unauthenticated_admin: true` (or `admin_api: false`)")
    if args.api_key_env in missing:
        outs.append("`allow_unauthenticated_clients: true`")
    return (
        f"the HTTP server listens on {host!r}, beyond loopback, so anyone who reaches the port "
        f"could {' and '.join(risks)}. Set {' and '.join(missing)} in the environment of "
        f"`serve run`, or on a trusted network set {' and '.join(outs)} in the app's args, or "
        "listen on 127.0.0.1 (http_options.host)."
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
