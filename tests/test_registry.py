"""The adapter registry's contract, on both backends (SQLite and a real PostgreSQL): durable,
validates before listing, refuses bad input, and replicas see every change from memory."""

import json
import os
import shutil
import threading
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from cold_ray.adapters.peft import AdapterError, files_checksum, weights_sha256
from cold_ray.adapters.registry import AdapterExists, AdapterNotFound, RegistryError, open_registry
from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from cold_ray.model.loader import read_model_args
from tests.serve_util import wait_for

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# How long a change may take to reach another instance: well under PostgresRegistry's
# resync_s (30 s), so a change must come through the change feed (NOTIFY, SQLite's poll),
# not through the periodic resync.
FEED_S = 10


@pytest.fixture(scope="module")
def args(tiny_llama):
    return read_model_args(tiny_llama)


@pytest.fixture
def make_reg(registry_target, tmp_path):
    """Open the catalog (again: a second instance is what another replica holds)."""
    opened = []

    def make(**kw):
        kw.setdefault("cache_dir", tmp_path / "blobs")
        opened.append(open_registry(registry_target, **kw))
        return opened[-1]

    yield make
    for r in opened:
        r.close()


@pytest.fixture
def reg(make_reg):
    return make_reg(allowed_schemes=("file", "memory"))


def add(reg, name, source, args, **kw):
    return reg.add(name, source, args=args, max_rank=kw.pop("max_rank", 8), **kw)


def test_add_get_list_survives_restart(make_reg, reg, args, tiny_adapters):
    rec = add(reg, "a0", tiny_adapters[0], args, alpha=0.2)
    add(reg, "a1", str(tiny_adapters[1]), args)
    assert rec.rank == 8 and rec.sha256 == weights_sha256(tiny_adapters[0])
    assert set(rec.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert rec.nbytes == (tiny_adapters[0] / WEIGHTS).stat().st_size
    assert rec.cold == ColdParams(alpha=0.2, beta=0.5) and rec.cold_enabled
    assert Path(rec.base_model).name == "tiny-llama" and rec.created_at > 0
    assert rec.checksum == files_checksum(tiny_adapters[0]) != rec.sha256
    reg.close()
    again = make_reg()  # a new process would see the same
    assert [r.name for r in again.list()] == ["a0", "a1"]
    assert again.get("a0") == rec and "a1" in again and "nope" not in again


def test_duplicate_replace_remove(reg, args, tiny_adapters):
    add(reg, "x", tiny_adapters[0], args)
    with pytest.raises(AdapterExists, match="already exists"):
        add(reg, "x", tiny_adapters[1], args)
    assert reg.get("x").sha256 == weights_sha256(tiny_adapters[0])
    add(reg, "x", tiny_adapters[1], args, replace=True)
    assert reg.get("x").sha256 == weights_sha256(tiny_adapters[1])
    assert reg.remove("x").name == "x"
    assert reg.list() == []
    with pytest.raises(AdapterNotFound, match="does not exist"):
        reg.remove("x")
    with pytest.raises(KeyError):
        reg.get("x")


def test_set_tuned_and_resolver(reg, args, tiny_adapters):
    add(reg, "t", tiny_adapters[0], args)
    resolve = reg.resolver()
    src = resolve("t")
    assert src.sha256 == files_checksum(tiny_adapters[0]) and src.cold is None
    assert Path(src.path) == tiny_adapters[0].resolve() and src.prepare is None
    reg.set_tuned("t", 0.3, 1.5, cold_enabled=False)
    src = resolve("t")
    assert src.cold == ColdParams(0.3, 1.5) and src.cold_enabled is False
    with pytest.raises(RegistryError, match="alpha must be in"):
        reg.set_tuned("t", 1.5, 0.5)
    with pytest.raises(RegistryError, match=r"beta must be in \[0, 1e\+06\]"):
        reg.set_tuned("t", 0.5, -1)
    assert reg.get("t").alpha == 0.3  # unchanged by the refused updates
    with pytest.raises(AdapterNotFound):
        reg.set_tuned("missing", 0.1, 0.5)
    reg.set_tuned("t", None, None)
    assert resolve("t").cold is None and resolve("t").cold_enabled
    for bad in ("missing", "../t", "a/b"):
        with pytest.raises(KeyError, match="does not exist"):
            resolve(bad)


# ---- bad adapters: a clear error, and the registry unchanged ---------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _pickle(d: Path, args):
    (d / WEIGHTS).rename(d / "adapter_model.bin")


def _wrong_shape(d: Path, args):
    t = load_file(d / WEIGHTS)
    key = next(k for k in t if "q_proj.lora_A" in k)
    t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 3)
    save_file(t, d / WEIGHTS)


