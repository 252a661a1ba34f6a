"""Schema versions and migrations (catalogs written by earlier cold-ray versions open, migrate
and serve), and the registry's target: URL validation and credentials from the environment."""

import hashlib
import json
import sqlite3
import threading
import time

import pytest
from pydantic import ValidationError

from cold_ray.adapters.peft import files_checksum, weights_sha256
from cold_ray.adapters.registry import (
    SCHEMA_VERSION,
    RegistryError,
    open_registry,
    parse_target,
    redact,
)
from cold_ray.config import EngineConfig
from cold_ray.engine import EngineCore, SamplingParams
from cold_ray.serve.app_args import AppArgs
from tests.postgres import PASSWORD

# The catalog as cold-ray wrote it before schema versions: with `warnings` (the last layout)
# and without (the first one).
LEGACY_SCHEMA = """
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


def _legacy_catalog(path, adapters, with_warnings: bool) -> None:
    db = sqlite3.connect(path)
    schema = LEGACY_SCHEMA
    if not with_warnings:
        schema = schema.replace(
            ",\n    warnings TEXT NOT NULL DEFAULT '[]'  -- JSON list: notes from validation "
            "(foreign base)",
            "",
        )
        assert "warnings" not in schema
    db.execute(schema)
    db.execute("PRAGMA journal_mode = WAL")
    for name, folder in adapters.items():
        row = dict(
            name=name,
            source=str(folder),
            path=str(folder),
            base_model="tiny-llama",
            rank=8,
            target_modules=json.dumps(["q_proj", "v_proj"]),
            nbytes=(folder / "adapter_model.safetensors").stat().st_size,
            sha256=weights_sha256(folder),
            alpha=0.3,
            beta=None,
            cold_enabled=1,
            created_at=time.time(),
        )
        if with_warnings:
            row["warnings"] = json.dumps(["adapter declares base model 'x'"])
        cols = ", ".join(row)
        db.execute(
            f"INSERT INTO adapters ({cols}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
    db.commit()
    db.close()


@pytest.mark.parametrize("with_warnings", [True, False], ids=["with-warnings", "first-layout"])
def test_a_catalog_from_before_versions_migrates_and_serves(
    tmp_path, tiny_llama, tiny_adapters, with_warnings
):
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "adapter_model.safetensors").write_bytes(b"x")
    path = tmp_path / "registry.sqlite"
    _legacy_catalog(path, {"kept": tiny_adapters[0], "gone": gone}, with_warnings)
    (gone / "adapter_model.safetensors").unlink()  # its files left this host

    reg = open_registry(path)
    kept, lost = reg.get("kept"), reg.get("gone")
    assert (kept.alpha, kept.beta, kept.rank) == (0.3, None, 8)
    assert kept.warnings == (("adapter declares base model 'x'",) if with_warnings else ())
    config = (tiny_adapters[0] / "adapter_config.json").read_bytes()
    assert kept.config_sha256 == hashlib.sha256(config).hexdigest()
    assert kept.checksum == files_checksum(tiny_adapters[0])
    assert lost.config_sha256 == "" and lost.checksum == lost.sha256  # its weights alone
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM registry_meta WHERE key = 'schema_version'").fetchone()
    assert db.execute("SELECT value FROM registry_meta").fetchall() == [(SCHEMA_VERSION,), (0,)]
    db.close()

    core = EngineCore(
        EngineConfig(model=str(tiny_llama), max_rows=4, max_model_len=64, max_lora_rank=8),
        resolver=reg.resolver(),
    )
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    assert core.generate([[5, 6, 7]], params, adapter="kept")[0]["completion_tokens"] == 3
    core.shutdown()
    reg.close()
    again = open_registry(path)  # opening a current catalog changes nothing
    assert again.get("kept") == kept
    again.close()


def _set_version(target: str, version: int) -> None:
    if "://" not in target:
        with sqlite3.connect(target) as db:
            db.execute(
                "UPDATE registry_meta SET value = ? WHERE key = 'schema_version'", (version,)
            )
        return
    import psycopg

    with psycopg.connect(target, password=PASSWORD) as conn:
        conn.execute("UPDATE registry_meta SET value = %s WHERE key = 'schema_version'", (version,))


def test_many_first_opens_at_once_create_one_catalog_and_a_newer_one_is_refused(
    registry_target, tmp_path
):
    opened, errors = [], []

    def open_one():
        try:
            opened.append(open_registry(registry_target, cache_dir=tmp_path / "blobs"))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(opened) == 8
    assert all(r.list() == [] for r in opened)
    for r in opened:
        r.close()
    _set_version(registry_target, SCHEMA_VERSION + 1)
    with pytest.raises(RegistryError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        open_registry(registry_target, cache_dir=tmp_path / "blobs")


# ---- the target: file or URL, and credentials ----------------------------------------------


@pytest.mark.parametrize(
    "value, needle",
    [
        ("postgresql://cold:s3cret@db:5432/cold", "carries a password"),
        ("postgresql://cold@db/cold?password=s3cret", "carries a password"),
        ("postgres://cold@db:notaport/cold", "invalid registry URL"),
        ("mysql://cold@db/cold", "scheme 'mysql://' is not supported"),
        ("   ", "SQLite file path or a postgresql:// URL"),
    ],
)
def test_bad_registry_in_the_config_is_refused_by_name(value, needle):
    with pytest.raises(ValidationError, match=needle) as e:
        AppArgs(registry=value)
    assert "registry" in str(e.value)
    assert "s3cret" not in str(e.value).split("input_value")[0]  # our message redacts it


def test_registry_targets(monkeypatch, tmp_path):
    assert parse_target("/data/r.sqlite") == ("sqlite", "/data/r.sqlite")
    assert parse_target("sqlite:////data/r.sqlite") == ("sqlite", "/data/r.sqlite")
    assert parse_target("postgresql://cold@db/cold", from_config=True)[0] == "postgresql"
    # from a secret in the environment, a password in the URL is fine; messages redact it
    assert parse_target("postgresql://cold:pw@db/cold")[0] == "postgresql"
    assert redact("postgresql://cold:pw@db:5/c") == "postgresql://cold:***@db:5/c"
    assert redact("postgresql://db/c?user=u&password=pw&x=1") == (
        "postgresql://db/c?user=u&password=***&x=1"
    )
    monkeypatch.setenv("COLD_RAY_REGISTRY", str(tmp_path / "env.sqlite"))
    assert AppArgs().registry_target() == str(tmp_path / "env.sqlite")
    assert AppArgs(registry=str(tmp_path / "x.sqlite")).registry_target().endswith("x.sqlite")


def test_password_comes_from_the_environment(request, monkeypatch, tmp_path):
    server = request.getfixturevalue("pg_server")
    url = server.url(server.create_database())
    monkeypatch.delenv("COLD_RAY_REGISTRY_PASSWORD", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass
    with pytest.raises(RegistryError, match="cannot connect to the registry at") as e:
        open_registry(url, cache_dir=tmp_path / "blobs")
    assert PASSWORD not in str(e.value)
    monkeypatch.setenv("MY_PG_PASSWORD", "wrong")
    with pytest.raises(RegistryError, match="password authentication failed"):
        open_registry(url, cache_dir=tmp_path / "blobs", password_env="MY_PG_PASSWORD")
    monkeypatch.setenv("MY_PG_PASSWORD", PASSWORD)
    args = AppArgs(registry=url, registry_password_env="MY_PG_PASSWORD")
    with args.open_registry(cache_dir=tmp_path / "blobs") as reg:
        assert reg.list() == [] and reg.backend == "postgresql"
    monkeypatch.delenv("MY_PG_PASSWORD")
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # libpq's own variable works too
    with open_registry(url, cache_dir=tmp_path / "blobs") as reg:
        assert reg.list() == []


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    from tests.serve_util import free_port

    url = f"postgresql://cold@127.0.0.1:{free_port()}/cold?connect_timeout=2"
    with pytest.raises(RegistryError, match=r"cannot connect to the registry at postgresql://"):
        open_registry(url, cache_dir=tmp_path / "blobs")
