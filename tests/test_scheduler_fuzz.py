"""Randomized differential test of the engine's scheduling: every request, whatever was
admitted, chunked, cached, queued, stopped or aborted around it, decodes exactly the tokens
and text it decodes alone — and nothing (rows, KV slots, adapter pins, queue entries,
prefix blocks' parents) leaks.

The generator mixes plain and CoLD requests, greedy and seeded-sampled, on several adapters
and the base model, prompts
that share prefixes (prefix cache hits and evictions), `max_tokens` from 1, stop strings and
stop tokens that fire on the first token, aborts mid-flight and arrivals spread over steps,
with `max_rows`, the prefill budget, the adapter slots and the prefix cache all small enough
to force queueing, chunking, compaction, adapter loads and evictions.

CI runs a fixed slice of seeds; for more: `python -m pytest tests/test_scheduler_fuzz.py
--fuzz-seeds 500`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
import torch

from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from cold_ray.engine.graphs import DecodeGraphs
from tests.test_prefix_cache import check_structure

ADAPTERS = ("a0", "a1", "a2")
COLD = (ColdParams(0.1, 0.5), ColdParams(0.3, 1.0), ColdParams(0.05, 2.0))
CI_SEEDS = 12


@dataclass
class Spec:
    prompt: list[int]
    adapter: str | None
    cold: ColdParams | None
    max_tokens: int
    arrive: int  # step at which it is added
    abort_after: int | None  # steps after arrival at which it is aborted
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    temperature: float = 0.0  # > 0: seeded sampling, which must be batch-invariant too
    seed: int | None = None

    def params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            seed=self.seed,
            top_p=0.9,
            max_tokens=self.max_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
        )

    def key(self) -> tuple:
        return (
            tuple(self.prompt),
            self.adapter,
            self.cold,
            self.max_tokens,
            self.stop,
            self.stop_token_ids,
            self.temperature,
            self.seed,
        )


class Alone:
    """The simplest correct version: each request run by itself on a fresh-state engine."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.memo: dict[tuple, dict] = {}

    def __call__(self, spec: Spec) -> dict:
        if spec.key() not in self.memo:
            out = self.core.generate([spec.prompt], spec.params(), spec.adapter, spec.cold)[0]
            self.memo[spec.key()] = out
        return self.memo[spec.key()]


def random_specs(rng: random.Random, vocab: int, alone: Alone, tokenizer) -> list[Spec]:
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randint(6, 14))] for _ in range(2)]
    specs = []
    for _ in range(rng.randint(3, 14)):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.6:
            prompt = rng.choice(prefixes) + prompt[: rng.randint(0, 6)]
        adapter = rng.choice((None,) + ADAPTERS)
        cold = rng.choice(COLD) if adapter and rng.random() < 0.6 else None
        max_tokens = rng.choice([1, 1, 2, 3, 5, 8, 13])
        abort = rng.choice([None] * 5 + [0, 1, 2, 4])
        spec = Spec(prompt, adapter, cold, max_tokens, rng.randint(0, 8), abort)
        if rng.random() < 0.3:
            spec.temperature, spec.seed = rng.choice([0.7, 1.0, 1.5]), rng.randrange(1 << 32)
        roll = rng.random()
        if roll < 0.35:  # stops that fire early: taken from what the request decodes alone
            probe = alone(spec)["token_ids"]
            if roll < 0.2:
                spec.stop_token_ids = (probe[rng.randrange(len(probe))],)
            else:
                text = tokenizer.decode(probe[:2], skip_special_tokens=True)
                if text.strip():
                    i = rng.randrange(len(text))
                    spec.stop = (text[i : i + rng.randint(1, 3)],)
        specs.append(spec)
    return specs


def check_state(core: EngineCore) -> None:
    slots = [r.slot for r in core.cache.rows]
    assert len(slots) == len(set(slots)), f"two rows share a slot: {slots}"
    assert all(0 <= s < core.config.max_rows for s in slots)
    assert len(slots) + core.cache.free_slots == core.config.max_rows
    for req in core.running:
        assert all(r.request is req for r in req.rows) and len(req.rows) == req.num_rows
    pinned = {}
    for req in core.running:
        if req.adapter is not None:
            pinned[req.adapter] = pinned.get(req.adapter, 0) + 1
    assert core.slots.refs == pinned
    if core.prefix_cache is not None:  # no block outlives its parent; leaves and counts agree
        check_structure(core.prefix_cache)
    # a slot's occupant leaves nothing behind (KVCache.scrub): a free slot is zero, but for
    # position 0, where a decode graph's pad rows work (finite: token 0 on the base model)
    free = sorted(set(range(core.config.max_rows)) - set(slots))
    for kv in (core.cache.k[:, free], core.cache.v[:, free]):
        assert not kv[:, :, :, 1:].any() and torch.isfinite(kv).all(), "stale K/V in a free slot"