def _wrong_base(d: Path, args):
    cfg = json.loads((d / CONFIG).read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (d / CONFIG).write_text(json.dumps(cfg))


def _vocab_tensor(d: Path, args):
    t = load_file(d / WEIGHTS)
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, args.vocab_size + 5)
    save_file(t, d / WEIGHTS)


def _layer_replication(d: Path, args):
    cfg = json.loads((d / CONFIG).read_text())
    cfg["layer_replication"] = [[0, 2], [0, 2]]
    (d / CONFIG).write_text(json.dumps(cfg))


def _missing_config(d: Path, args):
    (d / CONFIG).unlink()


def _truncated(d: Path, args):
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def _bad_json(d: Path, args):
    (d / CONFIG).write_text("{not json")


def _unsupported_module(d: Path, args):
    t = load_file(d / WEIGHTS)
    t["base_model.model.model.layers.0.mlp.fc9.lora_A.weight"] = torch.zeros(8, 64)
    save_file(t, d / WEIGHTS)


def _nan(d: Path, args):
    t = load_file(d / WEIGHTS)
    key = next(k for k in t if "down_proj.lora_B" in k)
    t[key][3, 2] = float("nan")
    save_file(t, d / WEIGHTS)


BAD = {
    "pickle": (_pickle, {}, "pickled weights .*unpickling runs arbitrary code"),
    "wrong shape": (_wrong_shape, {}, r"do not fit the base layer; expected \(8, 64\)"),
    "vocabulary tensor": (_vocab_tensor, {}, "embed_tokens.lora_embedding_A.*vocabulary"),
    "layer replication": (_layer_replication, {}, "layer_replication.*layer stack"),
    "rank too high": (None, {"max_rank": 4}, "adapter rank 8 exceeds max_lora_rank 4"),
    "missing config": (_missing_config, {}, "has no adapter_config.json"),
    "truncated": (_truncated, {}, "corrupt or truncated"),
    "bad json": (_bad_json, {}, "not valid JSON"),
    "unsupported module": (_unsupported_module, {}, "fc9"),
    "too large": (None, {"max_bytes": 1000}, "over the limit of 1000"),
    "nan weights": (_nan, {}, "down_proj: weights contain NaN or inf"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_refused_and_changes_nothing(reg, args, tiny_adapters, tmp_path, case):
    breaker, kw, match = BAD[case]
    add(reg, "good", tiny_adapters[0], args)
    before = reg.list()
    d = _copy(tiny_adapters[1], tmp_path / "bad")
    if breaker is not None:
        breaker(d, args)
    with pytest.raises(AdapterError, match=match):
        add(reg, "bad", d, args, **kw)
    assert reg.list() == before


def test_foreign_base_name_is_served_with_a_recorded_warning(reg, args, tiny_adapters, tmp_path):
    """The declared base is a name (hub id, folder, GGUF stem): a different one is a warning
    kept with the adapter, not a refusal; the shapes are the guard."""
    d = _copy(tiny_adapters[1], tmp_path / "foreign")
    _wrong_base(d, args)
    rec = add(reg, "foreign", d, args)
    assert rec.base_model == "meta-llama/Llama-2-7b-hf"
    (warning,) = reg.get("foreign").warnings
    assert "'meta-llama/Llama-2-7b-hf'" in warning and repr(args.name) in warning
    assert add(reg, "native", tiny_adapters[0], args).warnings == ()


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "..", ".", "", "x" * 65, "a b", "é", "a\\b", None, "a\x00"]
)
def test_bad_names_are_refused(reg, args, tiny_adapters, name):
    with pytest.raises(RegistryError, match="invalid adapter name"):
        add(reg, name, tiny_adapters[0], args)
    assert reg.list() == []


def test_source_policy(make_reg, tmp_path, args, tiny_adapters):
    root = tmp_path / "allowed"
    inside = _copy(tiny_adapters[0], root / "ok")
    outside = _copy(tiny_adapters[1], tmp_path / "elsewhere")
    reg = make_reg(allowed_roots=[str(root)], allowed_schemes=["file"])
    assert add(reg, "ok", inside, args).path == str(inside.resolve())
    assert add(reg, "ok2", f"file://{inside}", args).source == str(inside.resolve())
    bad = {
        str(outside): "outside the allowed adapter roots",
        f"{root}/../elsewhere": "outside the allowed adapter roots",
        "memory://bucket/x": "scheme 'memory://' is not allowed",
        "http://169.254.169.254/latest": "scheme 'http://' is not allowed",
        f"zip://x::file://{inside}": "chained fsspec URLs are not allowed",
        "": "non-empty",
    }
    (root / "link").symlink_to(outside)  # a symlink inside the root pointing out
    bad[str(root / "link")] = "outside the allowed adapter roots"
    escape = _copy(tiny_adapters[0], root / "escape")
    (escape / WEIGHTS).unlink()
    (escape / WEIGHTS).symlink_to(outside / WEIGHTS)
    bad[str(escape)] = "outside the allowed adapter roots"
    for source, match in bad.items():
        with pytest.raises(AdapterError, match=match):
            add(reg, "x", source, args)
    assert [r.name for r in reg.list()] == ["ok", "ok2"]


