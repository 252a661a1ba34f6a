"""Fixtures for a real PostgreSQL server started from the installed binaries (see
`benchmarks.pgserver`), one per test session, stopped at the end. Never a mock. Without the
binaries or the driver, the tests that need a server skip and say why. tests/conftest.py
loads this module as a plugin, so every test file can ask for these fixtures by name.
"""

from __future__ import annotations

import pytest

from cold_ray.benchmarks.pgserver import PASSWORD, PostgresServer, unavailable

__all__ = ["PASSWORD", "pg_server", "pg_url", "registry_target"]


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


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_target(request, tmp_path):
    """Where a registry's catalog lives, once per backend: a SQLite file, or a fresh database
    on the real server."""
    if request.param == "sqlite":
        return str(tmp_path / "reg" / "registry.sqlite")
    return request.getfixturevalue("pg_url")
