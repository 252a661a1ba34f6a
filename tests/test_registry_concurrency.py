"""The registry under concurrency and against a model, on both backends (SQLite and a real
PostgreSQL):

- 64 threads in two processes (32 writers, 32 readers) lose no write and never see half an
  entry, and every process's snapshot converges to the final catalog;
- a seeded randomized differential test: random operations (valid and invalid) applied to the
  registry and to a plain dict must give the same outcomes and the same state, and a second
  instance's snapshot (a replica) must match the dict once the change feed has run. Fixed seeds
  in CI; `pytest --fuzz-seeds N` runs N seeds.
"""

import multiprocessing
import random
import threading
from pathlib import Path

import pytest

from cold_ray.adapters.peft import files_checksum
from cold_ray.adapters.registry import AdapterExists, AdapterNotFound, RegistryError, open_registry
from cold_ray.model.loader import read_model_args
from tests.serve_util import wait_for

CI_SEEDS = (0, 1, 2)
WRITERS, READERS, OWN_NAMES, SHARED = 16, 16, 3, 4  # per process
FEED_S = 10  # a replica's bound: well under PostgresRegistry's resync_s (30 s), so the
# change feed (NOTIFY, SQLite's poll), not the periodic resync, must bring every change


def pytest_generate_tests(metafunc):
    if "seed" in metafunc.fixturenames:
        n = metafunc.config.getoption("--fuzz-seeds")
        metafunc.parametrize("seed", range(n) if n else CI_SEEDS)


def _whole(record, known: dict) -> str | None:
    """Why `record` is not a whole entry as some writer wrote it, or None."""
    kind = (record.sha256, record.config_sha256, record.rank, record.nbytes, record.source)
    if kind not in known.values():
        return f"{record.name}: files fields from different writes {kind}"
    if (record.alpha is None) != (record.beta is None):
        return f"{record.name}: alpha/beta from different writes"
    if record.alpha is not None and (
        abs(record.beta - 10 * record.alpha) > 1e-9 or record.cold_enabled != (record.alpha > 0.5)
    ):
        return f"{record.name}: tuning triple from different writes"
    return None


def _writer(reg, args, adapters: list[str], wid: int, rng: random.Random, out: dict) -> None:
    """Own names: a known final state. Shared names: everyone races to add and tune them."""
    final = {}
    for j in range(OWN_NAMES):
        name = f"w{wid}-{j}"
        reg.add(name, adapters[j % 3], args=args, max_rank=8)
        final[name] = adapters[j % 3]
        other = adapters[(j + 1) % 3]
        reg.add(name, other, args=args, max_rank=8, replace=True)
        final[name] = other
        a = rng.choice([0.2, 0.7])
        reg.set_tuned(name, a, 10 * a, cold_enabled=a > 0.5)
        if j == 0:
            reg.remove(name)
            del final[name]
    added = 0
    for k in range(SHARED):
        try:
            reg.add(f"shared-{k}", adapters[wid % 3], args=args, max_rank=8)
            added += 1
        except AdapterExists as e:  # another writer listed it first
            assert "already exists" in str(e)
        a = rng.choice([0.1, 0.3, 0.6, 0.9])
        reg.set_tuned(f"shared-{k}", a, 10 * a, cold_enabled=a > 0.5)
    out[wid] = (final, added)


def _reader(reg, known: dict, done: threading.Event, bad: list, counts: list) -> None:
    resolve = reg.resolver()
    checksums = {files_checksum(p) for p in known}
    while not done.is_set():
        records = reg.list()
        for r in records:
            why = _whole(r, known)
            if why:
                bad.append(why)
        snap = reg.snapshot()
        for r in snap.records.values():
            why = _whole(r, known)
            if why:
                bad.append("snapshot " + why)
        for r in records[:5]:
            try:
                src = resolve(r.name)
                if src.sha256 not in checksums:
                    bad.append(f"resolver {r.name}: checksum {src.sha256}")
            except KeyError:
                pass  # removed since the list, or not yet in this process's snapshot
        counts.append(len(records))


def _process(target: str, model: str, known: dict, pid: int, results, go) -> None:
    import torch

    torch.set_num_threads(1)
    args = read_model_args(Path(model))
    adapters = list(known)
    reg = open_registry(target, cache_dir=Path(model).parent / "blobs")
    done, bad, counts, out = threading.Event(), [], [], {}
    readers = [
        threading.Thread(target=_reader, args=(reg, known, done, bad, counts))
        for _ in range(READERS)
    ]
    writers = [
        threading.Thread(
            target=_writer,
            args=(reg, args, adapters, pid * WRITERS + w, random.Random(pid * 100 + w), out),
        )
        for w in range(WRITERS)
    ]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    results.put(("written", pid, out))
    go.wait(120)  # every writer of both processes has finished
    try:  # this process's snapshot converges to the final catalog
        final = {r.name: r for r in reg.list()}
        wait_for(lambda: reg.snapshot().records == final, timeout=30, what="convergence")
        converged = True
    except AssertionError:
        converged = False
    done.set()
    for t in readers:
        t.join()
    reg.close()
    results.put(("read", pid, (bad[:20], len(counts), converged)))