def _upload(src: Path, uri: str, files=(CONFIG, WEIGHTS)) -> str:
    fs, root = fsspec.core.url_to_fs(uri)
    for f in files:
        fs.pipe(f"{root}/{f}", (src / f).read_bytes())
    return uri


def test_remote_source_is_fetched_into_a_content_addressed_cache(reg, args, tiny_adapters):
    uri = _upload(tiny_adapters[0], f"memory://bucket/{os.getpid()}/a0")
    rec = add(reg, "remote", uri, args)
    sha = weights_sha256(tiny_adapters[0])
    assert rec.source == uri and rec.sha256 == sha
    assert Path(rec.path).parent == reg.cache_dir and Path(rec.path).name.startswith(sha)
    add(reg, "remote2", uri, args)  # same content: one cached copy
    assert len(list(reg.cache_dir.iterdir())) == 1

    shutil.rmtree(rec.path)  # e.g. another host: the load fetches it again, off the step loop
    src = reg.resolver()("remote")
    src.prepare()
    assert weights_sha256(Path(src.path)) == sha

    fs, root = fsspec.core.url_to_fs(uri)  # the source changes behind the registry's back
    fs.pipe(f"{root}/{WEIGHTS}", (tiny_adapters[1] / WEIGHTS).read_bytes())
    shutil.rmtree(rec.path)
    with pytest.raises(AdapterError, match="changed at its source"):
        reg.resolver()("remote").prepare()
    fs.pipe(f"{root}/{WEIGHTS}", (tiny_adapters[0] / WEIGHTS).read_bytes())
    cfg = json.loads((tiny_adapters[0] / CONFIG).read_bytes())  # so does its config
    fs.pipe(f"{root}/{CONFIG}", json.dumps(cfg | {"lora_alpha": 3}).encode())
    with pytest.raises(AdapterError, match="changed at its source"):
        reg.resolver()("remote").prepare()

    reg.remove("remote")
    reg.remove("remote2")
    assert [p.name for p in reg.cache_dir.iterdir()] == []  # nothing left once unreferenced


def test_bad_remote_sources_leave_no_trace(reg, args, tiny_adapters, tmp_path):
    base = f"memory://bucket/{os.getpid()}"
    d = _copy(tiny_adapters[0], tmp_path / "pk")
    _pickle(d, args)
    _upload(d, f"{base}/pickle", files=(CONFIG, "adapter_model.bin"))
    d2 = _copy(tiny_adapters[0], tmp_path / "tr")
    _truncated(d2, args)
    _upload(d2, f"{base}/trunc")
    cases = {
        f"{base}/pickle": "pickled weights",
        f"{base}/trunc": "corrupt or truncated",
        f"{base}/missing": "does not exist",
        f"{base}/../escape": "without '.'/'..'",
    }
    for uri, match in cases.items():
        with pytest.raises(AdapterError, match=match):
            add(reg, "r", uri, args)
    with pytest.raises(AdapterError, match="over the limit"):
        add(reg, "r", _upload(tiny_adapters[0], f"{base}/big"), args, max_bytes=100)
    assert reg.list() == []
    assert not reg.cache_dir.exists() or list(reg.cache_dir.iterdir()) == []


def _other_weights(d: Path, src: Path) -> None:
    shutil.copy(src / WEIGHTS, d / WEIGHTS)  # same shapes, other weights


def _other_scaling(d: Path, src: Path) -> None:
    cfg = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps(cfg | {"lora_alpha": cfg["lora_alpha"] * 4}))


@pytest.mark.parametrize("change", [_other_weights, _other_scaling], ids=["weights", "config"])
def test_checksum_changed_after_registration_is_reported_by_the_engine(
    reg, args, tiny_llama, tiny_adapters, tmp_path, change
):
    """The checksum covers the weights and adapter_config.json: new scaling or targets are a
    new adapter, like new weights."""
    d = _copy(tiny_adapters[0], tmp_path / "mut")
    rec = add(reg, "mut", d, args)
    core = EngineCore(
        EngineConfig(model=str(tiny_llama), max_rows=4, max_model_len=64, max_lora_rank=8),
        resolver=reg.resolver(),
    )
    change(d, tiny_adapters[1])
    assert not reg.files_match(rec)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with pytest.raises(AdapterError, match="changed since registration"):
        core.generate([[5, 6, 7]], params, adapter="mut")
    assert core.generate([[5, 6, 7]], params)[0]["completion_tokens"] == 3  # still serving
    again = add(reg, "mut", d, args, replace=True)  # registered again: served
    assert again.checksum != rec.checksum and reg.files_match(again)
    assert core.generate([[5, 6, 7]], params, adapter="mut")[0]["completion_tokens"] == 3
    core.shutdown()


