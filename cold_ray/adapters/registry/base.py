"""The registry's contract: what a catalog entry is and what every backend does with it.

A backend (SQLite on one machine, PostgreSQL for a cluster) supplies a few primitives — read
one entry, read all with the catalog's *generation*, three writes that each bump the
generation in the same transaction, and its dialect's first table. Everything else lives here,
once: schema migrations, validation before an adapter is listed, local copies of remote
sources, and the in-memory *snapshot* that serves the request path.

The snapshot: `resolver()`, `lookup()` and `listed()` answer from a dict held in memory (one
lookup, never a database call), so an engine's step thread cannot stall on the catalog and a
flood of requests for unknown names costs the catalog nothing. A watcher thread keeps it
current: whenever the generation moves (PostgreSQL: LISTEN/NOTIFY; SQLite: a cheap poll of one
row) it reloads the whole catalog in one consistent read and swaps the dict. A write made
through this object refreshes it at once, so a process reads its own writes. While the
watcher cannot reach the catalog, `feed_up` is False and the snapshot stays as last read.

A catalog that cannot be reached (a connection dropped, a timeout, a locked file) raises
RegistryUnavailable, which the API answers with 503 and Retry-After.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cold_ray.adapters.peft import (
    CONFIG_FILE,
    DEFAULT_MAX_BYTES,
    AdapterError,
    adapter_checksum,
    config_sha256,
    files_checksum,
    load_peft_adapter,
    os_reason,
    weights_sha256,
)
from cold_ray.adapters.sources import (
    DEFAULT_SCHEMES,
    AdapterSource,
    SourcePolicy,
    commit,
    fetch,
)
from cold_ray.decoding import ColdParams
from cold_ray.model.args import ModelArgs

log = logging.getLogger("cold_ray.adapters.registry")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# 1: the first catalog; 2: + warnings; 3: + config_sha256 and the generation counter.
SCHEMA_VERSION = 3
_ANY_SOURCE = SourcePolicy(allowed_schemes=None, allowed_roots=None)  # registered = trusted


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says why."""


class RegistryUnavailable(RegistryError):
    """The catalog cannot be reached now (connection lost, timeout, locked file): retry."""


class AdapterNotFound(RegistryError, KeyError):
    """No adapter of this name is listed. Raised with the name alone (it pickles as it is);
    the message is spelled here, once."""

    def __str__(self) -> str:  # KeyError would quote the argument
        return f"adapter {self.args[0]!r} does not exist"


class AdapterExists(RegistryError):
    """The name is listed already (and the write did not ask to replace it). Raised with the
    name alone, like AdapterNotFound."""

    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} already exists; remove it first"


