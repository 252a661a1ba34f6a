"""The engine decodes CoLD exactly as the definition, batch-invariantly, and survives bad input."""

import pytest
import torch

from cold_ray.adapters.peft import AdapterError
from cold_ray.config import EngineConfig
from cold_ray.engine import (
    ColdParams,
    ContextLengthError,
    EngineCore,
    EngineError,
    SamplingParams,
    UnknownAdapterError,
)
from cold_ray.kernels import reference
from tests.helpers import hf_model, make_peft_adapter, peft_model

PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 8, 120, 64, 33, 2 + 10, 77], [11, 12]]
N_NEW = 12


def naive_cold(expert, amateur, prompt, alpha, beta, n=N_NEW):
    """docs/design.md §1 with two separate models, recomputing the whole prefix each step."""
    ids = list(prompt)
    a, b = torch.tensor([alpha]), torch.tensor([beta])
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids])
            e, m = expert(x).logits[:, -1], amateur(x).logits[:, -1]
            ids.append(int(reference.contrastive_greedy(e, m, a, b)[0]))
    return ids[len(prompt) :]


def greedy(model, prompt, n=N_NEW):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def core(tiny_llama, tiny_adapters):
    core = EngineCore(EngineConfig(model=str(tiny_llama), max_rows=8, max_model_len=64))
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
    return core


GREEDY = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True)


def run(core, prompt, adapter=None, cold=None, params=GREEDY):
    return core.generate([prompt], params, adapter=adapter, cold=cold)[0]


@pytest.mark.parametrize("alpha,beta", [(0.1, 0.5), (0.3, 1.0), (0.01, 0.2), (0.5, 2.0)])
def test_cold_greedy_equals_two_model_definition(core, tiny_llama, tiny_adapters, alpha, beta):
    expert, amateur = peft_model(tiny_llama, tiny_adapters[0]), hf_model(tiny_llama)
    for prompt in PROMPTS:
        want = naive_cold(expert, amateur, prompt, alpha, beta)
        got = run(core, prompt, "a0", ColdParams(alpha, beta))
        assert got["token_ids"] == want, f"prompt {prompt}"
        assert got["decoding"] == "cold" and (got["alpha"], got["beta"]) == (alpha, beta)


@pytest.mark.parametrize("cold", [ColdParams(0.1, 0.0), ColdParams(1.0, 0.7)])
def test_degenerate_cold_is_expert_greedy(core, tiny_llama, tiny_adapters, cold):
    expert = peft_model(tiny_llama, tiny_adapters[1])
    for prompt in PROMPTS:
        assert run(core, prompt, "a1", cold)["token_ids"] == greedy(expert, prompt)


def test_plain_greedy_matches_models(core, tiny_llama, tiny_adapters):
    base, expert = hf_model(tiny_llama), peft_model(tiny_llama, tiny_adapters[2])
    for prompt in PROMPTS:
        assert run(core, prompt)["token_ids"] == greedy(base, prompt)
        assert run(core, prompt, "a2")["token_ids"] == greedy(expert, prompt)


def test_cold_changes_tokens_somewhere(core):
    """With a strong contrast the output differs from expert greedy (the test can fail)."""
    differs = [
        run(core, p, "a0", ColdParams(0.01, 3.0))["token_ids"] != run(core, p, "a0")["token_ids"]
        for p in PROMPTS
    ]
    assert any(differs)


def test_batch_invariance_with_joins_and_leaves(core):
    """A request's greedy tokens do not change when others share, join or leave its batch."""
    target = (PROMPTS[1], "a0", ColdParams(0.1, 0.5))
    alone = run(core, *target)["token_ids"]
    mates = [
        (PROMPTS[0], "a1", None, 3),
        (PROMPTS[2], None, None, 20),
        (PROMPTS[0], "a2", ColdParams(0.2, 1.0), 5),
        (PROMPTS[2], "a1", ColdParams(0.1, 0.5), 9),
    ]
    reqs = [
        core.make_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), a, c)
        for p, a, c, n in mates
    ]
    core.add(reqs[0])
    core.add(reqs[1])
    core.step()
    core.step()
    mine = core.make_request(target[0], GREEDY, target[1], target[2])
    core.add(mine)
    core.step()
    core.add(reqs[2])  # joins mid-flight
    core.step()
    core.add(reqs[3])
    while core.has_work():
        core.step()
    assert mine.output_ids == alone
    assert core.rows == [] and core.running == []


