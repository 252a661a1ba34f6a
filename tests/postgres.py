"""Fixtures for a real PostgreSQL server started from the installed binaries (see
`benchmarks.pgserver`), one per test session, stopped at the end. Never a mock. Without the
binaries or the driver, the tests that need a server skip and say why.

    from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import pytest

from cold_ray.benchmarks.pgserver import PASSWORD, PostgresServer, unavailable

__all__ = ["PASSWORD", "pg_server", "pg_url"]


@pytest.fixture(scope="session")
def pg_server():
    why = unavailable()
    if why is not None:
        print(f"\nPostgreSQL tests skipped: {why}")
        pytest.skip(f"PostgreSQL unavailable: {why}")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server, monkeypatch):
    """A fresh database's URL; the password is in the environment, as in production."""
    monkeypatch.setenv("COLD_RAY_REGISTRY_PASSWORD", PASSWORD)
    return pg_server.url(pg_server.create_database())
