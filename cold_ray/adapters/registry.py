"""The adapter registry: a durable catalog of LoRA adapters shared by every replica.

    reg = Registry("/shared/cold-ray/registry.sqlite", allowed_roots=("/shared/adapters",))
    reg.add("math", "/shared/adapters/math", args=engine.args, max_rank=16)
    engine = EngineCore(config, resolver=reg.resolver())

SQLite in WAL mode with a busy timeout: several processes (replicas, the CLI, the admin API)
may read and write one file at once. Keep it on a local or shared block filesystem — SQLite's
locking is unreliable on NFS. An adapter is validated against the base model *before* it is
listed, so a listed adapter was loadable when it was added; its weights' sha256 is recorded and
checked again by every load, so a file changed behind the registry's back is reported.

Adapter names are catalog keys only (`[A-Za-z0-9._-]{1,64}`), never used to build a path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from cold_ray.adapters.peft import DEFAULT_MAX_BYTES, WEIGHTS_FILE, AdapterError, load_peft_adapter
from cold_ray.adapters.sources import (
    DEFAULT_SCHEMES,
    AdapterSource,
    SourcePolicy,
    commit,
    fetch,
)
from cold_ray.decoding import ColdParams
from cold_ray.model.config import ModelArgs

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,          -- as registered: a local path or an fsspec URI
    path TEXT NOT NULL,            -- the local folder replicas read (a cache copy if remote)
    base_model TEXT NOT NULL,
    rank INTEGER NOT NULL,
    target_modules TEXT NOT NULL,  -- JSON list
    nbytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,          -- of adapter_model.safetensors
    alpha REAL,                    -- tuned CoLD defaults; NULL = the global default
    beta REAL,
    cold_enabled INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    warnings TEXT NOT NULL DEFAULT '[]'  -- JSON list: notes from validation (foreign base)
)
"""


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says why."""


class AdapterNotFound(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def default_registry_path() -> Path:
    """$COLD_RAY_REGISTRY, else registry.sqlite in the cold-ray cache folder."""
    from cold_ray.model.loader import cache_dir

    return Path(os.environ.get("COLD_RAY_REGISTRY") or cache_dir() / "registry.sqlite")


def check_name(name: object) -> str:
    """Return `name` if it is a valid adapter name, else raise RegistryError saying why."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise RegistryError(
            f"invalid adapter name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "(not '.' or '..')"
        )
    return name


def _check_tuning(alpha: float | None, beta: float | None) -> None:
    if alpha is not None or beta is not None:
        try:
            ColdParams(alpha=0.1 if alpha is None else alpha, beta=0.5 if beta is None else beta)
        except ValueError as e:
            raise RegistryError(str(e)) from e


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    source: str
    path: str
    base_model: str
    rank: int
    target_modules: tuple[str, ...]
    nbytes: int
    sha256: str
    alpha: float | None
    beta: float | None
    cold_enabled: bool
    created_at: float
    warnings: tuple[str, ...] = ()

    @property
    def cold(self) -> ColdParams | None:
        """The adapter's tuned CoLD defaults (a missing knob takes the global default)."""
        if self.alpha is None and self.beta is None:
            return None
        d = ColdParams()
        return ColdParams(alpha=d.alpha if self.alpha is None else self.alpha,
                          beta=d.beta if self.beta is None else self.beta)  # fmt: skip

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> AdapterRecord:
        d = dict(row)
        d["target_modules"] = tuple(json.loads(d["target_modules"]))
        d["warnings"] = tuple(json.loads(d["warnings"]))
        d["cold_enabled"] = bool(d["cold_enabled"])
        return cls(**d)


