"""The CPU GEMM routes of the base projections: the small-batch product, the packed layout,
and the row-major copy kept for 1–2-row steps — each against F.linear, each chosen by rows."""

import pytest
import torch

from cold_ray.config import EngineConfig
from cold_ray.decoding import ColdParams
from cold_ray.engine import EngineCore, SamplingParams
from cold_ray.model.lora import ROW_MAJOR_ROWS, LoraLinear, linear, pack_weight, packed_linear

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, another summation order


def _weights(seed=0, out=37, inp=23):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=gen), torch.randn(out, generator=gen)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_small_batch_product_matches_f_linear(rows):
    weight, bias = _weights()
    x = torch.randn(rows, 23, generator=torch.Generator().manual_seed(rows))
    want = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    got = linear(x, weight, bias)
    assert got.shape == (rows, 37) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("keep", [True, False])
def test_lora_linear_reads_the_row_major_copy_only_for_small_steps(keep):
    weight, _ = _weights(1)
    layer = LoraLinear(23, (20, 17), False, max_loras=1, max_rank=4)
    layer.weight.data.copy_(weight)
    if not layer.pack_base(keep_row_major=keep):
        pytest.skip("oneDNN packing unavailable in this torch build")
    assert layer.weight.numel() == (weight.numel() if keep else 0)  # dropped: no extra memory
    for rows in range(1, 6):
        x = torch.randn(rows, 23, generator=torch.Generator().manual_seed(rows))
        got = layer(x, None)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight), **TOL)
        route = linear(x, weight) if keep and rows <= ROW_MAJOR_ROWS else packed_linear(
            x, layer.packed, None)  # fmt: skip
        assert torch.equal(got, route), rows  # the route the rule names, bit for bit
    assert pack_weight(weight.double()) is None  # fp64 (or any non-fp32) is never packed


def _run(path, adapters, small_batch_weights):
    core = EngineCore(EngineConfig(model=str(path), max_rows=4, max_model_len=64,
                                   small_batch_weights=small_batch_weights))  # fmt: skip
    core.register_adapter("a", adapters[0])
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = core.generate([[5, 9, 13, 2]], greedy)  # one row: 1-row steps
    pair = core.generate([[7, 3, 11]], greedy, "a", ColdParams(0.1, 0.5))  # a CoLD pair: 2 rows
    four = core.generate([[4 + i] * (2 + i) for i in range(4)], greedy)  # 3-4 rows: packed
    return [r["token_ids"] for r in alone + pair + four]


def test_engine_tokens_do_not_depend_on_the_small_batch_copy(tiny_llama, tiny_adapters):
    assert _run(tiny_llama, tiny_adapters, True) == _run(tiny_llama, tiny_adapters, False)
