"""One request never hurts another: failures stay with the requests they belong to.

Faults are injected where they happen in production (the forward pass, the scores, the
detokeniser, a consumer's delivery callback); each test checks that the request at fault ends
with an error naming the problem, that every other request decodes exactly what it decodes
alone, and that nothing leaks.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cold_ray.config import EngineConfig
from cold_ray.engine import AsyncEngine, ColdParams, EngineCore, SamplingParams
from cold_ray.engine.request import RequestFailed, RequestTimeout

PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 8, 120, 64, 33, 12, 77], [11, 12], [40, 41, 42, 43]]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def core(tiny_llama, tiny_adapters):
    core = EngineCore(EngineConfig(model=str(tiny_llama), max_rows=6, max_model_len=64))
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
        core.load_adapter(f"a{i}")  # resident: admission never waits on a load here
    return core


def alone(core, prompt, params, adapter=None, cold=None) -> list[int]:
    return core.generate([prompt], params, adapter, cold)[0]["token_ids"]


def drain(core) -> dict[str, list]:
    """Step until idle; {request_id: outputs}."""
    outs: dict[str, list] = {}
    for _ in range(500):
        if not core.has_work():
            break
        for out in core.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def assert_idle(core) -> None:
    assert not core.running and not core.waiting and not core.cache.rows
    assert core.slots.refs == {} and core.free_rows == core.config.max_rows


@pytest.mark.parametrize(
    "mates",
    [
        [("plain", 1), ("cold", 6), ("cold", 6)],  # a request that ends at its own prefill
        [("cold", 6), ("plain", 3), ("cold", 6)],
        [("plain", 1), ("plain", 1), ("cold", 6)],
    ],
    ids=["1tok-cold-cold", "cold-plain-cold", "1tok-1tok-cold"],
)
def test_cold_tokens_do_not_depend_on_what_else_is_admitted_in_its_step(core, mates):
    kinds = {"plain": (None, None), "cold": ("a0", ColdParams(0.1, 0.5))}
    specs = [(PROMPTS[i % len(PROMPTS)], greedy(n), *kinds[k]) for i, (k, n) in enumerate(mates)]
    want = [alone(core, *s) for s in specs]
    reqs = [core.make_request(*s) for s in specs]
    for r in reqs:
        core.add(r)
    first = core.step()
    assert all(len(r.output_ids) == 1 for r in reqs), "not all admitted and prefilled in one step"
    outs = drain(core)
    for o in reversed(first):
        outs.setdefault(o.request_id, []).insert(0, o)
    assert [tokens(outs[r.request_id]) for r in reqs] == want
    assert_idle(core)


def test_forward_failure_fails_only_its_requests_and_waiting_ones_wait(core, monkeypatch):
    running = [core.make_request(p, greedy(20), "a1", ColdParams()) for p in PROMPTS[:3]]
    for r in running:
        core.add(r)
    core.step()  # 6 rows: the cache is full
    waiting = core.make_request(PROMPTS[3], greedy(5), "a2")
    core.add(waiting)
    real = type(core.model).forward
    monkeypatch.setattr(type(core.model), "forward", lambda *a: 1 / 0)
    outs = core.step()
    monkeypatch.setattr(type(core.model), "forward", real)
    failed = {o.request_id: o for o in outs}
    assert set(failed) == {r.request_id for r in running}
    for o in failed.values():
        assert o.finished and o.finish_reason == "error" and isinstance(o.error, RequestFailed)
        assert "forward pass failed: ZeroDivisionError" in str(o.error)
    assert waiting in core.waiting or waiting in core.running  # still queued, not failed
    rest = drain(core)
    assert tokens(rest[waiting.request_id]) == alone(core, PROMPTS[3], greedy(5), "a2")
    assert_idle(core)


def test_an_adapter_that_overflows_fails_its_requests_alone(core, tiny_root, tiny_llama):
    """Finite weights (they pass validation) that overflow fp32 in the forward pass: the
    adapter's rows get NaN scores; its requests fail with a clear error, sampled or greedy,
    and the others in the same batches decode exactly as alone."""
    from tests.helpers import make_peft_adapter

    path = tiny_root / "overflowing"
    if not path.exists():
        make_peft_adapter(tiny_llama, path, rank=8, seed=99, std=1e19)
    core.register_adapter("hot", path)
    victims = [
        core.make_request(PROMPTS[0], SamplingParams(max_tokens=8, seed=3), "hot"),
        core.make_request(PROMPTS[3], greedy(8), "hot", ColdParams()),
    ]
    specs = [
        (PROMPTS[1], greedy(8), "a0"),
        (PROMPTS[2], greedy(8), "a1", ColdParams()),
        (PROMPTS[0], SamplingParams(max_tokens=8, seed=5)),
    ]
    want = [alone(core, *s) for s in specs]
    others = [core.make_request(*s) for s in specs]
    for r in [*victims, *others]:
        core.add(r)
    outs = drain(core)
    for v in victims:
        end = outs[v.request_id][-1]
        assert end.finish_reason == "error" and "no finite score" in str(end.error)
        assert tokens(outs[v.request_id]) == []
    assert [tokens(outs[r.request_id]) for r in others] == want
    assert_idle(core)


def test_detokeniser_failure_fails_that_request_alone(core):
    victim = core.make_request(PROMPTS[0], greedy(8))
    other = core.make_request(PROMPTS[1], greedy(8), "a2", ColdParams())
    want = alone(core, PROMPTS[1], greedy(8), "a2", ColdParams())

    class Broken:
        stopped = False

        def add(self, token):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken tokenizer")

        def flush(self):
            return ""

    victim.detok = Broken()
    core.add(victim)
    core.add(other)
    outs = drain(core)
    assert outs[victim.request_id][-1].finish_reason == "error"
    assert "UnicodeDecodeError" in str(outs[victim.request_id][-1].error)
    assert tokens(outs[other.request_id]) == want
    assert_idle(core)


def test_waiting_request_times_out_with_a_clear_error(tiny_llama):
    core = EngineCore(
        EngineConfig(model=str(tiny_llama), max_rows=2, max_model_len=64, request_timeout_s=0.05)
    )
    hog = core.make_request(PROMPTS[1], greedy(40))
    starved = core.make_request(PROMPTS[0], greedy(3), None, None)
    core.add(hog)
    core.step()
    core.add(core.make_request(PROMPTS[2], greedy(40)))  # takes the second row
    core.add(starved)
    time.sleep(0.1)
    outs = {}
    for _ in range(3):
        for o in core.step():
            outs.setdefault(o.request_id, []).append(o)
    end = outs[starved.request_id][-1]
    assert isinstance(end.error, RequestTimeout) and "request_timeout_s is 0.05" in str(end.error)
    assert hog in core.running and len(hog.output_ids) == 4  # unaffected, still decoding


def test_hostile_sampling_values_never_fail_bystanders(core):
    """Valid extremes decode (temperature 1e-40 is greedy); bystanders are unaffected."""
    hostile = [
        SamplingParams(max_tokens=4, temperature=1e-40),
        SamplingParams(max_tokens=4, temperature=1e6, seed=1),
        SamplingParams(max_tokens=4, top_p=1e-12, seed=2),
        SamplingParams(max_tokens=4, top_k=10**9, seed=3),
    ]
    bystanders = [(PROMPTS[1], greedy(10), "a0", ColdParams()), (PROMPTS[2], greedy(10))]
    want = [alone(core, *b) for b in bystanders]
    by = [core.make_request(*b) for b in bystanders]
    bad = [
        core.make_request(PROMPTS[0], p, "a1", c)
        for p in hostile
        for c in (None, ColdParams(1e-300, 100.0))
    ]
    for r in by + bad:
        core.add(r)
    outs = drain(core)
    for r in bad:
        assert outs[r.request_id][-1].error is None
        assert len(tokens(outs[r.request_id])) == 4
    assert [tokens(outs[r.request_id]) for r in by] == want
    greedy_like = bad[0]  # temperature 1e-40 decodes as greedy
    assert tokens(outs[greedy_like.request_id]) == alone(core, PROMPTS[0], greedy(4), "a1")
    assert_idle(core)


def test_async_step_thread_survives_a_failing_consumer(tiny_llama):
    engine = AsyncEngine(EngineConfig(model=str(tiny_llama), max_rows=4, max_model_len=64))
    ref = EngineCore(EngineConfig(model=str(tiny_llama), max_rows=4, max_model_len=64))
    want = alone(ref, PROMPTS[1], greedy(12))

    raised = []

    def broken_sink(out):
        raised.append(out.request_id)
        return 1 / 0

    async def main():
        victim = await engine.submit(PROMPTS[0], greedy(30))
        bystander = await engine.submit(PROMPTS[1], greedy(12))
        first = await victim.__anext__()
        # the victim's loop is gone from under it: its sink raises on the step thread
        engine._sinks[first.request_id] = broken_sink
        got = [t async for o in bystander for t in o.token_ids]
        # the victim's iterator stays open (closing it would abort it from this side): the
        # step thread itself must abort the request whose delivery failed
        deadline = time.monotonic() + 10
        while engine.core.has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not engine.core.running and not engine.core.cache.rows
        return first.request_id, got

    try:
        # a lost output would leave the bystander's stream waiting forever: bound it
        victim_id, got = asyncio.run(asyncio.wait_for(main(), timeout=60))
        assert got == want
        assert engine._thread.is_alive()
        # the sink raised once, and the victim was aborted then, not decoded to its end
        assert raised == [victim_id]
        assert engine.core.stats["finished_requests"] == 2
        assert engine.core.stats["generated_tokens"] < 12 + 30
    finally:
        engine.shutdown()