def run_scenario(seed: int, core: EngineCore, alone: Alone) -> None:
    rng = random.Random(seed)
    specs = random_specs(rng, core.args.vocab_size, alone, core.tokenizer)
    reqs: dict[str, tuple[Spec, object]] = {}
    tokens: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    ended: dict[str, str] = {}
    step, deadline = 0, time.monotonic() + 120
    while step <= max(s.arrive for s in specs) or core.has_work():
        for spec in specs:
            if spec.arrive == step:
                req = core.make_request(spec.prompt, spec.params(), spec.adapter, spec.cold)
                core.add(req)
                reqs[req.request_id] = (spec, req)
                tokens[req.request_id], texts[req.request_id] = [], ""
        for rid, (spec, _) in reqs.items():
            if spec.abort_after is not None and step == spec.arrive + spec.abort_after:
                out = core.abort(rid)
                if out is not None:
                    ended[rid] = "abort"
        outputs = core.step()
        if not outputs and not core.running:
            time.sleep(0.001)  # only an adapter load to wait for: let its thread run
        for out in outputs:
            assert out.error is None, f"seed {seed}: {out.error!r}"
            tokens[out.request_id] += out.token_ids
            texts[out.request_id] += out.text
            if out.finished:
                ended.setdefault(out.request_id, out.finish_reason)
        check_state(core)
        step += 1
        assert time.monotonic() < deadline, f"seed {seed}: the engine stopped making progress"

    for rid, (spec, _) in reqs.items():
        want = alone(spec)
        assert rid in ended, f"seed {seed}: {rid} never ended"
        if ended[rid] == "abort":
            assert tokens[rid] == want["token_ids"][: len(tokens[rid])], f"seed {seed}: {spec}"
        else:
            assert tokens[rid] == want["token_ids"], f"seed {seed}: {spec}"
            assert texts[rid] == want["text"], f"seed {seed}: {spec}"
            assert ended[rid] == want["finish_reason"], f"seed {seed}: {spec}"
    assert not core.waiting and not core.running and not core.cache.rows
    assert core.cache.free_slots == core.config.max_rows and core.slots.refs == {}


def _core(model, adapters, **overrides) -> EngineCore:
    config = dict(
        model=str(model),
        max_rows=5,
        max_model_len=64,
        max_loras=2,
        max_prefill_tokens=7,
        prefix_cache_bytes=24 << 10,
        prefix_block_size=4,
    )
    core = EngineCore(EngineConfig(**{**config, **overrides}))
    for name, path in zip(ADAPTERS, adapters):
        core.register_adapter(name, path)
    return core


def _alone(model, adapters, **overrides) -> Alone:
    """The simplest correct version: one request at a time, whole prompts, no prefix cache."""
    return Alone(
        _core(
            model,
            adapters,
            max_rows=2,
            max_prefill_tokens=4096,
            prefix_cache_bytes=0,
            max_loras=3,
            **overrides,
        )
    )


@pytest.fixture(scope="module")
def alone(tiny_llama, tiny_adapters):
    return _alone(tiny_llama, tiny_adapters)


@pytest.fixture(scope="module")
def alone_gather(tiny_llama, tiny_adapters):
    return _alone(tiny_llama, tiny_adapters, lora_backend="gather_bmm")


@pytest.fixture(scope="module")
def fuzz_seeds(request):
    return request.config.getoption("--fuzz-seeds") or CI_SEEDS


@pytest.mark.parametrize(
    "variant",
    [{}, {"prefix_cache_bytes": 0}, {"max_prefill_tokens": 1, "max_rows": 3}],
    ids=["chunked+prefix-cache", "no-prefix-cache", "one-token-budget"],
)
def test_every_request_decodes_as_if_alone(tiny_llama, tiny_adapters, alone, fuzz_seeds, variant):
    core = _core(tiny_llama, tiny_adapters, **variant)
    for seed in range(fuzz_seeds):
        run_scenario(seed, core, alone)
    if core.prefix_cache is not None:
        assert core.prefix_cache.stats["hit_tokens"] > 0, "the scenarios never hit the cache"


BF16_SEEDS = 4  # the bf16 slice: the same scenarios, both engines in the CPU's bf16 precision


def test_every_request_decodes_as_if_alone_in_bf16(tiny_llama, tiny_adapters, fuzz_seeds):
    """dtype bfloat16 (bf16 weights and KV cache, fp32 arithmetic) is batch-invariant too."""
    alone = _alone(tiny_llama, tiny_adapters, dtype="bfloat16")
    core = _core(tiny_llama, tiny_adapters, dtype="bfloat16")
    assert core.runner.cache.k.dtype == alone.core.runner.cache.k.dtype == torch.bfloat16
    for seed in range(min(fuzz_seeds, BF16_SEEDS)):
        run_scenario(seed, core, alone)


THREAD_SEEDS = 3  # the two-thread slice


def test_every_request_decodes_on_two_threads_as_alone_on_one(
    tiny_llama, tiny_adapters, alone, fuzz_seeds
):
    """num_threads 2 (the C kernels split their work, torch runs two intra-op threads): a
    request's tokens depend neither on its batch nor on the thread count."""
    threads = torch.get_num_threads()
    try:
        core = _core(tiny_llama, tiny_adapters, num_threads=2)
        for seed in range(min(fuzz_seeds, THREAD_SEEDS)):
            run_scenario(seed, core, alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("attention", ["kernel", "sdpa"])
def test_graphed_decode_steps_decode_as_if_alone(
    tiny_llama, tiny_adapters, alone_gather, fuzz_seeds, attention
):
    """Decode steps through `DecodeGraphs` (padded to row and span buckets, static inputs;
    run eagerly here, as CPUs capture nothing) against each request alone on the eager path.
    The SDPA variant reads the attention mask made from the static positions."""
    core = _core(
        tiny_llama,
        tiny_adapters,
        lora_backend="gather_bmm",
        cpu_attention_kernel=attention == "kernel",
    )
    core.runner.graphs = DecodeGraphs(
        core.model,
        core.cache,
        core.backend,
        core.config.max_rows,
        core.config.max_model_len,
        core.config.max_loras,
        capture=False,
    )
    served = []
    run_step = core.runner.graphs.run
    core.runner.graphs.run = lambda plan: served.append(len(plan.decode)) or run_step(plan)
    for seed in range(fuzz_seeds):
        run_scenario(seed, core, alone_gather)
    assert len(served) >= 5 * fuzz_seeds and set(served) >= {1, 2, 3, 4}, served