def test_rows_are_freed_on_abort(core):
    req = core.make_request(
        PROMPTS[0],
        SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True),
        "a0",
        ColdParams(),
    )
    other = core.make_request(PROMPTS[1], GREEDY)
    core.add(req)
    core.add(other)
    core.step()
    assert len(core.rows) == 3
    out = core.abort(req.request_id)
    assert out.finished and out.finish_reason == "abort"
    assert len(core.rows) == 1 and core.rows[0].request is other
    assert core.slots.refs == {}
    core.step()  # compaction runs between steps: the survivor moves into slot 0
    assert core.rows[0].slot == 0
    while core.has_work():
        core.step()
    assert other.output_ids == run(core, PROMPTS[1])["token_ids"]


def test_max_tokens_stop_strings_and_context_limit(core):
    out = run(
        core, PROMPTS[0], params=SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    )
    assert out["completion_tokens"] == 5 and out["finish_reason"] == "length"
    full = run(
        core, PROMPTS[0], params=SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    )["text"]
    stop = full[6:9]
    if stop.strip():
        stopped = run(
            core,
            PROMPTS[0],
            params=SamplingParams(temperature=0.0, max_tokens=30, stop=(stop,), ignore_eos=True),
        )
        assert stopped["finish_reason"] == "stop"
        assert stopped["text"] == full[: full.index(stop)]
    long_prompt = list(range(5, 5 + 60))
    with pytest.raises(ContextLengthError, match="the prompt has 60 and max_tokens asks for 50"):
        run(core, long_prompt, params=SamplingParams(max_tokens=50))
    # without max_tokens: up to the context (the default, 256, is capped by the 4 left)
    out = run(core, long_prompt, params=SamplingParams(temperature=0.0, ignore_eos=True))
    assert out["finish_reason"] == "length" and out["completion_tokens"] == 64 - 60


def test_eos_stops(core, tiny_llama):
    eos = core.tokenizer.eos_token_id
    out = run(
        core,
        PROMPTS[0],
        params=SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=(eos,)),
    )
    assert out["completion_tokens"] <= 30
    forced = run(
        core,
        PROMPTS[0],
        params=SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=tuple(range(400))),
    )
    assert forced["finish_reason"] == "stop" and forced["completion_tokens"] == 1


def test_seeded_sampling_reproduces_and_respects_plausibility(core):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    cold = ColdParams(0.2, 0.5)
    a = run(core, PROMPTS[0], "a0", cold, params)["token_ids"]
    b = run(core, PROMPTS[0], "a0", cold, params)["token_ids"]
    assert a == b
    c = run(
        core,
        PROMPTS[0],
        "a0",
        cold,
        SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True),
    )["token_ids"]
    assert len(c) == 10
    # every sampled token must have been plausible for the expert given its prefix
    ids = list(PROMPTS[0])
    for tok in a:
        logits = core.prompt_logits(ids, adapter="a0")[-1]
        assert logits[tok] >= logits.max() + torch.log(torch.tensor(cold.alpha)) - 1e-5
        ids.append(tok)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="   "), "prompt is empty"),
        (dict(prompt=list(range(64))), "the prompt has 64 tokens; this model.s context is 64"),
        (dict(prompt=[5, 10_000]), "token ids"),
        (dict(prompt=[5], cold=ColdParams()), "CoLD needs an adapter"),
    ],
)
def test_bad_requests_raise_clear_errors(core, kwargs, match):
    with pytest.raises(ValueError, match=match):  # EngineError, or the request's own check
        core.make_request(kwargs.pop("prompt"), GREEDY, **kwargs)


