"""A throwaway PostgreSQL server started from the installed binaries (initdb, pg_ctl) in a
temp folder on a free port, removed by `stop()`; and the fixtures that hand it to tests, one
server per test session, stopped at the end. Never a mock. Without the binaries or the driver,
the tests that need a server skip and say why. tests/conftest.py loads this module as a
plugin, so every test file can ask for these fixtures by name.

    with PostgresServer() as pg:        # or .start() ... .stop()
        url = pg.url(pg.create_database())   # the password is PASSWORD, given apart

PostgreSQL refuses to run as root: as root the server runs as the `postgres` user in a folder
it owns. TCP logins need a password (scram-sha-256), so a client must take it from somewhere
other than the URL, as the registry does in production. Settings favour speed over
durability (fsync off): never keep data in it.

`python -m tests.postgres` starts one for `cold-ray bench serving --scenario registry
--registry URL`, prints the URL and the password's environment line, and stops it on Ctrl-C.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.serve_util import free_port

__all__ = ["PASSWORD", "PostgresServer", "pg_server", "pg_url", "registry_target", "unavailable"]

USER = "cold"
PASSWORD = "test-only-" + uuid.uuid4().hex[:12]


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def unavailable() -> str | None:
    """Why no server can be started here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'cold-ray[postgres]')"
    for name in ("initdb", "pg_ctl", "postgres"):
        if _binary(name) is None:
            return f"no PostgreSQL `{name}` binary on PATH or in /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
    return None


class PostgresServer:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="cold-ray-pg-"))
        self.port = free_port()
        self.data = self.root / "data"
        self._as = None
        if os.geteuid() == 0:  # the server refuses root: hand it a folder of its own
            self._as = "postgres"
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.started = False

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        # user=: drop to the postgres user as root; cwd: a folder it may read
        return subprocess.run(
            argv,
            user=self._as,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def start(self) -> PostgresServer:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._as:
            shutil.chown(pwfile, self._as)
        try:
            self._run(
                _binary("initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--pwfile",
                str(pwfile),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            )
            options = (
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=300"
            )
            self._run(
                _binary("pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.root / "log"),
                "-w",
                "-t",
                "60",
                "start",
            )
        except subprocess.CalledProcessError as e:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start: {e.stderr}\n{log}") from e
        self.started = True
        return self

    def url(self, dbname: str = "postgres") -> str:
        """The URL a config would hold: no password (it comes from the environment)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), password=PASSWORD, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def stop(self) -> None:
        if self.data.exists() and (self.data / "postmaster.pid").exists():
            try:
                self._run(
                    _binary("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                    timeout=60,
                )
            except subprocess.CalledProcessError:
                pass
        self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- fixtures -----------------------------------------------------------------------------------


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


if __name__ == "__main__":
    import signal
    import sys

    if why := unavailable():
        sys.exit(f"error: {why}")
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # sigwait takes them; stop() still runs
    with PostgresServer() as server:
        print(server.url(server.create_database()))
        print(f"export COLD_RAY_REGISTRY_PASSWORD={PASSWORD}", flush=True)
        signal.sigwait(signals)
