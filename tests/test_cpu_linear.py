"""The CPU GEMM routes of the base projections: the small-batch product, the packed layout,
the row-major copy kept for 1–2-row steps without the C kernels, and the panels the panel GEMM
kernel reads for every step — each against F.linear, each chosen by rows."""

import pytest
import torch

from cold_ray.config import EngineConfig
from cold_ray.decoding import ColdParams
from cold_ray.engine import EngineCore, SamplingParams
from cold_ray.kernels import cpu_gemm
from cold_ray.model.lora import (
    ROW_MAJOR_ROWS,
    LoraLinear,
    linear,
    pack_weight,
    packed_linear,
)
from tests.helpers import NO_COMPILER, compiler_present

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


def _route(layer, weight, x):
    """The product the routing rule names for this many rows, computed directly."""
    rows = x.shape[0]
    if layer.panels is not None:
        return cpu_gemm.load()(x, cpu_gemm.to_panels([weight])[0])
    if layer.weight.numel() and rows <= ROW_MAJOR_ROWS:
        return linear(x, weight)
    return packed_linear(x, layer.packed, None)


@pytest.mark.parametrize("copy", ["none", "row-major", "panels"])
def test_lora_linear_reads_each_copy_only_for_its_steps(copy):
    weight, _ = _weights(1, out=48)
    layer = LoraLinear(23, (32, 16), False, max_loras=1, max_rank=4)
    layer.weight.data.copy_(weight)
    kernel = cpu_gemm.load() if copy == "panels" else None
    if copy == "panels" and not compiler_present():
        pytest.skip(NO_COMPILER)
    if kernel:
        layer.use_panels(cpu_gemm.to_panels([weight])[0], kernel)
    elif not layer.pack_base(small_batch=copy == "row-major"):
        pytest.skip("oneDNN packing unavailable in this torch build")
    assert (layer.panels is not None) == (copy == "panels")
    assert (layer.packed is not None) == (copy != "panels")  # panels replace the packed copy
    # one extra copy at most: the row-major weight is kept only as the small-step copy
    assert layer.weight.numel() == (weight.numel() if copy == "row-major" else 0)
    for rows in (1, 2, 3, 4, 5, 32, 33, 64, 257):
        x = torch.randn(rows, 23, generator=torch.Generator().manual_seed(rows))
        got = layer(x, None)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight), **TOL)
        assert torch.equal(got, _route(layer, weight, x)), rows  # the named route, bit for bit
    assert pack_weight(weight.double()) is None  # fp64 (or any non-fp32) is never packed


def _run(path, adapters, **config):
    core = EngineCore(EngineConfig(model=str(path), max_rows=6, max_model_len=64, **config))
    core.register_adapter("a", adapters[0])
    core.register_adapter("b", adapters[1])
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = core.generate([[5, 9, 13, 2]], greedy)  # one row: 1-row steps
    pair = core.generate([[7, 3, 11]], greedy, "a", ColdParams(0.1, 0.5))  # a CoLD pair: 2 rows
    four = core.generate([[4 + i] * (2 + i) for i in range(4)], greedy)  # 3-4 rows
    six = core.generate([[9 + i] * (1 + i) for i in range(6)], greedy)  # 5-6 rows
    long = core.generate([[3] * 40 + [5]], greedy)  # a 41-token prefill
    lora = core.generate([[6, 2, 8], [3, 3]], greedy, "a")  # one adapter on 2 rows: a run
    # side by side: two CoLD pairs of one adapter, then of two (expert rows lead: one run per
    # adapter; the gathered plan is checked against the reference in test_cpu_gemm.py)
    mixed = {}
    pairs = ([("a1", "a", [8, 1, 4]), ("a2", "a", [2, 7])], [("a3", "a", [6]), ("b1", "b", [3, 9])])
    for batch in pairs:
        for rid, name, prompt in batch:
            core.add(core.make_request(prompt, greedy, name, ColdParams(0.1, 0.5), request_id=rid))
            mixed[rid] = []
        while core.has_work():
            for out in core.step():
                mixed[out.request_id] += out.token_ids
    assert all(len(t) == 12 for t in mixed.values())
    return [r["token_ids"] for r in alone + pair + four + six + long + lora] + list(mixed.values())


def test_engine_tokens_do_not_depend_on_the_small_batch_copy_or_kernels(tiny_llama, tiny_adapters):
    """Every CPU route of a step, base and LoRA, gives the same greedy tokens, on one thread
    and on two."""
    packed_only = _run(tiny_llama, tiny_adapters, small_batch_weights=False, cpu_gemm_kernel=False)
    assert _run(tiny_llama, tiny_adapters, cpu_gemm_kernel=False) == packed_only  # row-major
    assert _run(tiny_llama, tiny_adapters) == packed_only  # panels + LoRA kernel, where built
    torch_ops = _run(tiny_llama, tiny_adapters, cpu_rowwise_kernels=False)
    assert torch_ops == packed_only  # norms, rotary embedding, SiLU in torch
    threads = torch.get_num_threads()
    try:
        assert _run(tiny_llama, tiny_adapters, num_threads=2) == packed_only
    finally:
        torch.set_num_threads(threads)