def check_name(name: object) -> str:
    """Return `name` if it is a valid adapter name, else raise RegistryError saying why."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise RegistryError(
            f"invalid adapter name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "(not '.' or '..')"
        )
    return name


def check_tuning(alpha: float | None, beta: float | None) -> None:
    if alpha is not None or beta is not None:
        try:
            ColdParams(alpha=0.1 if alpha is None else alpha, beta=0.5 if beta is None else beta)
        except ValueError as e:
            raise RegistryError(str(e)) from e


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    source: str  # as registered: a local path or an fsspec URI
    path: str  # the folder the registering host read (for a remote source: its cache copy)
    base_model: str
    rank: int
    target_modules: tuple[str, ...]
    nbytes: int
    sha256: str  # of adapter_model.safetensors
    alpha: float | None  # tuned CoLD defaults; None = the global default
    beta: float | None
    cold_enabled: bool
    created_at: float
    warnings: tuple[str, ...] = ()
    config_sha256: str = ""  # of adapter_config.json; "" in entries older than schema 3

    @property
    def checksum(self) -> str:
        """What a replica verifies before serving: weights and config together."""
        return adapter_checksum(self.sha256, self.config_sha256)

    @property
    def is_remote(self) -> bool:
        return "://" in self.source and not self.source.startswith(("file://", "local://"))

    @property
    def cold(self) -> ColdParams | None:
        """The adapter's tuned CoLD defaults (a missing knob takes the global default)."""
        if self.alpha is None and self.beta is None:
            return None
        d = ColdParams()
        return ColdParams(
            alpha=d.alpha if self.alpha is None else self.alpha,
            beta=d.beta if self.beta is None else self.beta,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["warnings"] = list(self.warnings)
        return d

    def to_row(self) -> dict:
        """The entry as stored: lists as JSON text, the same on every backend."""
        d = self.to_dict()
        d["target_modules"] = json.dumps(d["target_modules"])
        d["warnings"] = json.dumps(d["warnings"])
        return d

    @classmethod
    def from_row(cls, row: Mapping) -> AdapterRecord:
        d = {f.name: row[f.name] for f in fields(cls)}
        d["target_modules"] = tuple(json.loads(d["target_modules"]))
        d["warnings"] = tuple(json.loads(d["warnings"]))
        d["cold_enabled"] = bool(d["cold_enabled"])
        return cls(**d)


COLUMNS = tuple(f.name for f in fields(AdapterRecord))


def _discard(folder: Path) -> None:
    """Remove a cached copy: moved aside first, so no reader finds half of it."""
    aside = folder.with_name(f".stale-{uuid.uuid4().hex}")
    try:
        folder.rename(aside)
    except OSError:  # gone already (another replica on this host got there first)
        return
    shutil.rmtree(aside, ignore_errors=True)


def config_checksums(rows: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Migration to schema 3: (config sha256, name) for each (name, path) whose config can be
    read here; an entry whose files are elsewhere keeps "" and is checked by its weights."""
    out = []
    for name, path in rows:
        try:
            out.append((config_sha256(path), name))
        except OSError:
            log.warning(
                "registry migration: %s has no readable %s at %s; its config is not "
                "checksummed until it is registered again",
                name,
                CONFIG_FILE,
                path,
            )
    return out


# The catalog's bookkeeping, the same SQL in every dialect: its schema version and generation.
META_TABLE = (
    "CREATE TABLE IF NOT EXISTS registry_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)"
)
GENERATION = "SELECT value FROM registry_meta WHERE key = 'generation'"
# The adapters table as schema 1 created it, one definition for every backend: (column, kind,
# constraint); a backend names the SQL type of each kind (`column_types`) and its true.
ADAPTERS_TABLE = (
    ("name", "text", "PRIMARY KEY"),
    ("source", "text", "NOT NULL"),
    ("path", "text", "NOT NULL"),
    ("base_model", "text", "NOT NULL"),
    ("rank", "int", "NOT NULL"),
    ("target_modules", "text", "NOT NULL"),  # a JSON list
    ("nbytes", "bigint", "NOT NULL"),
    ("sha256", "text", "NOT NULL"),
    ("alpha", "float", ""),
    ("beta", "float", ""),
    ("cold_enabled", "bool", "NOT NULL DEFAULT {true}"),
    ("created_at", "float", "NOT NULL"),
)
# Schema steps after the first read the same in every SQL dialect.
ADDED_COLUMNS = {
    2: "ALTER TABLE adapters ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'",
    3: "ALTER TABLE adapters ADD COLUMN config_sha256 TEXT NOT NULL DEFAULT ''",
}


class NoChange(Exception):
    """Raised inside a backend's write transaction to roll it back: there was nothing to change,
    so the generation stays."""


@dataclass(frozen=True)
class Snapshot:
    generation: int
    records: dict[str, AdapterRecord]
    sources: dict[str, AdapterSource]


class AdapterRegistry:
    """The catalog, whatever stores it. Open one with `open_registry(...)`."""

    backend = ""
    target = ""  # where the catalog is, for messages (never carries a password)
    column_types: dict[str, str] = {}  # ADAPTERS_TABLE's kinds -> this dialect's SQL types
    true = "TRUE"  # this dialect's literal for true
    mark = "?"  # the driver's query parameter placeholder
    # The driver's errors that mean "cannot reach the catalog now" (RegistryUnavailable)
    unavailable: tuple[type[Exception], ...] = ()

    def __init__(
        self,
        *,
        cache_dir: str | Path,
        allowed_roots: Iterable[str] | None = None,
        allowed_schemes: Iterable[str] | None = DEFAULT_SCHEMES,
    ):
        """`allowed_roots`: folders and URI prefixes sources must lie under (None = anywhere);
        `allowed_schemes`: URI schemes that may be read (None = any fsspec scheme).
        `cache_dir`: this host's copies of remote sources."""
        self.cache_dir = Path(cache_dir).expanduser()
        self.policy = SourcePolicy(
            allowed_schemes=None if allowed_schemes is None else tuple(allowed_schemes),
            allowed_roots=None if allowed_roots is None else tuple(allowed_roots),
        )
        self._snapshot: Snapshot | None = None
        self._reload_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.feed_up = False  # the watcher reaches the catalog (set by it; True after a load)

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """Turn the driver's "cannot reach the catalog" errors into RegistryUnavailable."""
        try:
            yield
        except self.unavailable as e:
            raise RegistryUnavailable(
                f"the adapter registry {self.target} is unavailable: {e}"
            ) from e

    # ---- backend primitives ---------------------------------------------------------------

    def _read(self, name: str) -> AdapterRecord | None:
        raise NotImplementedError

    def _read_all(self) -> tuple[int, list[AdapterRecord]]:
        """(generation, every entry) from one consistent read."""
        raise NotImplementedError

    def _put(self, record: AdapterRecord, replace: bool) -> AdapterRecord | None:
        """Insert or (if `replace`) overwrite; return the entry replaced. One transaction that
        also bumps the generation; raise AdapterExists if the name exists and not `replace`."""
        raise NotImplementedError

    def _delete(self, name: str) -> AdapterRecord | None:
        raise NotImplementedError

    def _tune(self, name: str, alpha, beta, cold_enabled: bool) -> AdapterRecord | None:
        raise NotImplementedError

    def _watch(self) -> None:
        """Run in the watcher thread until `self._stop` is set: call `refresh()` whenever the
        generation may have moved."""
        raise NotImplementedError

    def _close_backend(self) -> None:
        pass

    def create_table(self) -> str:
        """Schema 1's CREATE TABLE adapters in this backend's column types."""
        columns = ",\n    ".join(
            f"{name} {self.column_types[kind]} {constraint.format(true=self.true)}".rstrip()
            for name, kind, constraint in ADAPTERS_TABLE
        )
        return f"CREATE TABLE adapters (\n    {columns}\n)"

    def _schema_tx(self):
        """A context manager: a write transaction that holds the catalog's migration lock (one
        migrator at a time); it yields the connection."""
        raise NotImplementedError

    def _stored_version(self, db) -> int:
        row = db.execute("SELECT value FROM registry_meta WHERE key = 'schema_version'").fetchone()
        return 0 if row is None else row[0]

    # ---- schema ---------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Create the tables, or bring an older catalog up to SCHEMA_VERSION, in one
        transaction; refuse a catalog written by a newer cold-ray."""
        mark = self.mark
        with self._schema_tx() as db:
            db.execute(META_TABLE)
            version = self._stored_version(db)
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"registry {self.target} has schema version {version}; this cold-ray reads "
                    f"up to {SCHEMA_VERSION}: upgrade cold-ray"
                )
            steps = {1: self.create_table(), **ADDED_COLUMNS}
            for v in range(version + 1, SCHEMA_VERSION + 1):
                db.execute(steps[v])
                if v == 3:
                    rows = db.execute("SELECT name, path FROM adapters").fetchall()
                    db.cursor().executemany(
                        f"UPDATE adapters SET config_sha256 = {mark} WHERE name = {mark}",
                        config_checksums(rows),
                    )
            db.execute(
                f"INSERT INTO registry_meta VALUES ('schema_version', {mark}) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (SCHEMA_VERSION,),
            )
            db.execute("INSERT INTO registry_meta VALUES ('generation', 0) ON CONFLICT DO NOTHING")

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

        Raises RegistryError (name, policy; AdapterExists: a duplicate) or AdapterError (the
        adapter itself); on any error the catalog is unchanged."""
        check_name(name)
        check_tuning(alpha, beta)
        with self._reaching():
            if not replace and self._read(name) is not None:
                raise AdapterExists(name)
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
            try:  # messages leave the source out: the caller knows it, the server's path not
                is_dir = src.local.is_dir()
            except OSError as e:
                raise AdapterError(f"cannot read the adapter source: {os_reason(e)}") from None
            if not is_dir:
                raise AdapterError("the adapter source is not a directory")
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
            config_sha256=adapter.config_sha256,
        )
        try:
            with self._reaching():
                old = self._put(record, replace)
        except BaseException:
            self._drop_blob(record)
            raise
        if old is not None:
            self._drop_blob(old)
        self._after_write()
        for warning in record.warnings:
            log.warning("adapter %s: %s", name, warning)
        return record

    def get(self, name: str) -> AdapterRecord:
        """The entry as stored now (a database read; the request path uses `resolver()`)."""
        check_name(name)
        with self._reaching():
            record = self._read(name)
        if record is None:
            raise AdapterNotFound(name)
        return record

    def list(self) -> list[AdapterRecord]:
        """Every entry as stored now (a database read; the API lists `listed()`)."""
        with self._reaching():
            return sorted(self._read_all()[1], key=lambda r: r.name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
            return False
        with self._reaching():
            return bool(self._read(name))

    def remove(self, name: str) -> AdapterRecord:
        """Unlist an adapter; every replica refuses it once the change reaches it."""
        check_name(name)
        with self._reaching():
            record = self._delete(name)
        if record is None:
            raise AdapterNotFound(name)
        self._drop_blob(record)
        self._after_write()
        return record

    def set_tuned(
        self, name: str, alpha: float | None, beta: float | None, cold_enabled: bool = True
    ) -> AdapterRecord:
        """Record tuned CoLD defaults (None = the global default) and whether CoLD helps, in
        one transaction: a reader sees the old triple or the new one."""
        check_name(name)
        check_tuning(alpha, beta)
        with self._reaching():
            record = self._tune(name, alpha, beta, bool(cold_enabled))
        if record is None:
            raise AdapterNotFound(name)
        self._after_write()
        return record

    # ---- local copies ---------------------------------------------------------------------

    def local_folder(self, record: AdapterRecord) -> Path:
        """Where this host reads the adapter: the source folder itself, or for a remote source
        this host's cache copy (named by content, so every host derives the same name)."""
        if record.is_remote and record.config_sha256:
            return self.cache_dir / f"{record.sha256}-{record.config_sha256[:12]}"
        return Path(record.path)

    def ensure_local(self, record: AdapterRecord, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
        """The record's local folder; for a remote source, this host's copy, checked against
        the registered checksums (a torn write or a flipped bit on this disk) and fetched
        again from the source when it is missing or does not match. Costs one more read of
        the weights per load (the load hashes what it reads too): a host's copy can no longer
        fail its adapter here for good."""
        folder = self.local_folder(record)
        if not record.is_remote:
            return folder  # a local source: the load reports a missing or changed one
        if folder.exists():
            if self._copy_matches(folder, record):
                return folder
            log.warning(
                "adapter %s: this host's copy does not match the registered checksum; "
                "fetching it again from %s",
                record.name,
                record.source,
            )
            _discard(folder)
        staging, final = fetch(_ANY_SOURCE.parse(record.source), self.cache_dir, max_bytes)
        if final.name != folder.name:
            shutil.rmtree(staging, ignore_errors=True)
            raise AdapterError(
                f"adapter {record.name!r} changed at its source {record.source!r} since "
                "registration (its checksum differs); register it again"
            )
        return commit(staging, folder)

    @staticmethod
    def _copy_matches(folder: Path, record: AdapterRecord) -> bool:
        try:
            if record.config_sha256 and config_sha256(folder) != record.config_sha256:
                return False
            return weights_sha256(folder) == record.sha256
        except OSError:
            return False

    def files_match(self, record: AdapterRecord) -> bool:
        """True when this host's copy of the adapter still has the registered checksum."""
        try:
            return files_checksum(self.local_folder(record)) == record.checksum
        except OSError:
            return False

    def _drop_blob(self, record: AdapterRecord) -> None:
        """Delete this host's cached copy of a remote adapter once no entry refers to it."""
        folder = self.local_folder(record)
        if folder.parent != self.cache_dir or not folder.exists():
            return  # a local source: never ours to delete
        try:
            records = self._read_all()[1]
        except self.unavailable:
            return  # cannot tell whether another entry uses it: keep it
        if all(self.local_folder(r) != folder for r in records):
            shutil.rmtree(folder, ignore_errors=True)

    def _sweep_blobs(self, old: Iterable[AdapterRecord], new: Iterable[AdapterRecord]) -> None:
        """Drop this host's cached copies that the catalog referred to and no longer does
        (replaced or removed, perhaps on another host). Copies it never listed are left alone:
        another catalog may share the cache folder."""
        gone = {self.local_folder(r) for r in old} - {self.local_folder(r) for r in new}
        for folder in gone:
            if folder.parent == self.cache_dir:
                shutil.rmtree(folder, ignore_errors=True)

    # ---- serving --------------------------------------------------------------------------

    def _source_of(self, record: AdapterRecord) -> AdapterSource:
        prepare = None
        if record.is_remote:
            prepare = lambda: self.ensure_local(record)  # noqa: E731  (runs in the load thread)
        return AdapterSource(
            str(self.local_folder(record)),
            sha256=record.checksum,
            cold=record.cold,
            cold_enabled=record.cold_enabled,
            prepare=prepare,
        )

    def refresh(self) -> bool:
        """Reload the snapshot now if the catalog's generation moved (a database read: never
        call it on an engine's step thread); True if it did."""
        with self._reload_lock, self._reaching():
            generation, records = self._read_all()
            old = self._snapshot
            if old is not None and old.generation == generation:
                return False
            by_name = {r.name: r for r in records}
            self._snapshot = Snapshot(
                generation, by_name, {n: self._source_of(r) for n, r in by_name.items()}
            )
        if old is not None:
            self._sweep_blobs(old.records.values(), records)
        return True

    def _after_write(self) -> None:
        if self._snapshot is not None:  # read your own writes
            try:
                self.refresh()
            except RegistryUnavailable as e:  # committed all the same: the watcher catches up
                log.warning("registry %s: reload after a write failed: %s", self.target, e)

    def snapshot(self) -> Snapshot:
        """The in-memory catalog, loaded (and its watcher started) on first use."""
        with self._start_lock:
            if self._snapshot is None:
                self.refresh()
                self.feed_up = True  # just read; the watcher says when it cannot reach it
            if self._watcher is None and not self._stop.is_set():
                self._watcher = threading.Thread(
                    target=self._watch_forever, daemon=True, name=f"registry-watch-{self.backend}"
                )
                self._watcher.start()
        return self._snapshot

    def _watch_forever(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._watch()
                return
            except Exception as e:  # the catalog is unreachable: keep serving the snapshot
                self.feed_up = False
                log.warning(
                    "registry %s: change feed failed (%s); serving the last snapshot, "
                    "retrying in %.1fs",
                    self.target,
                    e,
                    delay,
                )
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 10.0)

    def lookup(self, name: str) -> AdapterRecord:
        """The entry from the in-memory snapshot (no database call once it is loaded).

        A name it lacks raises AdapterNotFound while the change feed is up, else
        RegistryUnavailable: the snapshot cannot say whether the name was added since. How
        stale the snapshot may be is the backend's watcher's bound (see its module)."""
        record = self.snapshot().records.get(name) if isinstance(name, str) else None
        if record is None:
            if not self.feed_up:
                raise RegistryUnavailable(
                    f"the adapter registry {self.target} cannot be reached to look up {name!r}"
                )
            raise AdapterNotFound(name)
        return record

    def listed(self) -> list[AdapterRecord]:
        """Every entry of the in-memory snapshot, by name (no database call once loaded)."""
        return sorted(self.snapshot().records.values(), key=lambda r: r.name)

    def resolver(self) -> Callable[[str], AdapterSource]:
        """An `EngineCore` resolver: one dict lookup in the snapshot, never a database call.
        A replaced or removed adapter is seen once the change reaches this process (see the
        backend's watcher for the bound)."""
        self.snapshot()

        def resolve(name: str) -> AdapterSource:
            source = self._snapshot.sources.get(name) if isinstance(name, str) else None
            if source is None:
                raise AdapterNotFound(name)
            return source

        return resolve

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(10)
        self._close_backend()

    def __enter__(self) -> AdapterRegistry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
