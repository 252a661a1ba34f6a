"""The cluster registry: the catalog in PostgreSQL, one for every node.

Every write bumps the catalog's generation and sends `NOTIFY cold_ray_registry` in the same
transaction, which PostgreSQL delivers at commit. A process that serves requests keeps one
connection LISTENing; a notification makes it reload the catalog into its snapshot, so a change
reaches every replica one round trip after it commits. A dropped connection is reopened (LISTEN
first, then a reload: nothing is missed in between); against a connection that dies silently,
the watcher also compares the generation every `resync_s` seconds.

Credentials never come from the config: the URL names host, port, database and user, and the
password comes from the environment (`password_env`, default COLD_RAY_REGISTRY_PASSWORD) or
libpq's own PGPASSWORD / ~/.pgpass. The role needs CREATE on its schema the first time, when
the tables are made (and at upgrades, when they are migrated).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from cold_ray.adapters.registry.base import (
    COLUMNS,
    GENERATION,
    AdapterExists,
    AdapterRecord,
    AdapterRegistry,
    NoChange,
    RegistryError,
)
from cold_ray.adapters.sources import DEFAULT_SCHEMES

CHANNEL = "cold_ray_registry"
_MIGRATION_LOCK = 0x636F6C64  # pg_advisory_xact_lock key: one migrator at a time


class PostgresRegistry(AdapterRegistry):
    backend = "postgresql"
    create_table = """CREATE TABLE adapters (
        name TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        path TEXT NOT NULL,
        base_model TEXT NOT NULL,
        rank INTEGER NOT NULL,
        target_modules TEXT NOT NULL,
        nbytes BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        alpha DOUBLE PRECISION,
        beta DOUBLE PRECISION,
        cold_enabled BOOLEAN NOT NULL DEFAULT TRUE,
        created_at DOUBLE PRECISION NOT NULL
    )"""
    mark = "%s"

    def __init__(
        self,
        url: str,
        *,
        password_env: str | None = "COLD_RAY_REGISTRY_PASSWORD",
        cache_dir: str | Path | None = None,
        allowed_roots: Iterable[str] | None = None,
        allowed_schemes: Iterable[str] | None = DEFAULT_SCHEMES,
        pool_size: int = 4,
        resync_s: float = 30.0,
        connect_timeout: int = 10,
    ):
        """`url`: postgresql://user@host:port/dbname (no password; see the module docstring).
        `cache_dir`: this host's copies of remote sources (default: blobs/ in the cold-ray
        cache folder, $COLD_RAY_CACHE)."""
        from cold_ray.adapters.registry import redact

        try:
            import psycopg
            import psycopg_pool
            from psycopg.rows import dict_row
        except ImportError as e:
            raise RegistryError(
                "a postgresql:// registry needs the psycopg driver: pip install 'cold-ray[postgres]'"
            ) from e
        if cache_dir is None:
            from cold_ray.model.loader import cache_dir as cold_ray_cache

            cache_dir = cold_ray_cache() / "blobs"
        super().__init__(cache_dir=cache_dir, allowed_roots=allowed_roots,
                         allowed_schemes=allowed_schemes)  # fmt: skip
        self.target = redact(url)
        self.resync_s = resync_s
        self._psycopg = psycopg
        extra: dict = {}
        password = os.environ.get(password_env) if password_env else None
        if password:
            extra["password"] = password
        try:
            if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(url):
                extra["connect_timeout"] = connect_timeout
            self._conninfo = psycopg.conninfo.make_conninfo(url, **extra)
        except psycopg.ProgrammingError as e:
            raise RegistryError(f"invalid registry URL {self.target}: {e}") from e
        self._migrate()
        self._pool = psycopg_pool.ConnectionPool(
            self._conninfo, min_size=1, max_size=pool_size, timeout=30.0,
            kwargs={"row_factory": dict_row}, name="cold-ray-registry", open=True,
        )  # fmt: skip

    def _connect(self, **kw):
        try:
            return self._psycopg.connect(self._conninfo, **kw)
        except self._psycopg.OperationalError as e:
            raise RegistryError(f"cannot connect to the registry at {self.target}: {e}") from e

    @contextmanager
    def _change(self):
        """A write transaction that moves the generation and notifies every watcher (at
        commit). Taking the generation row first orders all writes: no deadlocks."""
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "UPDATE registry_meta SET value = value + 1 WHERE key = 'generation' "
                "RETURNING value"
            ).fetchone()
            yield conn
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(row["value"])))

    def _close_backend(self) -> None:
        self._pool.close()

    # ---- schema ---------------------------------------------------------------------------

    @contextmanager
    def _schema_tx(self):
        with self._connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            yield conn

    # ---- primitives -----------------------------------------------------------------------

    @staticmethod
    def _select(conn, name: str, lock: bool = False) -> AdapterRecord | None:
        sql = "SELECT * FROM adapters WHERE name = %s" + (" FOR UPDATE" if lock else "")
        row = conn.execute(sql, (name,)).fetchone()
        return None if row is None else AdapterRecord.from_row(row)

    def _read(self, name: str) -> AdapterRecord | None:
        with self._pool.connection() as conn:
            return self._select(conn, name)

    def _read_all(self) -> tuple[int, list[AdapterRecord]]:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            generation = conn.execute(GENERATION).fetchone()["value"]
            rows = conn.execute("SELECT * FROM adapters").fetchall()
        return generation, [AdapterRecord.from_row(r) for r in rows]

    def _put(self, record: AdapterRecord, replace: bool) -> AdapterRecord | None:
        values = ", ".join(f"%({c})s" for c in COLUMNS)
        update = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "name")
        with self._change() as conn:
            old = self._select(conn, record.name, lock=True)
            if old is not None and not replace:
                raise AdapterExists(record.name)
            conn.execute(
                f"INSERT INTO adapters ({', '.join(COLUMNS)}) VALUES ({values}) "
                f"ON CONFLICT (name) DO UPDATE SET {update}",
                record.to_row(),
            )
        return old

    def _delete(self, name: str) -> AdapterRecord | None:
        try:
            with self._change() as conn:
                row = conn.execute("DELETE FROM adapters WHERE name = %s RETURNING *",
                                   (name,)).fetchone()  # fmt: skip
                if row is None:
                    raise NoChange  # roll back: the generation stays
            return AdapterRecord.from_row(row)
        except NoChange:
            return None

    def _tune(self, name: str, alpha, beta, cold_enabled: bool) -> AdapterRecord | None:
        try:
            with self._change() as conn:
                row = conn.execute(
                    "UPDATE adapters SET alpha = %s, beta = %s, cold_enabled = %s "
                    "WHERE name = %s RETURNING *",
                    (alpha, beta, cold_enabled, name),
                ).fetchone()
                if row is None:
                    raise NoChange
            return AdapterRecord.from_row(row)
        except NoChange:
            return None

    def _watch(self) -> None:
        with self._connect(autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.refresh()  # after LISTEN: a change from before is in this read
            checked = time.monotonic()
            while not self._stop.is_set():
                newest = None
                for note in conn.notifies(timeout=0.5, stop_after=1):
                    newest = int(note.payload)
                if newest is not None:
                    if newest > self._snapshot.generation:  # else: already read by a reload
                        self.refresh()
                elif time.monotonic() - checked > self.resync_s:
                    checked = time.monotonic()
                    if conn.execute(GENERATION).fetchone()[0] != self._snapshot.generation:
                        self.refresh()
