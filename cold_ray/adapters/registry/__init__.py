"""The adapter registry: a durable catalog of LoRA adapters shared by every replica.

    reg = open_registry("postgresql://cold@db:5432/cold")   # or a SQLite file path
    reg.add("math", "s3://bucket/adapters/math", args=engine.args, max_rank=16)
    engine = EngineCore(config, resolver=reg.resolver())

Two backends keep one catalog with the same schema and semantics: a SQLite file (the embedded
default, for one machine) and PostgreSQL (for a cluster: every node reads the same catalog).
An adapter is validated against the base model *before* it is listed, so a listed adapter was
loadable when it was added; the checksum of its weights and config is recorded and checked
again by every load, so files changed behind the registry's back are reported, not served.

Adapter names are catalog keys only (`[A-Za-z0-9._-]{1,64}`), never used to build a path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cold_ray.adapters.registry.base import (
    NAME_RE,
    SCHEMA_VERSION,
    AdapterExists,
    AdapterNotFound,
    AdapterRecord,
    AdapterRegistry,
    RegistryError,
    check_name,
)
from cold_ray.adapters.registry.sqlite import SQLiteRegistry
from cold_ray.adapters.sources import DEFAULT_SCHEMES

# `Registry(path)` opens the embedded SQLite catalog, as it always has.
Registry = SQLiteRegistry
PASSWORD_ENV = "COLD_RAY_REGISTRY_PASSWORD"
_PG_SCHEMES = ("postgresql", "postgres")

__all__ = [
    "NAME_RE",
    "PASSWORD_ENV",
    "SCHEMA_VERSION",
    "AdapterExists",
    "AdapterNotFound",
    "AdapterRecord",
    "AdapterRegistry",
    "Registry",
    "RegistryError",
    "SQLiteRegistry",
    "check_name",
    "default_registry_path",
    "open_registry",
    "parse_target",
    "redact",
    "refuse_local_in_cluster",
]


def default_registry_path() -> Path:
    """registry.sqlite in the cold-ray cache folder ($COLD_RAY_CACHE, ~/.cache/cold-ray)."""
    from cold_ray.model.loader import cache_dir

    return cache_dir() / "registry.sqlite"


def default_target() -> str:
    """$COLD_RAY_REGISTRY (a file or a URL), else the default SQLite file."""
    return os.environ.get("COLD_RAY_REGISTRY") or str(default_registry_path())


def redact(url: str) -> str:
    """`url` without its password (in the user part or the query), for messages and logs."""
    url = re.sub(r"(?i)(password=)[^&]*", r"\1***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def parse_target(target: str | Path, *, from_config: bool = False) -> tuple[str, str]:
    """("sqlite", path) or ("postgresql", url); raise RegistryError on anything else.

    `from_config`: the value comes from a config file, which must not hold a password."""
    if isinstance(target, Path):
        return "sqlite", str(target)
    if not isinstance(target, str) or not target.strip():
        raise RegistryError("registry must be a SQLite file path or a postgresql:// URL")
    target = target.strip()
    if "://" not in target:
        return "sqlite", target
    scheme = target.split("://", 1)[0].lower()
    if scheme == "sqlite" and target[9:10] == "/":  # as SQLAlchemy: sqlite:////abs/path
        return "sqlite", target[10:]
    if scheme not in _PG_SCHEMES:
        raise RegistryError(
            f"registry scheme {scheme + '://'!r} is not supported: use a SQLite file path "
            "(one machine) or a postgresql:// URL (a cluster)"
        )
    try:
        parts = urlsplit(target)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as e:
        raise RegistryError(f"invalid registry URL {redact(target)!r}: {e}") from e
    if from_config and (parts.password is not None or "password" in parse_qs(parts.query)):
        raise RegistryError(
            f"the registry URL {redact(target)!r} in the config carries a password; configs "
            f"are not secret: put the password in ${PASSWORD_ENV} (or the variable named by "
            "registry_password_env, or libpq's PGPASSWORD / ~/.pgpass), or the whole URL in "
            "$COLD_RAY_REGISTRY from a secret, and leave it out of the config"
        )
    return "postgresql", target


def open_registry(
    target: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    allowed_roots: Iterable[str] | None = None,
    allowed_schemes: Iterable[str] | None = DEFAULT_SCHEMES,
    password_env: str | None = PASSWORD_ENV,
) -> AdapterRegistry:
    """Open the catalog at `target`: a SQLite file path or a postgresql:// URL (default:
    `default_target()`). Creates or migrates its tables."""
    kind, where = parse_target(target if target is not None else default_target())
    kw = dict(cache_dir=cache_dir, allowed_roots=allowed_roots, allowed_schemes=allowed_schemes)
    if kind == "sqlite":
        return SQLiteRegistry(where, **kw)
    from cold_ray.adapters.registry.postgres import PostgresRegistry

    return PostgresRegistry(where, password_env=password_env, **kw)


def refuse_local_in_cluster(target: str | Path) -> None:
    """Raise RegistryError when `target` is a one-machine catalog (a SQLite file) and this
    process runs in a Ray cluster of several nodes: each node would read its own file, and
    replicas elsewhere would answer 404 for adapters registered here."""
    kind, where = parse_target(target)
    if kind != "sqlite":
        return
    import ray

    if not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise RegistryError(
            f"the registry {where} is a SQLite file, which lives on one machine, but this Ray "
            f"cluster has {len(nodes)} nodes: replicas on the other nodes would read their own "
            "file and answer 404 for adapters registered here. Use PostgreSQL: set `registry: "
            f"postgresql://USER@HOST:5432/DB` (password in ${PASSWORD_ENV}), or "
            "$COLD_RAY_REGISTRY on every node (see the README, 'Clusters: the adapter registry')"
        )