# ---- replicas: a snapshot in memory, kept current by the change feed -------------------------


def test_a_replica_sees_adds_replacements_tunings_and_removals(make_reg, args, tiny_adapters):
    writer, replica = make_reg(), make_reg()
    resolve = replica.resolver()  # loads the snapshot and starts the watcher
    with pytest.raises(KeyError):
        resolve("x")
    add(writer, "x", tiny_adapters[0], args)
    first = wait_for(
        lambda: replica.snapshot().sources.get("x"), what="the add to arrive", timeout=FEED_S
    )
    assert first.sha256 == files_checksum(tiny_adapters[0]) and resolve("x") == first
    add(writer, "x", tiny_adapters[1], args, replace=True)
    wait_for(
        lambda: resolve("x").sha256 == files_checksum(tiny_adapters[1]),
        what="replace",
        timeout=FEED_S,
    )
    writer.set_tuned("x", 0.2, 2.0, cold_enabled=False)
    wait_for(
        lambda: resolve("x").cold == ColdParams(0.2, 2.0),
        what="the tuning to arrive",
        timeout=FEED_S,
    )
    assert resolve("x").cold_enabled is False and replica.lookup("x").alpha == 0.2
    writer.remove("x")
    wait_for(
        lambda: "x" not in replica.snapshot().sources, what="the removal to arrive", timeout=FEED_S
    )
    with pytest.raises(KeyError, match="does not exist"):
        resolve("x")


def _lock_postgres_catalog(url: str):
    """Lock the catalog's tables against every reader and writer; returns the release. The
    tables are taken in the registry's own order (generation row first, then adapters), so a
    watcher's resync running at the same moment waits instead of deadlocking."""
    import psycopg

    conn = psycopg.connect(url, password=os.environ["COLD_RAY_REGISTRY_PASSWORD"])
    conn.execute("LOCK TABLE registry_meta, adapters IN ACCESS EXCLUSIVE MODE")
    return lambda: (conn.rollback(), conn.close())


def test_resolver_answers_from_memory_never_from_the_database(
    make_reg, registry_target, args, tiny_adapters
):
    """The request path never reads the database: the resolving thread makes no backend call,
    and on PostgreSQL lookups still answer while another session locks the catalog (a
    database read would wait for the lock)."""
    reg = make_reg()
    add(reg, "m", tiny_adapters[0], args)
    resolve = reg.resolver()
    callers = []
    for attr in ("_read", "_read_all"):
        real = getattr(reg, attr)
        setattr(
            reg,
            attr,
            lambda *a, _real=real: callers.append(threading.current_thread()) or _real(*a),
        )
    release = _lock_postgres_catalog(registry_target) if "://" in registry_target else lambda: None
    answers = []
    try:
        t = threading.Thread(target=lambda: answers.extend(resolve("m") for _ in range(1000)))
        t.start()
        t.join(30)
        assert not t.is_alive() and len(answers) == 1000
        with pytest.raises(KeyError):
            resolve("unknown")
    finally:
        release()
    assert t not in callers and threading.current_thread() not in callers


def test_postgres_waits_are_bounded(pg_url, args, tmp_path):
    """A statement that waits on the catalog (here for a lock another session holds) ends after
    `statement_timeout_s` as RegistryUnavailable (a 503 in the API), rather than hanging the
    call; and every connection carries TCP keepalives and a user timeout, so a peer that went
    silent is noticed in seconds rather than when TCP gives up (about 15 minutes)."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Waited

    import psycopg

    from cold_ray.adapters.registry.base import RegistryUnavailable
    from cold_ray.adapters.registry.postgres import PostgresRegistry

    reg = PostgresRegistry(pg_url, cache_dir=tmp_path / "blobs", statement_timeout_s=1)
    pool = ThreadPoolExecutor(1)
    try:
        for conninfo in (reg._conninfo, reg._serving_conninfo):
            params = psycopg.conninfo.conninfo_to_dict(conninfo)
            assert params["keepalives"] == "1" and int(params["keepalives_idle"]) <= 10
            assert 0 < int(params["tcp_user_timeout"]) <= 30_000
        release = _lock_postgres_catalog(pg_url)
        started = time.monotonic()
        try:
            waiting = pool.submit(reg.set_tuned, "x", 0.2, 0.5)
            try:
                error = waiting.exception(timeout=30)
            except Waited:
                error = None
        finally:
            release()
        assert isinstance(error, RegistryUnavailable), error
        assert time.monotonic() - started < 10
    finally:
        pool.shutdown()
        reg.close()
