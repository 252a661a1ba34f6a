"""The C kernels on bf16 storage (the CPU's `dtype: bfloat16`): bf16 weights and a bf16 KV cache
widened to fp32 as they are read, so each kernel gives what it gives in fp32 on the rounded
values — bit for bit for the GEMM and the cache writes, within fp32 rounding for attention."""

import pytest
import torch

from cold_ray.kernels import cpu_attention, cpu_gemm, cpu_rowwise
from tests.helpers import NO_COMPILER, compiler_present
from tests.kernels.test_cpu_attention import random_case, reference
from tests.kernels.test_cpu_rowwise import _rope_case

pytestmark = pytest.mark.skipif(not compiler_present(), reason=NO_COMPILER)


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize("rows", [1, 5, 40, 300])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_on_bf16_panels_is_the_fp32_gemm_on_rounded_weights(rows, threads):
    gen = torch.Generator().manual_seed(rows)
    w, x, b = torch.randn(96, 577, generator=gen), torch.randn(rows, 577, generator=gen), None
    kernel = cpu_gemm.load()
    half = cpu_gemm.to_panels([w], torch.bfloat16)[0]
    assert half.dtype == torch.bfloat16 and half.shape == (6, 577, 16)
    want = kernel(x, cpu_gemm.to_panels([_rounded(w)])[0], b)
    assert torch.equal(kernel.with_threads(threads)(x, half, b), want)
    exact = x.double() @ _rounded(w).double().T  # and that is the product on rounded weights
    torch.testing.assert_close(want.double(), exact, rtol=1e-5, atol=2e-6 * 577**0.5)


def test_panels_hold_fp32_or_bf16_only():
    with pytest.raises(ValueError, match="panels hold"):
        cpu_gemm.panel_views([torch.randn(16, 4)], torch.float16)
    with pytest.raises(ValueError, match="fp32 or bf16 panels"):
        cpu_gemm.load()(torch.randn(2, 4), torch.zeros(1, 4, 16, dtype=torch.float64))


def test_rope_cache_write_rounds_into_a_bf16_cache_as_torch_does():
    kernels = cpu_rowwise.load()
    heads, cos, sin, positions, slot_ids, cache, distinct = _rope_case(2)
    if not distinct:
        pytest.skip("two tokens at one (slot, position)")
    heads *= 1e3  # values whose low bits matter, ties included below
    heads[0, 6, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0])
    half = cache.to(torch.bfloat16)
    f32_heads, f32_cache = heads.clone(), cache.clone()
    kernels.rope_cache_write(
        f32_heads, cos, sin, positions, slot_ids, f32_cache[0, 1], f32_cache[1, 1], 6
    )
    kernels.rope_cache_write(heads, cos, sin, positions, slot_ids, half[0, 1], half[1, 1], 6)
    assert torch.equal(heads, f32_heads)  # q and k rotated in fp32 alike
    assert torch.equal(half, f32_cache.to(torch.bfloat16))  # round to nearest, ties to even


@pytest.mark.parametrize("dim", [64, 80])
@pytest.mark.parametrize("threads", [1, 3])
def test_attention_over_a_bf16_cache_is_attention_over_the_rounded_values(dim, threads):
    kernel = cpu_attention.load().with_threads(threads)
    q, k, v, slots, positions = random_case(5, dim, 3)
    kh, vh = k.to(torch.bfloat16), v.to(torch.bfloat16)
    got = kernel(q, kh, vh, slots, positions)
    over_rounded = kernel(q, kh.float(), vh.float(), slots, positions)
    torch.testing.assert_close(got, over_rounded, rtol=1e-6, atol=1e-6)
    want = reference(q, kh.float(), vh.float(), slots, positions)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for i in range(q.shape[0]):  # still each token alone
        alone = kernel(q[i : i + 1], kh, vh, slots[i : i + 1], positions[i : i + 1])
        assert torch.equal(alone[0], got[i]), i
