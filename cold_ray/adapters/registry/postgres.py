"""The cluster registry: the catalog in PostgreSQL, one for every node.

Every write bumps the catalog's generation and sends `NOTIFY cold_ray_registry` in the same
transaction, which PostgreSQL delivers at commit. A process that serves requests keeps one
connection LISTENing; a notification makes it reload the catalog into its snapshot, so a change
reaches every replica one round trip after it commits. A dropped connection is reopened (LISTEN
first, then a reload: nothing is missed in between); against a connection that dies silently,
the watcher also compares the generation every `resync_s` seconds.

How stale a snapshot can be: one round trip after commit while the feed is up. A connection
that goes silent (a partition, a peer that vanished) is noticed by TCP keepalives within
KEEPALIVE_S when idle and by `tcp_user_timeout` within USER_TIMEOUT_S when data is
unacknowledged, and any statement on the server ends after `statement_timeout_s`; the watcher
then reconnects with backoff (0.5 s doubling to 10 s) and reloads. So a deletion is missed at
most ~KEEPALIVE_S plus the reconnect while the catalog is reachable again, instead of until
TCP gives up (15 min on Linux); while it cannot be reached, the snapshot is served as last
read, the feed counts as down, and unknown names get 503 rather than 404.

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
# libpq TCP settings (defaults for every connection; the URL may set its own): probe an idle
# connection after 10 s, every 5 s, 3 times; drop one whose sent data stays unacknowledged.
_TCP = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
KEEPALIVE_S = 10 + 5 * 3
USER_TIMEOUT_S = 30


class PostgresRegistry(AdapterRegistry):
    backend = "postgresql"
    column_types = {
        "text": "TEXT",
        "int": "INTEGER",
        "bigint": "BIGINT",
        "float": "DOUBLE PRECISION",
        "bool": "BOOLEAN",
    }
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
        statement_timeout_s: float = 10.0,
        pool_timeout_s: float = 5.0,
    ):
        """`url`: postgresql://user@host:port/dbname (no password; see the module docstring).
        `cache_dir`: this host's copies of remote sources (default: blobs/ in the cold-ray
        cache folder, $COLD_RAY_CACHE). `statement_timeout_s`: the longest a statement of the
        pool or the watcher may run (or wait for a lock); `pool_timeout_s`: the longest a call
        waits for a pooled connection (while the server is down, for example) before it fails
        as RegistryUnavailable."""
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
        super().__init__(
            cache_dir=cache_dir, allowed_roots=allowed_roots, allowed_schemes=allowed_schemes
        )
        self.target = redact(url)
        self.resync_s = resync_s
        self.unavailable = (psycopg.OperationalError,)  # also PoolTimeout, QueryCanceled
        self._psycopg = psycopg
        password = os.environ.get(password_env) if password_env else None
        try:
            given = psycopg.conninfo.conninfo_to_dict(url)
            extra = {k: v for k, v in _TCP.items() if k not in given}
            if "connect_timeout" not in given:
                extra["connect_timeout"] = connect_timeout
            if password:
                extra["password"] = password
            self._conninfo = psycopg.conninfo.make_conninfo(url, **extra)
            # Serving connections (pool, watcher) bound each statement; migrations may wait
            # for another replica's migration as long as it takes.
            timeout = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
            options = f"{given['options']} {timeout}" if given.get("options") else timeout
            self._serving_conninfo = psycopg.conninfo.make_conninfo(self._conninfo, options=options)
        except psycopg.ProgrammingError as e:
            raise RegistryError(f"invalid registry URL {self.target}: {e}") from e
        self._migrate()
        self._pool = psycopg_pool.ConnectionPool(
            self._serving_conninfo,
            min_size=1,
            max_size=pool_size,
            timeout=pool_timeout_s,
            kwargs={"row_factory": dict_row},
            name="cold-ray-registry",
            open=True,
            check=psycopg_pool.ConnectionPool.check_connection,  # a dead one is replaced first
        )

    def _connect(self, serving: bool = False, **kw):
        conninfo = self._serving_conninfo if serving else self._conninfo
        try:
            return self._psycopg.connect(conninfo, **kw)
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
                row = conn.execute(
                    "DELETE FROM adapters WHERE name = %s RETURNING *", (name,)
                ).fetchone()
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
        with self._connect(serving=True, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.refresh()  # after LISTEN: a change from before is in this read
            self.feed_up = True
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
