"""The embedded registry: one SQLite file, for one machine.

WAL mode with a busy timeout lets several processes on that machine (replicas, the CLI, the
admin API) read and write the file at once. WAL needs shared memory on one host, so the file
must not be shared between machines (nor put on NFS); clusters use PostgreSQL. Replicas notice
changes by polling one row, the catalog's generation, every `poll_s` seconds: that is how stale
a replica's snapshot can be.
"""

from __future__ import annotations

import os
import sqlite3
import threading
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
)
from cold_ray.adapters.sources import DEFAULT_SCHEMES


class SQLiteRegistry(AdapterRegistry):
    backend = "sqlite"
    unavailable = (sqlite3.OperationalError,)  # e.g. locked past the busy timeout, disk I/O
    column_types = {
        "text": "TEXT",
        "int": "INTEGER",
        "bigint": "INTEGER",
        "float": "REAL",
        "bool": "INTEGER",
    }
    true = "1"

    def __init__(
        self,
        path: str | Path,
        *,
        cache_dir: str | Path | None = None,
        allowed_roots: Iterable[str] | None = None,
        allowed_schemes: Iterable[str] | None = DEFAULT_SCHEMES,
        timeout: float = 30.0,
        poll_s: float = 0.25,
    ):
        """`cache_dir` holds local copies of remote sources (default: `blobs/` beside the file);
        `poll_s`: how often a replica's watcher checks for changes."""
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(
            cache_dir=cache_dir or self.path.parent / "blobs",
            allowed_roots=allowed_roots,
            allowed_schemes=allowed_schemes,
        )
        self.target = str(self.path)
        self.timeout = timeout
        self.poll_s = poll_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._migrate()

    # ---- connection -----------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """One connection per thread and process (sqlite3 connections are neither)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            for _ in range(50):  # switching to WAL needs a moment of exclusive access
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError:
                    time.sleep(0.1)
            conn.execute("PRAGMA synchronous = NORMAL")  # durable in WAL mode at commit
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _tx(self, write: bool):
        """A transaction: IMMEDIATE takes the write lock at once (no upgrade deadlock); a
        deferred one gives its reads one consistent snapshot."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def _change(self):
        """A write transaction that moves the catalog's generation."""
        with self._tx(write=True) as db:
            db.execute("UPDATE registry_meta SET value = value + 1 WHERE key = 'generation'")
            yield db

    def _close_backend(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    # ---- schema ---------------------------------------------------------------------------

    def _schema_tx(self):
        return self._tx(write=True)  # IMMEDIATE: the file's write lock, one migrator at a time

    def _stored_version(self, db: sqlite3.Connection) -> int:
        version = super()._stored_version(db)
        if version == 0:  # none recorded: a catalog from before versions, told by its columns
            columns = {r["name"] for r in db.execute("PRAGMA table_info(adapters)")}
            version = 0 if not columns else 2 if "warnings" in columns else 1
        return version

    # ---- primitives -----------------------------------------------------------------------

    def _select(self, db: sqlite3.Connection, name: str) -> AdapterRecord | None:
        row = db.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        return None if row is None else AdapterRecord.from_row(row)

    def _read(self, name: str) -> AdapterRecord | None:
        return self._select(self._db(), name)

    def _read_all(self) -> tuple[int, list[AdapterRecord]]:
        with self._tx(write=False) as db:
            (generation,) = db.execute(GENERATION).fetchone()
            rows = db.execute("SELECT * FROM adapters").fetchall()
        return generation, [AdapterRecord.from_row(r) for r in rows]

    def _put(self, record: AdapterRecord, replace: bool) -> AdapterRecord | None:
        row = record.to_row()
        row["cold_enabled"] = int(record.cold_enabled)
        marks = ", ".join(f":{c}" for c in COLUMNS)
        with self._change() as db:
            old = self._select(db, record.name)
            if old is not None and not replace:
                raise AdapterExists(record.name)
            db.execute(
                f"INSERT OR REPLACE INTO adapters ({', '.join(COLUMNS)}) VALUES ({marks})", row
            )
        return old

    def _delete(self, name: str) -> AdapterRecord | None:
        try:
            with self._change() as db:
                old = self._select(db, name)
                if old is None:
                    raise NoChange  # roll back: the generation stays
                db.execute("DELETE FROM adapters WHERE name = ?", (name,))
            return old
        except NoChange:
            return None

    def _tune(self, name: str, alpha, beta, cold_enabled: bool) -> AdapterRecord | None:
        try:
            with self._change() as db:
                cur = db.execute(
                    "UPDATE adapters SET alpha = ?, beta = ?, cold_enabled = ? WHERE name = ?",
                    (alpha, beta, int(cold_enabled), name),
                )
                if cur.rowcount == 0:
                    raise NoChange
                return self._select(db, name)
        except NoChange:
            return None

    def _watch(self) -> None:
        db = self._db()  # this thread's own connection
        while not self._stop.wait(self.poll_s):
            (generation,) = db.execute(GENERATION).fetchone()
            self.feed_up = True
            if generation != self._snapshot.generation:
                self.refresh()
