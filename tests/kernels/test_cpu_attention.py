"""The compiled CPU decode-attention kernel: numerics against an fp64 reference, batch
invariance, the engine's tokens with and without it (its build: test_cpu_kernels_build.py)."""

import pytest
import torch

from cold_ray.config import EngineConfig
from cold_ray.engine import EngineCore, SamplingParams
from cold_ray.kernels import cpu_attention
from tests.helpers import NO_COMPILER, compiler_present

kernel = cpu_attention.load()
needs_kernel = pytest.mark.skipif(not compiler_present(), reason=NO_COMPILER)


def reference(q, k, v, slots, positions):
    """fp64 attention of each token over positions 0..positions[i] of its slot."""
    n, heads, dim = q.shape
    groups = heads // k.shape[1]
    out = torch.empty(n, heads, dim, dtype=torch.float64)
    for i in range(n):
        keys = k[slots[i], :, : positions[i] + 1].double().repeat_interleave(groups, 0)
        values = v[slots[i], :, : positions[i] + 1].double().repeat_interleave(groups, 0)
        scores = (keys @ q[i].double().unsqueeze(-1)).squeeze(-1) * dim**-0.5  # [heads, L]
        out[i] = (scores.softmax(-1).unsqueeze(1) @ values).squeeze(1)
    return out


def random_case(seed, dim, groups, kv_heads=2, n=6, slots_total=9, max_len=40):
    gen = torch.Generator().manual_seed(seed)
    # one layer of a [layers, slots, kv_heads, max_len, dim] cache, as the engine passes it
    cache = torch.randn(2, 3, slots_total, kv_heads, max_len, dim, generator=gen)
    k, v = cache[0, 1], cache[1, 1]
    q = torch.randn(n, kv_heads * groups, dim, generator=gen)
    slots = torch.randperm(slots_total, generator=gen)[:n]  # out of order, some slots unused
    positions = torch.randint(0, max_len, (n,), generator=gen)
    positions[0] = 0  # a token that attends to itself only
    return q, k, v, slots, positions


@needs_kernel
@pytest.mark.parametrize("dim", [16, 64, 80, 128])  # 64 and 128 take the unrolled paths
@pytest.mark.parametrize("groups", [1, 3, 4])
def test_matches_fp64_reference(dim, groups):
    for seed in range(3):
        q, k, v, slots, positions = random_case(seed, dim, groups)
        got = kernel(q, k, v, slots, positions)
        # fp32 sums in another order and a vectorised exp: relative error ~1e-6
        torch.testing.assert_close(
            got.double(), reference(q, k, v, slots, positions), rtol=1e-5, atol=1e-5
        )


@needs_kernel
def test_matches_sdpa_over_the_engines_masked_cache_view():
    """The engine's SDPA path: the cache view over the longest row with an additive mask."""
    q, k, v, slots, positions = random_case(7, 64, 3, kv_heads=3, n=5, slots_total=5)
    slots = torch.arange(5)
    span = int(positions.max()) + 1
    mask = torch.zeros(5, 1, 1, span).masked_fill_(
        torch.arange(span) > positions.view(-1, 1, 1, 1), float("-inf")
    )
    want = torch.nn.functional.scaled_dot_product_attention(
        q.view(5, 3, 3, 64), k[:, :, :span], v[:, :, :span], attn_mask=mask
    ).reshape(5, 9, 64)
    torch.testing.assert_close(kernel(q, k, v, slots, positions), want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_tokens_result_does_not_depend_on_the_batch():
    """Bit for bit: what a token gets alone is what it gets beside any other tokens."""
    q, k, v, slots, positions = random_case(3, 64, 3, n=8)
    batch = kernel(q, k, v, slots, positions)
    for i in range(8):
        alone = kernel(q[i : i + 1], k, v, slots[i : i + 1], positions[i : i + 1])
        assert torch.equal(alone[0], batch[i]), i
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kernel(q[order], k, v, slots[order], positions[order]), batch[order])


@needs_kernel
def test_refuses_inputs_it_was_not_built_for():
    q, k, v, slots, positions = random_case(0, 64, 3)
    with pytest.raises(ValueError, match="fp32"):
        kernel(q.double(), k, v, slots, positions)
    with pytest.raises(ValueError, match="int64"):
        kernel(q, k, v, slots.int(), positions)
    with pytest.raises(ValueError, match="head sizes"):  # q's head_dim is not the cache's
        kernel(q[..., :32].contiguous(), k, v, slots, positions)
    with pytest.raises(ValueError, match="head sizes"):  # 3 of the 6 query heads over 2 K/V heads
        kernel(q[:, :3].contiguous(), k, v, slots, positions)


def _generate(path, prompts, **config):
    core = EngineCore(EngineConfig(model=str(path), max_rows=8, max_model_len=96, **config))
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    return core, [r["token_ids"] for r in core.generate(prompts, params)]


@needs_kernel
def test_engine_tokens_equal_with_and_without_the_kernel(tiny_llama):
    """Ragged prompts decoding side by side (slots of different lengths, rows finishing at
    different steps): the same greedy tokens through the kernel and through SDPA."""
    prompts = [[5 + i] * (3 + 7 * i) for i in range(6)]
    with_kernel, tokens = _generate(tiny_llama, prompts)
    assert with_kernel.model.layers[0].self_attn.decode_kernel is kernel
    without, expected = _generate(tiny_llama, prompts, cpu_attention_kernel=False)
    assert without.model.layers[0].self_attn.decode_kernel is None
    assert tokens == expected


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_threads_give_the_same_bits(threads):
    """(token, K/V head) pairs spread over threads: each computed as on one thread."""
    q, k, v, slots, positions = random_case(11, 64, 3, kv_heads=3, n=9, slots_total=9)
    want = kernel(q, k, v, slots, positions)
    assert torch.equal(kernel.with_threads(threads)(q, k, v, slots, positions), want)


@needs_kernel
def test_engine_uses_the_kernel_on_more_than_one_thread(tiny_llama):
    threads = torch.get_num_threads()
    try:
        prompts = [[5 + i] * (3 + 7 * i) for i in range(6)]
        core, tokens = _generate(tiny_llama, prompts, num_threads=2)
        assert core.model.layers[0].self_attn.decode_kernel.threads == 2
        assert tokens == _generate(tiny_llama, prompts, cpu_attention_kernel=False)[1]
    finally:
        torch.set_num_threads(threads)
