"""Randomized test one layer up, over the async engine: clients that disconnect or abort while
their requests are queued, waiting for an adapter load, prefilling or decoding, racing the
step thread.

Each seeded scenario starts concurrent clients at random moments; a client reads its stream to
the end, closes it after k outputs (a disconnect, k = 0 included: before admission), or aborts
by request id. Invariants: every stream ends; a stream read to the end yields exactly what the
request decodes alone; a closed or aborted one yields a prefix of it; afterwards no sink, row,
KV slot, adapter pin or queue entry is left behind.

CI runs a fixed slice of seeds; for more: `python -m pytest tests/test_async_fuzz.py
--fuzz-seeds 300`.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from cold_ray.config import EngineConfig
from cold_ray.engine import AsyncEngine, ColdParams, EngineCore, SamplingParams

CI_SEEDS = 6
ADAPTERS = (None, "a0", "a1", "a2")


@pytest.fixture(scope="module")
def alone(tiny_llama, tiny_adapters):
    core = EngineCore(
        EngineConfig(
            model=str(tiny_llama), max_rows=2, max_model_len=64, prefix_cache_bytes=0, max_loras=3
        )
    )
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
    memo: dict = {}

    def run(prompt, params, adapter, cold) -> list[int]:
        key = (tuple(prompt), params, adapter, cold)
        if key not in memo:
            memo[key] = core.generate([prompt], params, adapter, cold)[0]["token_ids"]
        return memo[key]

    return run


@pytest.fixture(scope="module")
def engine(tiny_llama, tiny_adapters):
    engine = AsyncEngine(
        EngineConfig(
            model=str(tiny_llama),
            max_rows=4,
            max_model_len=64,
            max_loras=2,
            max_prefill_tokens=6,
            prefix_cache_bytes=24 << 10,
            prefix_block_size=4,
        )
    )
    for i, a in enumerate(tiny_adapters):
        engine.core.register_adapter(f"a{i}", a)
    yield engine
    engine.shutdown()


async def client(engine, rng: random.Random, n: int, results: list) -> None:
    await asyncio.sleep(rng.random() * 0.05)
    prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 12))]
    adapter = rng.choice(ADAPTERS)
    cold = ColdParams(0.1, 0.5) if adapter and rng.random() < 0.5 else None
    params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 10), ignore_eos=True)
    how = rng.choice(["read", "read", "close", "abort"])
    stop_after = rng.randint(0, 4)
    rid = f"c{n}"
    got: list[int] = []
    stream = await engine.submit(prompt, params, adapter, cold, request_id=rid)
    ended = "closed"
    try:
        if how == "close" and stop_after == 0:
            return  # gone before the first output (queued, or waiting for its adapter)
        async for out in stream:
            got += out.token_ids
            if out.finished:
                ended = out.finish_reason
                break
            if how != "read" and len(got) >= stop_after:
                if how == "abort":
                    engine.abort(rid)  # the stream then ends with the abort's final output
                    continue
                break
    finally:
        await stream.aclose()
        results.append((prompt, params, adapter, cold, how, got, ended))


@pytest.fixture(scope="module")
def fuzz_seeds(request):
    return request.config.getoption("--fuzz-seeds") or CI_SEEDS


def test_streams_end_and_decode_as_if_alone_whatever_races_them(engine, alone, fuzz_seeds):
    for seed in range(fuzz_seeds):
        rng = random.Random(seed)
        results: list = []

        async def scenario(rng: random.Random, results: list):
            clients = [client(engine, rng, n, results) for n in range(rng.randint(4, 12))]
            await asyncio.wait_for(asyncio.gather(*clients), timeout=60)
            for _ in range(500):  # the step thread frees what the last aborts left
                core = engine.core
                if not (engine._sinks or core.running or core.waiting or core.cache.rows):
                    return
                await asyncio.sleep(0.01)

        asyncio.run(scenario(rng, results))
        core = engine.core
        assert engine._sinks == {}, f"seed {seed}: sinks left {list(engine._sinks)}"
        assert not core.running and not core.waiting and not core.cache.rows, f"seed {seed}"
        assert core.slots.refs == {} and core.adapters.loading == [], f"seed {seed}"
        for prompt, params, adapter, cold, how, got, ended in results:
            want = alone(prompt, params, adapter, cold)
            where = f"seed {seed}: {how} {adapter} {cold} {prompt}"
            if how == "read":
                assert ended == "length" and got == want, where
            else:
                assert got == want[: len(got)], where