def test_unknown_adapter(core):
    with pytest.raises(UnknownAdapterError, match="'nope' does not exist"):
        core.make_request([5], GREEDY, adapter="nope")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alpha=0.0), r"alpha must be in \(0, 1\]"),
        (dict(alpha=1.5), r"alpha must be in \(0, 1\]"),
        (dict(beta=-0.1), r"beta must be in \[0, 1e\+06\]"),
        (dict(beta=1e30), r"beta must be in \[0, 1e\+06\], got 1e\+30"),
        (dict(alpha=float("nan")), "finite"),
        (dict(beta=float("inf")), "finite"),
    ],
)
def test_bad_cold_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ColdParams(**kwargs)


def test_bad_adapters_fail_alone(core, tiny_root, tiny_llama):
    """A broken adapter fails its own request with a clear error; others keep decoding."""
    big = make_peft_adapter(tiny_llama, tiny_root / "rank32", rank=32, seed=3)
    corrupt = make_peft_adapter(tiny_llama, tiny_root / "corrupt", rank=4, seed=3)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    core.register_adapter("big", big)
    core.register_adapter("corrupt", corrupt)
    core.register_adapter("missing", tiny_root / "does-not-exist")
    good = core.make_request(PROMPTS[1], GREEDY, "a0")
    core.add(good)
    bad = {n: core.make_request(PROMPTS[0], GREEDY, n) for n in ("big", "corrupt", "missing")}
    for r in bad.values():
        core.add(r)
    errors = {}
    while core.has_work():
        for out in core.step():
            if out.error is not None:
                errors[out.request_id] = out.error
    assert good.output_ids == run(core, PROMPTS[1], "a0")["token_ids"]
    assert set(errors) == {r.request_id for r in bad.values()}
    assert all(isinstance(e, AdapterError) for e in errors.values())
    assert "exceeds max_lora_rank 16" in str(errors[bad["big"].request_id])
    assert "corrupt or truncated" in str(errors[bad["corrupt"].request_id])
    assert "not a directory" in str(errors[bad["missing"].request_id])


def test_async_engine_streams_and_cancels(tiny_llama, tiny_adapters):
    import asyncio

    from cold_ray.engine import AsyncEngine

    config = EngineConfig(model=str(tiny_llama), max_rows=4, max_model_len=64)
    reference_core = EngineCore(config)
    reference_core.register_adapter("a0", tiny_adapters[0])
    want = reference_core.generate([PROMPTS[0]], GREEDY, "a0", ColdParams())[0]
    engine = AsyncEngine(config)
    engine.core.register_adapter("a0", tiny_adapters[0])
    with pytest.raises(EngineError, match="driven by an AsyncEngine"):
        engine.core.generate([PROMPTS[0]], GREEDY)

    async def main():
        chunks = [o async for o in await engine.submit(PROMPTS[0], GREEDY, "a0", ColdParams())]
        assert [t for c in chunks for t in c.token_ids] == want["token_ids"]
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
        assert "".join(c.text for c in chunks) == want["text"]
        # a consumer that walks away mid-stream frees its rows
        stream = await engine.submit(
            PROMPTS[1],
            SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True),
            "a0",
            ColdParams(),
        )
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(200):
            if not engine.core.rows:
                break
            await asyncio.sleep(0.01)
        assert engine.core.rows == [] and engine.core.slots.refs == {}

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_prefill_budget_lets_running_rows_decode(tiny_llama):
    """Prefill per step is bounded: a burst of new requests is admitted over several steps,
    and a running request gains a token every step meanwhile."""
    core = EngineCore(
        EngineConfig(model=str(tiny_llama), max_rows=8, max_model_len=64, max_prefill_tokens=10)
    )
    running = core.make_request(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    )
    core.add(running)
    core.step()
    burst = [core.make_request(PROMPTS[1], GREEDY) for _ in range(3)]  # 8 tokens each
    for r in burst:
        core.add(r)
    admitted = []
    for _ in range(3):
        before = len(running.output_ids)
        core.step()
        assert len(running.output_ids) == before + 1
        admitted.append(sum(1 for r in burst if r.output_ids))
    assert admitted == [1, 2, 3]
