"""Where adapter files come from: local paths and fsspec URIs, behind an allow-list.

A source is a local folder (`/data/adapters/x`, `file:///data/adapters/x`) or a remote fsspec
URI (`s3://bucket/adapters/x`, `memory://...` in tests). Local folders are read in place;
remote ones are copied into a local cache folder named by content (the weights' sha256), so
every replica reads the same bytes and a second fetch of the same adapter is free.

`SourcePolicy` decides what a registry call may read at all: an admin API must not become a
way to probe or read arbitrary files on the server, so the serving layer passes
`allowed_roots` (folders and URI prefixes) and `allowed_schemes`. Its messages quote a source
as the caller wrote it, never as resolved on the server: `/proc/self/cwd/x` or a symlink must
not tell a client the working directory or where the link leads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cold_ray.adapters.peft import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE, AdapterError, os_reason
from cold_ray.decoding import ColdParams

LOCAL_SCHEMES = ("file", "local")
# http(s) is left out on purpose (a fetch from the server is an SSRF vector); add it explicitly.
DEFAULT_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter's files are, and what the registry knows about them: what an engine
    needs to load and serve it."""

    path: str
    sha256: str | None = None
    cold: ColdParams | None = None  # the adapter's tuned default (None: global default)
    cold_enabled: bool = True  # False: tuning found CoLD does not help this adapter
    # Run in the load thread before `path` is read (e.g. fetch a remote source into the cache).
    prepare: Callable[[], object] | None = field(default=None, compare=False, repr=False)


AdapterResolver = Callable[[str], AdapterSource]


class SourceError(AdapterError):
    """A source the registry may not or cannot read."""


@dataclass(frozen=True)
class Source:
    uri: str  # as given (normalised), what the registry stores
    scheme: str
    local: Path | None  # set for local sources (resolved, symlinks followed)

    @property
    def is_remote(self) -> bool:
        return self.local is None


def _split(source: str) -> tuple[str, str]:
    if "::" in source:  # fsspec URL chaining can wrap local files (zip://...::file://...)
        raise SourceError(f"chained fsspec URLs are not allowed: {source!r}")
    if "://" not in source:
        return "file", source
    scheme, rest = source.split("://", 1)
    return scheme.lower(), rest


@dataclass(frozen=True)
class SourcePolicy:
    """What sources may be read. None = no restriction (local CLI use)."""

    allowed_schemes: tuple[str, ...] | None = DEFAULT_SCHEMES
    allowed_roots: tuple[str, ...] | None = None  # local folders and/or URI prefixes

    def parse(self, source: str) -> Source:
        """Check `source` against the policy; return it normalised or raise SourceError."""
        if not isinstance(source, str) or not source.strip():
            raise SourceError("adapter source must be a non-empty path or URI")
        source = source.strip()
        if any(c in source for c in "\x00\n\r"):
            raise SourceError("adapter source contains control characters")
        scheme, rest = _split(source)
        if self.allowed_schemes is not None:
            allowed = set(self.allowed_schemes)
            if scheme in LOCAL_SCHEMES and allowed & set(LOCAL_SCHEMES):
                pass
            elif scheme not in allowed:
                raise SourceError(
                    f"source scheme {scheme + '://'!r} is not allowed; allowed: "
                    f"{', '.join(s + '://' for s in sorted(allowed))}"
                )
        if scheme in LOCAL_SCHEMES:
            local = Path(rest).expanduser()
            if not local.is_absolute():
                local = Path.cwd() / local
            local = local.resolve()  # follow symlinks before the root check
            src = Source(str(local), "file", local)
        else:
            parts = urlsplit(source)
            if parts.query or parts.fragment:
                raise SourceError(f"source URI must not carry a query or fragment: {source!r}")
            segments = [s for s in rest.split("/") if s]
            if not segments or any(s in (".", "..") for s in segments):
                raise SourceError(f"source URI must name a folder without '.'/'..': {source!r}")
            src = Source(f"{scheme}://{'/'.join(segments)}", scheme, None)
        if not self._under_root(src):
            raise SourceError(f"source {source!r} is outside the allowed adapter roots")
        return src

    def _under_root(self, src: Source) -> bool:
        if self.allowed_roots is None:
            return True
        for root in self.allowed_roots:
            r_scheme, r_rest = _split(root)
            if src.local is not None and r_scheme in LOCAL_SCHEMES:
                base = Path(r_rest).expanduser().resolve()
                if src.local == base or src.local.is_relative_to(base):
                    return True
            elif src.local is None and r_scheme == src.scheme:
                prefix = f"{r_scheme}://{r_rest.strip('/')}"
                if src.uri == prefix or src.uri.startswith(prefix + "/"):
                    return True
        return False

    def check_files(self, folder: Path) -> None:
        """The adapter's files, after following symlinks, must stay inside the allowed roots."""
        if self.allowed_roots is None:
            return
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            f = folder / name
            try:
                present = f.is_symlink() or f.exists()
            except OSError as e:
                raise AdapterError(f"cannot read {name}: {os_reason(e)}") from None
            resolved = f.resolve()
            if present and not self._under_root(Source(str(resolved), "file", resolved)):
                raise SourceError(f"{name} leads outside the allowed adapter roots")