class Registry:
    def __init__(
        self,
        path: str | Path,
        *,
        cache_dir: str | Path | None = None,
        allowed_roots: Iterable[str] | None = None,
        allowed_schemes: Iterable[str] | None = DEFAULT_SCHEMES,
        timeout: float = 30.0,
    ):
        """`allowed_roots`: folders and URI prefixes sources must lie under (None = anywhere);
        `allowed_schemes`: URI schemes that may be read (None = any fsspec scheme).
        `cache_dir` holds local copies of remote sources (default: `blobs/` beside the file)."""
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(cache_dir) if cache_dir else self.path.parent / "blobs"
        self.policy = SourcePolicy(
            allowed_schemes=None if allowed_schemes is None else tuple(allowed_schemes),
            allowed_roots=None if allowed_roots is None else tuple(allowed_roots),
        )
        self.timeout = timeout
        self._local = threading.local()
        with self._write() as db:
            db.execute(_SCHEMA)
            columns = {r["name"] for r in db.execute("PRAGMA table_info(adapters)")}
            if "warnings" not in columns:  # a catalog written before validation notes
                db.execute("ALTER TABLE adapters ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'")

    # ---- connection -----------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """One connection per thread and process (sqlite3 connections are neither)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
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
        return conn

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _write(self) -> _Tx:
        return self._Tx(self._db())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- catalog --------------------------------------------------------------------------

    def add(
        self,
        name: str,
        source: str | Path,
        *,
        args: ModelArgs,
        max_rank: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        alpha: float | None = None,
        beta: float | None = None,
        cold_enabled: bool = True,
        replace: bool = False,
    ) -> AdapterRecord:
        """Validate the adapter at `source` against `args`, then list it under `name`.

        Raises RegistryError (name, duplicate, policy) or AdapterError (the adapter itself);
        on any error the catalog is unchanged."""
        check_name(name)
        _check_tuning(alpha, beta)
        if not replace and self._row(name) is not None:
            raise RegistryError(f"adapter {name!r} already exists; remove it first")
        src = self.policy.parse(str(source))
        if src.is_remote:
            staging, final = fetch(src, self.cache_dir, max_bytes)
            try:
                adapter = load_peft_adapter(staging, args, max_rank, max_bytes)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            folder = commit(staging, final)
        else:
            if not src.local.is_dir():
                raise AdapterError(f"adapter path {src.uri!r} is not a directory")
            self.policy.check_files(src.local)
            adapter = load_peft_adapter(src.local, args, max_rank, max_bytes)
            folder = src.local
        record = AdapterRecord(
            name=name,
            source=src.uri,
            path=str(folder),
            base_model=adapter.base_model or args.name,
            rank=adapter.rank,
            target_modules=adapter.target_modules,
            nbytes=adapter.nbytes,
            sha256=adapter.sha256,
            alpha=alpha,
            beta=beta,
            cold_enabled=bool(cold_enabled),
            created_at=time.time(),
            warnings=adapter.warnings,
        )
        row = record.to_dict()
        row["target_modules"] = json.dumps(row["target_modules"])
        row["warnings"] = json.dumps(row["warnings"])
        row["cold_enabled"] = int(record.cold_enabled)
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        old = None
        try:
            with self._write() as db:
                old = self._row(name)
                if old is not None and not replace:
                    raise RegistryError(f"adapter {name!r} already exists; remove it first")
                db.execute(f"INSERT OR REPLACE INTO adapters ({cols}) VALUES ({marks})", row)
        except BaseException:
            self._drop_blob(record.path)
            raise
        if old is not None:
            self._drop_blob(old.path)
        for warning in record.warnings:
            log.warning("adapter %s: %s", name, warning)
        return record

    def _row(self, name: str) -> AdapterRecord | None:
        row = self._db().execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        return None if row is None else AdapterRecord._from_row(row)

    def get(self, name: str) -> AdapterRecord:
        check_name(name)
        record = self._row(name)
        if record is None:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return record

    def list(self) -> list[AdapterRecord]:
        rows = self._db().execute("SELECT * FROM adapters ORDER BY name").fetchall()
        return [AdapterRecord._from_row(r) for r in rows]

    def __contains__(self, name: str) -> bool:
        return (
            isinstance(name, str) and NAME_RE.fullmatch(name) is not None and bool(self._row(name))
        )

    def remove(self, name: str) -> AdapterRecord:
        """Unlist an adapter (replicas stop serving it within the resolver's TTL)."""
        check_name(name)
        with self._write() as db:
            record = self._row(name)
            if record is None:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
            db.execute("DELETE FROM adapters WHERE name = ?", (name,))
        self._drop_blob(record.path)
        return record

    def set_tuned(
        self, name: str, alpha: float | None, beta: float | None, cold_enabled: bool = True
    ) -> AdapterRecord:
        """Record tuned CoLD defaults (None = the global default) and whether CoLD helps."""
        check_name(name)
        _check_tuning(alpha, beta)
        with self._write() as db:
            cur = db.execute(
                "UPDATE adapters SET alpha = ?, beta = ?, cold_enabled = ? WHERE name = ?",
                (alpha, beta, int(bool(cold_enabled)), name),
            )
            if cur.rowcount == 0:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
            return self._row(name)

    def _drop_blob(self, path: str) -> None:
        """Delete a cached copy of a remote adapter once no record refers to it."""
        folder = Path(path)
        if folder.parent != self.cache_dir or not folder.exists():
            return  # a local source: never ours to delete
        (n,) = (
            self._db().execute("SELECT COUNT(*) FROM adapters WHERE path = ?", (path,)).fetchone()
        )
        if n == 0:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- serving --------------------------------------------------------------------------

    def ensure_local(self, record: AdapterRecord, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
        """The record's local folder, fetched again from its source if this host lacks it."""
        folder = Path(record.path)
        if (folder / WEIGHTS_FILE).exists():
            return folder
        src = self.policy.parse(record.source)
        if not src.is_remote:
            return folder  # a missing local source: the load reports it
        staging, final = fetch(src, self.cache_dir, max_bytes)
        if final != folder:
            shutil.rmtree(staging, ignore_errors=True)
            raise AdapterError(
                f"adapter {record.name!r} changed at its source {record.source!r} since "
                "registration (sha256 differs); register it again"
            )
        return commit(staging, final)

    def source(self, name: str) -> AdapterSource:
        """What an engine needs to load `name`; raises AdapterNotFound (a KeyError)."""
        try:
            record = self.get(name)
        except RegistryError as e:
            raise AdapterNotFound(f"adapter {name!r} does not exist") from e
        prepare = None
        if Path(record.path).parent == self.cache_dir:
            prepare = lambda: self.ensure_local(record)  # noqa: E731  (runs in the load thread)
        return AdapterSource(record.path, sha256=record.sha256, cold=record.cold,
                             cold_enabled=record.cold_enabled, prepare=prepare)  # fmt: skip

    def resolver(self, ttl: float = 1.0) -> Callable[[str], AdapterSource]:
        """An `EngineCore` resolver; answers are cached for `ttl` seconds, so a removed or
        replaced adapter is noticed by every replica within `ttl`."""
        cache: dict[str, tuple[float, AdapterSource]] = {}
        lock = threading.Lock()

        def resolve(name: str) -> AdapterSource:
            now = time.monotonic()
            with lock:
                hit = cache.get(name)
            if hit is None or now - hit[0] > ttl:
                try:
                    hit = (now, self.source(name))
                except AdapterNotFound:  # not cached: a new adapter is served at once
                    with lock:
                        cache.pop(name, None)
                    raise
                with lock:
                    if len(cache) > 4096:
                        cache.clear()
                    cache[name] = hit
            return hit[1]

        return resolve