def test_64_writers_and_readers_in_two_processes_lose_nothing(
    registry_target, tiny_llama, tiny_adapters, tmp_path
):
    args = read_model_args(tiny_llama)
    known = {}  # adapter folder -> what a whole entry of it looks like
    with open_registry(str(tmp_path / "probe.sqlite")) as probe:
        for i, a in enumerate(tiny_adapters):
            rec = probe.add(f"p{i}", a, args=args, max_rank=8)
            known[str(a)] = (rec.sha256, rec.config_sha256, rec.rank, rec.nbytes, rec.source)
    open_registry(registry_target, cache_dir=tmp_path / "blobs").close()  # create the tables once
    ctx = multiprocessing.get_context("spawn")
    results, go = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_process, args=(registry_target, str(tiny_llama), known, pid, results, go)
        )
        for pid in range(2)
    ]
    for p in procs:
        p.start()
    try:
        written = {}
        for _ in range(2):
            kind, pid, out = results.get(timeout=300)
            assert kind == "written"
            written.update(out)
        go.set()
        reads = [results.get(timeout=120)[2] for _ in range(2)]
    finally:
        go.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for bad, n_reads, converged in reads:
        assert bad == [] and n_reads > 0 and converged

    with open_registry(registry_target, cache_dir=tmp_path / "blobs") as reg:
        state = {r.name: r for r in reg.list()}
    expected = {n: a for final, _ in written.values() for n, a in final.items()}
    assert len(written) == 2 * WRITERS
    own = {n: r for n, r in state.items() if not n.startswith("shared-")}
    assert {n: r.source for n, r in own.items()} == {
        n: str(Path(a).resolve()) for n, a in expected.items()
    }
    assert all(r.alpha in (0.2, 0.7) for r in own.values())
    assert sorted(n for n in state if n.startswith("shared-")) == [
        f"shared-{k}" for k in range(SHARED)
    ]
    assert sum(added for _, added in written.values()) == SHARED  # each name added once
    assert [_whole(r, known) for r in state.values()] == [None] * len(state)


# ---- a seeded randomized differential test against a dict ------------------------------------

NAMES = ["a", "b", "c", "d", "e", "../x", ""]  # the last two are invalid


def _expect(model: dict, op: str, name: str, kw: dict):
    """What the dict model says the operation does: (error type or None, new model)."""
    if not name or "/" in name:
        return RegistryError, model
    alpha, beta = kw.get("alpha"), kw.get("beta")
    if op in ("add", "tune") and (
        (alpha is not None and not 0 < alpha <= 1) or (beta is not None and beta < 0)
    ):
        return RegistryError, model
    new = dict(model)
    if op == "add":
        if name in model and not kw["replace"]:
            return AdapterExists, model
        new[name] = (kw["adapter"], alpha, beta, kw["cold_enabled"])
    elif op == "remove":
        if name not in model:
            return AdapterNotFound, model
        del new[name]
    elif op == "tune":
        if name not in model:
            return AdapterNotFound, model
        new[name] = (model[name][0], alpha, beta, kw["cold_enabled"])
    return None, new


def _view(records, adapters) -> dict:
    by_source = {str(Path(a).resolve()): i for i, a in enumerate(adapters)}
    return {r.name: (by_source[r.source], r.alpha, r.beta, r.cold_enabled) for r in records}


def test_random_operations_match_a_dict(seed, registry_target, tiny_llama, tiny_adapters, tmp_path):
    rng = random.Random(seed)
    args = read_model_args(tiny_llama)
    reg = open_registry(registry_target, cache_dir=tmp_path / "blobs")
    replica = open_registry(registry_target, cache_dir=tmp_path / "blobs")  # another process's view
    replica.resolver()
    model: dict = {}
    try:
        for step in range(60):
            op = rng.choice(["add", "add", "remove", "tune", "get"])
            name = rng.choice(NAMES)
            kw = {
                "adapter": rng.randrange(3),
                "alpha": rng.choice([None, 0.05, 0.5, 1.0, 1.5]),
                "beta": rng.choice([None, 0.0, 2.0, -1.0]),
                "cold_enabled": rng.random() < 0.7,
                "replace": rng.random() < 0.4,
            }
            if op == "get":
                want = model.get(name)
                got = reg.get(name) if name in model else None
                if name and "/" not in name and want is None:
                    with pytest.raises(AdapterNotFound):
                        reg.get(name)
                assert (name in reg) == (want is not None)
                assert got is None or _view([got], tiny_adapters)[name] == want
                continue
            error, expected = _expect(model, op, name, kw)
            try:
                if op == "add":
                    reg.add(
                        name,
                        tiny_adapters[kw["adapter"]],
                        args=args,
                        max_rank=8,
                        alpha=kw["alpha"],
                        beta=kw["beta"],
                        cold_enabled=kw["cold_enabled"],
                        replace=kw["replace"],
                    )
                elif op == "remove":
                    reg.remove(name)
                else:
                    reg.set_tuned(name, kw["alpha"], kw["beta"], kw["cold_enabled"])
                outcome = None
            except RegistryError as e:
                outcome = type(e)
            assert outcome is error, f"seed {seed} step {step}: {op} {name!r} {kw}"
            model = expected
            assert _view(reg.list(), tiny_adapters) == model, f"seed {seed} step {step}"
            if step % 10 == 9:  # the replica catches up through the change feed alone
                wait_for(
                    lambda m=model: _view(replica.snapshot().records.values(), tiny_adapters) == m,
                    timeout=FEED_S,
                    what=f"replica at step {step}",
                )
        wait_for(
            lambda: _view(replica.snapshot().records.values(), tiny_adapters) == model,
            timeout=FEED_S,
            what="the replica at the end",
        )
        resolve = replica.resolver()
        for name, (adapter, *_) in model.items():
            assert resolve(name).sha256 == files_checksum(tiny_adapters[adapter])
    finally:
        reg.close()
        replica.close()
