"""Bearer tokens: an optional client token for every /v1 route and a separate admin token for
registry writes. Both come from environment variables (never from a config file), are compared
in constant time, and are never logged."""

from __future__ import annotations

import hmac
import os

from cold_ray.serve.errors import APIError


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
        self.api_key = os.environ.get(api_key_env) or None
        self.admin_key = os.environ.get(admin_key_env) or None

    def __repr__(self) -> str:  # never the secrets themselves
        return f"Tokens(client={'on' if self.api_key else 'off'}, admin={'on' if self.admin_key else 'off'})"

    def check(self, authorization: str, admin: bool = False) -> None:
        """Raise a 401 (missing/unknown token) or 403 (client token on an admin route).

        No client token configured: client routes are open. No admin token configured: admin
        routes need what client routes need. The admin token also opens client routes."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        if admin and self.admin_key is not None:
            if _matches(token, self.admin_key):
                return
            if _matches(token, self.api_key):
                raise APIError(403, "this endpoint needs the admin token", "admin_required")
            raise APIError(401, _missing_or_invalid(token, "admin"), "invalid_api_key")
        if self.api_key is None or _matches(token, self.api_key):
            return
        if _matches(token, self.admin_key):
            return
        raise APIError(401, _missing_or_invalid(token, "API"), "invalid_api_key")
