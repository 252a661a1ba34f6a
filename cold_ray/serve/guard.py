"""What a web page may make a browser do to this server: Host names, body types and CORS.

A page the user visits can drive their browser against a server on their machine or network,
tokens or not (an open loopback server has none):
- **DNS rebinding.** The page re-points its own name at 127.0.0.1 (or the server's address);
  the browser then treats the API as the page's own origin and lets it read and write. Those
  requests carry the page's name in the Host header, so only the loopback names and the names
  in `allowed_hosts` are served (as Jupyter and Ollama do); others get 421.
- **Simple requests.** A cross-origin POST whose Content-Type is text/plain, a form type or
  absent needs no CORS preflight: it reaches the server although the page cannot read the
  answer, which is enough to write the registry. Bodies must be application/json (415
  otherwise), which a page may send only after a preflight, and preflights are granted only to
  the origins in `cors_origins` (none by default).

Serve builds the FastAPI app once per process, before the ingress replica receives its
arguments, so the ingress hands its policy to the middleware through `configure()` (one
ingress replica per process).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from cold_ray.serve.errors import error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def parse_host(value: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host header value or an `allowed_hosts` entry: the host lowercased,
    without IPv6 brackets or a trailing dot; None when `value` is not a host[:port]."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if not _ip(host) or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    elif value.count(":") > 1:  # a bare IPv6 address (allow-list entries only)
        host, port = value, None
        if not _ip(host):
            return None
    else:
        host, sep, port = value.partition(":")
        port = port if sep else None
        host = host.removesuffix(".")
        if not host or not all(c.isalnum() or c in ".-_" for c in host):
            return None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def json_body_problem(content_type: str | None) -> str | None:
    """Why a request body with this Content-Type is refused; None for application/json (the
    only type accepted: JSON is UTF-8, so another charset is refused too)."""
    if not content_type:
        return "the request has no Content-Type: send the JSON body with 'Content-Type: application/json'"
    media, *params = (p.strip().lower() for p in content_type.split(";"))
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    if media == "application/json" and all(c in ("utf-8", "utf8") for c in charsets):
        return None
    return (
        f"Content-Type {content_type[:100]!r} is not accepted: send the JSON body with "
        "'Content-Type: application/json'"
    )


@dataclass(frozen=True)
class BrowserPolicy:
    """Host allow-list and CORS origins, from the app's args (`allowed_hosts`, `cors_origins`)."""

    hosts: tuple[tuple[str, int | None], ...] = ()  # besides the loopback names
    any_host: bool = False
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args) -> BrowserPolicy:
        entries = args.allowed_hosts or []
        hosts = tuple(h for h in map(parse_host, entries) if h is not None)
        return cls(hosts, "*" in entries, tuple(args.cors_origins))

    def host_problem(self, header: str | None) -> str | None:
        """Why a request with this Host header is refused (None: it is served)."""
        if self.any_host:
            return None
        if not header:
            return "the request has no Host header"
        parsed = parse_host(header)
        if parsed is None:
            return f"Host header {header[:100]!r} is not a host name"
        host, port = parsed
        if _is_loopback(host) or any(host == h and p in (None, port) for h, p in self.hosts):
            return None
        listed = ", ".join(LOOPBACK_NAMES + tuple(_entry(h, p) for h, p in self.hosts))
        return (
            f"this server does not answer for Host {header[:100]!r} (it answers for {listed}): "
            "if clients reach it under this name, add the name to allowed_hosts in the app's "
            "args"
        )


def _entry(host: str, port: int | None) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port is None else f"{name}:{port}"


_policy: BrowserPolicy | None = None


def configure(policy: BrowserPolicy) -> None:
    """Set the policy that `BrowserGuard` applies in this process (the ingress does, at start)."""
    global _policy
    _policy = policy


class BrowserGuard:
    """ASGI middleware: refuse a Host off the allow-list (421), and answer CORS only for the
    configured origins. Requests pass untouched until `configure()` has run."""

    def __init__(self, app):
        self.app = app
        self._cors: tuple[BrowserPolicy, CORSMiddleware] | None = None

    async def __call__(self, scope, receive, send):
        policy = _policy
        if scope["type"] != "http" or policy is None:
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        problem = policy.host_problem(host)
        if problem is not None:
            response = JSONResponse(error_body(421, problem, "host_not_allowed"), 421)
            return await response(scope, receive, send)
        if not policy.cors_origins:
            return await self.app(scope, receive, send)
        if self._cors is None or self._cors[0] is not policy:
            cors = CORSMiddleware(
                self.app,
                allow_origins=list(policy.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type"],
                max_age=600,
            )
            self._cors = (policy, cors)
        await self._cors[1](scope, receive, send)
