"""Every CPU LoRA implementation equals the fp32 reference over a sweep; -1 rows bit-identical."""

from __future__ import annotations

import pytest
import torch

from cold_ray.benchmarks.workloads import MIX_KINDS
from cold_ray.kernels import reference, select_backend
from tests.kernels.kernel_checks import (
    assert_base_rows_untouched,
    assert_close,
    make_case,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, rank, in, out): rank 1-64 incl. non-powers of two, odd in/out sizes, rows 1-128.
SHAPES = [
    (1, 1, 16, 16),
    (3, 7, 33, 17),
    (8, 8, 64, 96),
    (17, 16, 129, 75),
    (32, 33, 48, 131),
    (64, 64, 100, 64),
    (128, 12, 257, 31),
    (128, 64, 64, 200),
]


@pytest.mark.parametrize("mix", MIX_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["gather_bmm", "grouped"])
def test_lora_delta_matches_reference(impl: str, dtype: torch.dtype, mix: str) -> None:
    backend = select_backend(impl)
    for n, (rows, rank, d_in, d_out) in enumerate(SHAPES):
        case = make_case(rows, rank, d_in, d_out, dtype, mix, seed=n)
        y = case.y.clone()
        backend.lora_delta(case.x, case.A, case.B, case.scale, backend.prepare(case.idx), y)
        assert_close(y, case.expected(), dtype, f"{impl} lora_delta {case.describe()}")
        assert_base_rows_untouched(y, case, f"{impl} lora_delta")


@pytest.mark.parametrize("mix", MIX_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["reference", "gather_bmm", "grouped"])
def test_shrink_expand_match_reference(impl: str, dtype: torch.dtype, mix: str) -> None:
    backend = select_backend(impl)
    for n, (rows, rank, d_in, d_out) in enumerate(SHAPES[:6]):
        case = make_case(rows, rank, d_in, d_out, dtype, mix, seed=100 + n)
        batch = backend.prepare(case.idx)
        t = backend.shrink(case.x, case.A, batch)
        assert t.dtype == torch.float32
        t_ref = reference.shrink(case.x, case.A, case.idx)
        assert_close(t, t_ref, dtype, f"{impl} shrink {case.describe()}")
        assert torch.equal(t[case.idx < 0], torch.zeros_like(t[case.idx < 0]))
        y = case.y.clone()
        backend.expand(t_ref, case.B, case.scale, batch, y)
        y_ref = case.y.clone()
        reference.expand(t_ref, case.B, case.idx, case.scale, y_ref)
        assert_close(y, y_ref, dtype, f"{impl} expand {case.describe()}")
        assert_base_rows_untouched(y, case, f"{impl} expand")


@pytest.mark.parametrize("impl", ["reference", "gather_bmm", "grouped"])
def test_output_may_be_a_column_slice(impl: str) -> None:
    """y can be a band of a wider (fused) output: row stride != out, last-dim stride 1."""
    backend = select_backend(impl)
    case = make_case(9, 8, 40, 24, torch.float32, "uniform")
    wide = torch.randn(9, 60)
    wide[:, 10:34] = case.y
    before = wide.clone()
    backend.lora_delta(
        case.x, case.A, case.B, case.scale, backend.prepare(case.idx), wide[:, 10:34]
    )
    assert_close(wide[:, 10:34], case.expected(), torch.float32, f"{impl} sliced y")
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 34:], before[:, 34:])


def test_negative_zero_base_rows_stay_bit_identical() -> None:
    """-0.0 + 0.0 is +0.0: an implementation that adds a zero delta to -1 rows fails this."""
    case = make_case(6, 4, 8, 8, torch.float32, "interleaved_base")
    case.y[case.idx < 0] = -0.0
    for impl in ("reference", "gather_bmm", "grouped"):
        backend = select_backend(impl)
        y = case.y.clone()
        backend.lora_delta(case.x, case.A, case.B, case.scale, backend.prepare(case.idx), y)
        base = y[case.idx < 0]
        assert torch.equal(base.view(torch.int32), case.y[case.idx < 0].view(torch.int32)), impl


@pytest.mark.parametrize(
    "idx, plan, segments",
    [
        ([-1, -1, -1], "none", ()),
        ([2, 2, 2, 2], "runs", ((2, 0, 4),)),
        ([1, 1, -1, 0, 0], "runs", ((1, 0, 2), (0, 3, 5))),
        ([3, -1, 3, -1], "gather", ((3, 0, 2),)),
        ([1, 0, 1, -1, 0], "gather", ((0, 0, 2), (1, 2, 4))),
    ],
)
def test_grouped_plan_is_built_once_in_prepare(idx, plan, segments) -> None:
    batch = select_backend("grouped").prepare(torch.tensor(idx))
    assert batch.plan == plan
    assert batch.segments == segments
    assert batch.rows == len(idx)
    assert batch.max_slot == max(idx)
    if plan == "gather":
        expected = [
            i for k in sorted({k for k in idx if k >= 0}) for i, j in enumerate(idx) if j == k
        ]
        assert batch.perm.tolist() == expected