def _copy(fs, src: str, dst: Path, max_bytes: int) -> str:
    """Stream one remote file to `dst`, refusing more than `max_bytes`; return its sha256."""
    h, n = hashlib.sha256(), 0
    with fs.open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            n += len(chunk)
            if n > max_bytes:
                raise AdapterError(f"adapter file {src!r} is over the limit of {max_bytes} bytes")
            h.update(chunk)
            fout.write(chunk)
    return h.hexdigest()


def cache_key(weights_sha256: str, config_bytes: bytes) -> str:
    """Cache folder name: the weights' sha256 plus a short hash of the config beside it."""
    return f"{weights_sha256}-{hashlib.sha256(config_bytes).hexdigest()[:12]}"


def fetch(src: Source, cache_dir: Path, max_bytes: int) -> tuple[Path, Path]:
    """Copy a remote adapter into a fresh staging folder under `cache_dir`.

    Returns (staging folder, final cache folder); the caller validates the staging folder and
    then `commit()`s it, or removes it. Raises AdapterError/SourceError naming the problem.
    """
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(src.uri)
    except (ImportError, ValueError) as e:  # e.g. s3fs not installed: pip install cold-ray[s3]
        raise SourceError(f"cannot open {src.uri!r}: {e}") from e
    try:
        names = {Path(p).name for p in fs.ls(root, detail=False)}
    except FileNotFoundError as e:
        raise SourceError(f"adapter source {src.uri!r} does not exist") from e
    except OSError as e:
        raise SourceError(f"cannot list {src.uri!r}: {e}") from e
    if CONFIG_FILE not in names:
        raise AdapterError(f"adapter {src.uri!r} has no {CONFIG_FILE} (not a PEFT adapter)")
    if WEIGHTS_FILE not in names:
        pickles = [p for p in PICKLE_FILES if p in names]
        if pickles:
            raise AdapterError(
                f"adapter {src.uri!r} ships pickled weights ({pickles[0]}); refusing to load "
                f"them because unpickling runs arbitrary code — convert to {WEIGHTS_FILE}"
            )
        raise AdapterError(f"adapter {src.uri!r} has no {WEIGHTS_FILE}")
    size = fs.size(f"{root}/{WEIGHTS_FILE}")
    if size is not None and size > max_bytes:
        raise AdapterError(f"adapter weights are {size} bytes, over the limit of {max_bytes}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".fetch-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        sha = _copy(fs, f"{root}/{WEIGHTS_FILE}", staging / WEIGHTS_FILE, max_bytes)
        _copy(fs, f"{root}/{CONFIG_FILE}", staging / CONFIG_FILE, 1 << 20)
        config = (staging / CONFIG_FILE).read_bytes()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, cache_dir / cache_key(sha, config)


def commit(staging: Path, final: Path) -> Path:
    """Move a validated staging folder into place (atomic; a concurrent identical fetch wins)."""
    try:
        os.rename(staging, final)
    except OSError:  # the same content is already cached
        shutil.rmtree(staging, ignore_errors=True)
        if not (final / WEIGHTS_FILE).exists():
            raise
    return final
