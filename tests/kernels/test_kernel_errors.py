"""Bad shapes, dtypes, strides and adapter indices raise clear errors before any launch."""

from __future__ import annotations

import pytest
import torch

from cold_ray.kernels import select_backend
from cold_ray.kernels.dispatch import triton_importable
from tests.kernels.kernel_checks import make_case

IMPLS = ["reference", "gather_bmm", "grouped"] + (["triton"] if triton_importable() else [])


@pytest.fixture(params=IMPLS)
def backend(request):
    return select_backend(request.param)


def _call(backend, case, **overrides):
    args = dict(x=case.x, A=case.A, B=case.B, scale=case.scale, y=case.y.clone())
    args.update(overrides)
    batch = overrides.pop("batch", None) or backend.prepare(case.idx)
    backend.lora_delta(args["x"], args["A"], args["B"], args["scale"], batch, args["y"])


def test_in_features_mismatch_names_both_sizes(backend) -> None:
    case = make_case(4, 8, 32, 16, torch.float32, "uniform")
    with pytest.raises(ValueError, match=r"x in-features is 31, expected 32"):
        _call(backend, case, x=case.x[:, :31].contiguous())


def test_rows_mismatch(backend) -> None:
    case = make_case(4, 8, 32, 16, torch.float32, "uniform")
    with pytest.raises(ValueError, match=r"x rows is 3, expected 4"):
        _call(backend, case, x=case.x[:3])


def test_rank_mismatch_between_A_and_B(backend) -> None:
    case = make_case(4, 8, 32, 16, torch.float32, "uniform")
    with pytest.raises(ValueError, match=r"B rank \(B.shape\[2\]\) is 7, expected 8"):
        _call(backend, case, B=case.B[:, :, :7].contiguous())


def test_scale_length_mismatch(backend) -> None:
    case = make_case(4, 8, 32, 16, torch.float32, "uniform", slots=5)
    with pytest.raises(ValueError, match=r"scale length is 4, expected 5"):
        _call(backend, case, scale=case.scale[:4])


def test_y_shape_mismatch(backend) -> None:
    case = make_case(4, 8, 32, 16, torch.float32, "uniform")
    with pytest.raises(ValueError, match=r"y out-features is 15, expected 16"):
        _call(backend, case, y=case.y[:, :15])


def test_dtype_mismatch_is_a_type_error(backend) -> None:
    case = make_case(4, 8, 32, 16, torch.float32, "uniform")
    with pytest.raises(
        TypeError, match=r"A dtype torch.float16 differs from x dtype torch.float32"
    ):
        _call(backend, case, A=case.A.half())
    with pytest.raises(TypeError, match=r"x dtype must be one of"):
        _call(backend, case, x=case.x.long(), A=case.A.long(), B=case.B.long(), y=case.y.long())


def test_non_contiguous_x(backend) -> None:
    case = make_case(4, 8, 32, 16, torch.float32, "uniform")
    x = torch.randn(32, 4).t()  # [4, 32] with strides (1, 4)
    with pytest.raises(ValueError, match=r"x must be contiguous"):
        _call(backend, case, x=x)


def test_adapter_index_out_of_range(backend) -> None:
    case = make_case(4, 8, 32, 16, torch.float32, "uniform", slots=5)
    batch = backend.prepare(torch.tensor([0, 5, -1, 2]))
    with pytest.raises(ValueError, match=r"adapter index 5 out of range: the weights hold 5 slots"):
        backend.lora_delta(case.x, case.A, case.B, case.scale, batch, case.y.clone())
    with pytest.raises(ValueError, match=r"adapter index 5 out of range"):
        backend.shrink(case.x, case.A, batch)


def test_bad_index_tensors_rejected_by_prepare(backend) -> None:
    with pytest.raises(ValueError, match=r"adapter index -2 is invalid"):
        backend.prepare(torch.tensor([0, -2]))
    with pytest.raises(TypeError, match=r"integer type, got torch.float32"):
        backend.prepare(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"1-D \[rows\], got shape \(2, 2\)"):
        backend.prepare(torch.zeros(2, 2, dtype=torch.int64))


def test_contrastive_shape_errors(backend) -> None:
    e = torch.randn(3, 50)
    alpha, beta = torch.full((3,), 0.1), torch.full((3,), 0.5)
    with pytest.raises(ValueError, match=r"amateur_logits shape \(3, 49\) must equal"):
        backend.contrastive_full(e, torch.randn(3, 49), alpha, beta)
    with pytest.raises(ValueError, match=r"alpha length is 2, expected 3"):
        backend.contrastive_full(e, torch.randn(3, 50), alpha[:2], beta)
    with pytest.raises(ValueError, match=r"lm_head vocabulary .* is 49, expected 50"):
        backend.contrastive_restricted(e, torch.randn(3, 8), torch.randn(49, 8), alpha, beta)
    with pytest.raises(ValueError, match=r"lm_head hidden .* is 7, expected 8"):
        backend.contrastive_restricted(e, torch.randn(3, 8), torch.randn(50, 7), alpha, beta)
