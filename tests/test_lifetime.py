"""A request never hurts a later one (docs/design.md §9): what it leaves behind — KV rows,
prefix blocks, adapter loads, pins, outputs — cannot change what a later request decodes or
whether it is served. One test per way it once did; tests/test_lifetime_fuzz.py tests the
class with randomized faults."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from cold_ray.adapters.peft import files_checksum
from cold_ray.adapters.sources import AdapterSource
from cold_ray.config import EngineConfig
from cold_ray.engine import AsyncEngine, ColdParams, EngineCore, SamplingParams
from cold_ray.engine.request import RequestTimeout
from cold_ray.engine.sampling import SamplingError
from tests.helpers import make_peft_adapter

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def run(core: EngineCore, timeout: float = 60) -> dict[str, list]:
    """Step until idle; {request_id: outputs}."""
    outs: dict[str, list] = {}
    deadline = time.monotonic() + timeout
    while core.has_work():
        assert time.monotonic() < deadline, "the engine stopped making progress"
        for out in core.step():
            outs.setdefault(out.request_id, []).append(out)
        if not core.running:
            time.sleep(0.001)  # only an adapter load to wait for: let its thread run
    return outs


def tokens_of(outs: list) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.fixture(scope="module")
def overflow_adapter(tiny_root, tiny_llama):
    """Finite weights (1e19 < fp32's max) whose LoRA delta overflows fp32."""
    return make_peft_adapter(tiny_llama, tiny_root / "overflow", rank=4, seed=3, std=1e19)


@pytest.fixture(scope="module")
def reference(tiny_llama, tiny_adapters):
    """Each request alone, on an engine nothing else ever ran on."""
    core = EngineCore(
        EngineConfig(
            model=str(tiny_llama), max_rows=2, max_model_len=64, prefix_cache_bytes=0, max_loras=3
        )
    )
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
    return lambda prompt, params, adapter=None, cold=None: core.generate(
        [prompt], params, adapter, cold
    )[0]["token_ids"]


@pytest.mark.parametrize("attention", ["kernel", "sdpa"])
def test_a_failed_request_leaves_no_poison_in_its_rows(
    tiny_llama, tiny_adapters, overflow_adapter, reference, attention
):
    """The overflowing request fails alone. Clean requests placed in its rows afterwards —
    a short one beside a long one, so attention reads the short row's slot past its length
    under the mask, in multi-chunk prefill and in decode — decode what they decode alone, and
    no prefix block holds a non-finite value."""
    core = EngineCore(
        EngineConfig(
            model=str(tiny_llama),
            max_rows=3,
            max_model_len=64,
            max_prefill_tokens=6,
            prefix_block_size=4,
            cpu_attention_kernel=attention == "kernel",
        )
    )
    core.register_adapter("overflow", overflow_adapter)
    core.register_adapter("a0", tiny_adapters[0])
    bad = core.make_request(PROMPT * 2, greedy(6), "overflow", ColdParams(0.1, 0.5))
    core.add(bad)
    outs = run(core)
    assert isinstance(outs[bad.request_id][-1].error, SamplingError)
    for adapter, cold in [(None, None), ("a0", None), ("a0", ColdParams(0.1, 0.5))]:
        short = core.make_request(PROMPT[:3], greedy(5), adapter, cold)
        long = core.make_request(PROMPT * 2, greedy(5))
        core.add(short)  # the lowest free slots: the failed request's
        core.add(long)
        outs = run(core)
        for req in (short, long):
            assert outs[req.request_id][-1].error is None, outs[req.request_id][-1].error
        assert tokens_of(outs[short.request_id]) == reference(PROMPT[:3], greedy(5), adapter, cold)
        assert tokens_of(outs[long.request_id]) == reference(PROMPT * 2, greedy(5))
    pc = core.prefix_cache
    assert len(pc) > 0
    used = list(pc.blocks)
    assert torch.isfinite(pc.k[used]).all() and torch.isfinite(pc.v[used]).all()


def test_a_load_of_a_replaced_adapter_is_never_installed(tiny_llama, tiny_adapters, reference):
    """A load that finished while nothing could take a slot, for an adapter then replaced in
    the registry: the next request decodes with the new weights, and a load no waiting request
    needs is dropped."""
    catalog = {
        name: AdapterSource(str(path), sha256=files_checksum(path))
        for name, path in [("busy", tiny_adapters[0]), ("x", tiny_adapters[1])]
    }
    core = EngineCore(
        EngineConfig(model=str(tiny_llama), max_rows=4, max_model_len=64, max_loras=1),
        resolver=catalog.__getitem__,
    )
    busy = core.make_request(PROMPT, greedy(40), "busy")
    core.add(busy)
    core.step()  # busy holds the only slot
    old = core.make_request(PROMPT, greedy(3), "x")
    core.add(old)
    core.step()  # x's read starts; no slot for it
    core.adapters._pool.submit(lambda: None).result(timeout=30)  # one worker: x's read is done
    core.abort(old.request_id)
    catalog["x"] = AdapterSource(str(tiny_adapters[2]), sha256=files_checksum(tiny_adapters[2]))
    core.step()
    dropped = core.adapters.loading == []
    core.abort(busy.request_id)
    new = core.make_request(PROMPT, greedy(6), "x")
    core.add(new)
    outs = run(core)
    assert tokens_of(outs[new.request_id]) == reference(PROMPT, greedy(6), "a2")
    assert core.slots.versions["x"] == catalog["x"].sha256
    assert dropped, "a load that no waiting request needed was kept"


def test_a_request_for_a_cold_adapter_gets_a_slot_under_steady_traffic(
    tiny_llama, tiny_adapters, reference
):
    """Every adapter slot pinned by a stream of requests for two hot adapters: a request for a
    third adapter is admitted once one hot adapter's running requests finish (each asks for 3
    tokens: a few steps), not when the traffic stops."""
    core = EngineCore(
        EngineConfig(model=str(tiny_llama), max_rows=8, max_model_len=64, max_loras=2)
    )
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
        core.load_adapter(f"a{i}")
    cold_one = core.make_request(PROMPT, greedy(4), "a2")
    admitted_at = None
    outs: dict[str, list] = {}
    for step in range(80):
        for hot in ("a0", "a1"):
            core.add(core.make_request(PROMPT[: 3 + step % 5], greedy(3), hot))
        if step == 5:
            core.add(cold_one)
        for out in core.step():
            outs.setdefault(out.request_id, []).append(out)
        if admitted_at is None and cold_one in core.running:
            admitted_at = step
    assert admitted_at is not None, "the cold adapter's request starved"
    assert admitted_at - 5 <= 12, f"admitted {admitted_at - 5} steps after it arrived"
    assert tokens_of(outs[cold_one.request_id]) == reference(PROMPT, greedy(4), "a2")


def test_outputs_a_failing_step_produced_are_returned(tiny_llama, reference):
    """The prefix cache fails in the step in which a request times out: the timeout is still
    delivered, and the request whose prefix could not be loaded computes it instead."""
    core = EngineCore(
        EngineConfig(
            model=str(tiny_llama),
            max_rows=2,
            max_model_len=64,
            prefix_block_size=4,
            request_timeout_s=5.0,
        )
    )
    warm = core.make_request(PROMPT, greedy(2))
    core.add(warm)
    run(core)  # its prompt's blocks are cached now

    def broken_load(*args):
        raise MemoryError("injected: no memory for the prefix copy")

    core.prefix_cache.load = broken_load
    late = core.make_request([9, 9, 9], greedy(2))
    hit = core.make_request(PROMPT, greedy(5))
    core.add(late)
    core.add(hit)
    late.arrived -= 10  # it has waited longer than request_timeout_s
    outs = run(core)
    assert isinstance(outs[late.request_id][-1].error, RequestTimeout)
    assert tokens_of(outs[hit.request_id]) == reference(PROMPT, greedy(5))
    assert not core.running and not core.waiting and not core.cache.rows


def test_a_step_that_raises_ends_every_stream(tiny_llama):
    """An unexpected error in the middle of a step (here: in planning) after requests finished
    in it: their outputs reach their streams, the running requests fail, waiting ones stay
    queued and decode later; no sink is left behind."""
    engine = AsyncEngine(
        EngineConfig(model=str(tiny_llama), max_rows=2, max_model_len=64, request_timeout_s=0.2)
    )
    scheduler = engine.core.scheduler
    plan = scheduler._plan
    calls = {"n": 0}

    def flaky_plan():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected: planning failed")
        return plan()

    scheduler._plan = flaky_plan

    async def collect(prompt, params):
        got = []
        try:
            async for out in await engine.submit(prompt, params):
                got += out.token_ids
        except Exception as e:
            return got, e
        return got, None

    async def main():
        return await asyncio.gather(
            collect(PROMPT, greedy(20)), collect([7, 8, 9], greedy(20)), collect([1, 2], greedy(3))
        )

    try:
        results = asyncio.run(asyncio.wait_for(main(), timeout=60))
    finally:
        engine.shutdown()
    errors = [e for _, e in results]
    assert sum(isinstance(e, RuntimeError) for e in errors) >= 1, errors
    assert all(e is None or isinstance(e, (RuntimeError, RequestTimeout)) for e in errors)
    assert engine._sinks == {}
    assert not engine.core.running and not engine.core.waiting
