"""The compiled row-wise CPU kernels (residual add + RMS norm, rotary embedding + KV-cache
write, SiLU·mul): against torch's operators, batch invariance, refusals, and the engine's
tokens with and without them (their build: test_cpu_kernels_build.py)."""

import pytest
import torch
import torch.nn.functional as F

from cold_ray.kernels import cpu_rowwise
from cold_ray.model.llama import apply_rope
from tests.helpers import NO_COMPILER, compiler_present

kernels = cpu_rowwise.load()
pytestmark = pytest.mark.skipif(not compiler_present(), reason=NO_COMPILER)
TOL = dict(rtol=2e-6, atol=2e-6)  # fp32, another rounding of the same formula


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("n", [7, 64, 576])
def test_add_rms_norm_matches_torch_and_updates_the_stream(with_delta, n):
    x = torch.randn(5, n, generator=_gen(n)) * 3
    delta = torch.randn(5, n, generator=_gen(n + 1)) if with_delta else None
    weight = torch.rand(n, generator=_gen(n + 2)) + 0.5
    want_x = x + delta if with_delta else x.clone()
    want = F.rms_norm(want_x.double(), (n,), weight.double(), 1e-5)
    got = kernels.add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(x, want_x, rtol=0, atol=0)  # the residual add is exact
    torch.testing.assert_close(got.double(), want, **TOL)
    alone = x[3:4].clone()
    got_alone = kernels.add_rms_norm(alone, None, weight, 1e-5)
    assert torch.equal(got_alone[0], kernels.add_rms_norm(x.clone(), None, weight, 1e-5)[3])


def _rope_case(seed, rows=6, q_heads=6, kv=2, dim=16, slots=5, max_len=24):
    g = _gen(seed)
    heads = torch.randn(rows, q_heads + 2 * kv, dim, generator=g)
    freqs = torch.outer(torch.arange(max_len).float(), torch.rand(dim // 2, generator=g))
    emb = torch.cat([freqs, freqs], -1)
    cache = torch.randn(2, 3, slots, kv, max_len, dim, generator=g)  # [k/v, layers, ...]
    positions = torch.randint(0, max_len, (rows,), generator=g)
    slot_ids = torch.randint(0, slots, (rows,), generator=g)
    positions[0], positions[1], slot_ids[0], slot_ids[1] = 0, max_len - 1, 0, slots - 1
    keep = torch.unique(slot_ids * max_len + positions).numel() == rows  # no two tokens alike
    return heads, emb.cos(), emb.sin(), positions, slot_ids, cache, keep


@pytest.mark.parametrize("seed", range(4))
def test_rope_cache_write_matches_the_model_and_writes_only_its_places(seed):
    heads, cos, sin, positions, slot_ids, cache, distinct = _rope_case(seed)
    if not distinct:
        pytest.skip("two tokens at one (slot, position)")
    q_heads, kv = 6, 2
    want_qk = apply_rope(
        heads[:, : q_heads + kv], cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    )
    want_cache = cache.clone()
    want_cache[0, 1, slot_ids, :, positions] = want_qk[:, q_heads:]
    want_cache[1, 1, slot_ids, :, positions] = heads[:, q_heads + kv :]
    v_before = heads[:, q_heads + kv :].clone()
    kernels.check_rows(positions, slot_ids, cos.shape[0], cache.shape[2])
    kernels.rope_cache_write(
        heads, cos, sin, positions, slot_ids, cache[0, 1], cache[1, 1], q_heads
    )
    torch.testing.assert_close(heads[:, : q_heads + kv], want_qk, **TOL)
    assert torch.equal(heads[:, q_heads + kv :], v_before)  # v heads are not rotated
    written = torch.zeros(cache.shape[2:4] + cache.shape[4:5], dtype=torch.bool)
    written[slot_ids, :, positions] = True
    for which in (0, 1):
        for layer in (0, 2):  # other layers untouched, bit for bit
            assert torch.equal(cache[which, layer], want_cache[which, layer])
        got, want = cache[which, 1], want_cache[which, 1]
        assert torch.equal(got[~written], want[~written])  # other places untouched
        torch.testing.assert_close(got[written], want[written], **TOL)


def test_silu_mul_matches_torch():
    gate_up = torch.randn(9, 2 * 77, generator=_gen(3)) * 4
    gate, up = gate_up.double().chunk(2, -1)
    torch.testing.assert_close(kernels.silu_mul(gate_up).double(), F.silu(gate) * up, **TOL)


def test_bad_arguments_are_refused_before_any_write():
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="add_rms_norm"):
        kernels.add_rms_norm(x, None, torch.ones(9), 1e-5)
    with pytest.raises(ValueError, match="add_rms_norm"):
        kernels.add_rms_norm(x.double(), None, w.double(), 1e-5)
    with pytest.raises(ValueError, match="add_rms_norm"):
        kernels.add_rms_norm(x, torch.randn(3, 8).t().contiguous().t(), w, 1e-5)
    with pytest.raises(ValueError, match="silu_mul"):
        kernels.silu_mul(torch.randn(3, 7))
    heads, cos, sin, positions, slot_ids, cache, _ = _rope_case(0)
    with pytest.raises(ValueError, match="rope_cache_write: heads"):
        kernels.rope_cache_write(
            heads, cos[:, :8], sin[:, :8], positions, slot_ids, cache[0, 1], cache[1, 1], 6
        )
    with pytest.raises(ValueError, match="rope_cache_write: heads"):
        kernels.rope_cache_write(
            heads, cos, sin, positions, slot_ids, cache[0, 1], cache[1, 1, :, :1], 6
        )
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 24\)"):
        kernels.check_rows(torch.tensor([3, 24]), torch.tensor([0, 1]), 24, 5)
    with pytest.raises(ValueError, match=r"slots in \[0, 5\)"):
        kernels.check_rows(torch.tensor([3, 4]), torch.tensor([0, -1]), 24, 5)


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_long_calls_and_give_the_same_bits(threads):
    """Prefill-sized calls are split by rows across threads; every row as on one thread."""
    many = kernels.with_threads(threads)
    x = torch.randn(300, 576, generator=_gen(9))
    delta, weight = torch.randn(300, 576, generator=_gen(10)), torch.rand(576, generator=_gen(11))
    x1, x2 = x.clone(), x.clone()
    assert torch.equal(
        many.add_rms_norm(x2, delta, weight, 1e-5), kernels.add_rms_norm(x1, delta, weight, 1e-5)
    )
    assert torch.equal(x1, x2)
    gate_up = torch.randn(300, 2 * 1536, generator=_gen(12))
    assert torch.equal(many.silu_mul(gate_up), kernels.silu_mul(gate_up))
    heads, cos, sin, _, _, cache, _ = _rope_case(
        5, rows=400, q_heads=9, kv=3, dim=64, slots=20, max_len=64
    )
    places = torch.randperm(20 * 64, generator=_gen(13))[:400]  # distinct (slot, position)
    slot_ids, positions = places // 64, places % 64
    h1, h2, c1, c2 = heads.clone(), heads.clone(), cache.clone(), cache.clone()
    kernels.rope_cache_write(h1, cos, sin, positions, slot_ids, c1[0, 1], c1[1, 1], 9)
    many.rope_cache_write(h2, cos, sin, positions, slot_ids, c2[0, 1], c2[1, 1], 9)
    assert torch.equal(h1, h2) and torch.equal(c1, c2)
