"""Backend choice: once, from the device and what is installed, or forced by name; logged."""

from __future__ import annotations

import logging

import pytest
import torch

from cold_ray.kernels import BACKEND_NAMES, auto_backend_name, dispatch, select_backend
from cold_ray.kernels.ascend_native import AscendNativeBackend, native_ops_available
from cold_ray.kernels.dispatch import triton_importable
from tests.helpers import NO_TRITON
from tests.kernels.kernel_checks import assert_base_rows_untouched, assert_close, make_case


def test_auto_on_cpu_is_grouped_and_logged(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="cold_ray.kernels.dispatch"):
        backend = select_backend("auto", "cpu")
    assert backend.name == "grouped"
    assert "LoRA backend: grouped on cpu" in caplog.text


@pytest.mark.parametrize("name", ["reference", "gather_bmm", "grouped"])
def test_forced_names_work_on_cpu(name: str) -> None:
    backend = select_backend(name, "cpu")
    assert backend.name == name and name in BACKEND_NAMES


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown LoRA backend 'cuda_fast'; expected one of"):
        select_backend("cuda_fast")


@pytest.mark.parametrize(
    "device, triton, ascend, expected",
    [
        ("cuda", True, False, "triton"),
        ("cuda", False, False, "grouped"),
        ("npu", True, True, "ascend_native"),
        ("npu", True, False, "triton"),
        ("npu", False, False, "grouped"),
        ("cpu", True, True, "grouped"),
    ],
)
def test_auto_rules(monkeypatch, device, triton, ascend, expected) -> None:
    monkeypatch.setattr(dispatch, "triton_importable", lambda: triton)
    monkeypatch.setattr(dispatch, "ascend_native_available", lambda: ascend)
    assert auto_backend_name(device)[0] == expected


def test_gather_bmm_is_never_auto_picked(monkeypatch) -> None:
    for triton in (True, False):
        for ascend in (True, False):
            monkeypatch.setattr(dispatch, "triton_importable", lambda t=triton: t)
            monkeypatch.setattr(dispatch, "ascend_native_available", lambda a=ascend: a)
            for device in ("cpu", "cuda", "npu"):
                assert auto_backend_name(device)[0] != "gather_bmm"


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch) -> None:
    if not triton_importable():
        pytest.skip(NO_TRITON)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend("triton", "cpu")


def test_ascend_native_unavailable_here_is_a_clear_error() -> None:
    if native_ops_available():
        pytest.skip("vllm-ascend is installed")
    with pytest.raises(RuntimeError, match="needs torch_npu and vllm-ascend"):
        select_backend("ascend_native", "cpu")


@pytest.fixture(scope="module")
def fake_ascend_ops():
    """Stand-ins for torch.ops._C_ascend.bgmv_shrink/expand with the documented semantics
    (vllm-ascend's op tests): pins the wrapper's argument order and scaling, not the kernels."""
    if native_ops_available():
        pytest.skip("real vllm-ascend ops present")
    lib = torch.library.Library("_C_ascend", "FRAGMENT")
    lib.define("bgmv_shrink(Tensor x, Tensor w, Tensor indices, Tensor(a!) y, float scale) -> ()")
    lib.define(
        "bgmv_expand(Tensor x, Tensor w, Tensor indices, Tensor(a!) y, int off, int size) -> ()"
    )

    def shrink(x, w, indices, y, scale):
        for i, k in enumerate(indices.tolist()):
            if k >= 0:
                y[i] += scale * (x[i].float() @ w[k].float().T)

    def expand(x, w, indices, y, off, size):
        for i, k in enumerate(indices.tolist()):
            if k >= 0:
                y[i, off : off + size] = (
                    y[i, off : off + size].float() + x[i].float() @ w[k].float().T
                ).to(y.dtype)

    lib.impl("bgmv_shrink", shrink, "CPU")
    lib.impl("bgmv_expand", expand, "CPU")
    yield
    del lib


@pytest.mark.parametrize("mix", ["uniform", "interleaved_base", "all_base"])
def test_ascend_native_wrapper_against_stand_in_ops(fake_ascend_ops, mix: str) -> None:
    backend = AscendNativeBackend("cpu", require_ops=False)
    case = make_case(9, 6, 40, 24, torch.float32, mix)
    batch = backend.prepare(case.idx)
    y = case.y.clone()
    backend.lora_delta(case.x, case.A, case.B, case.scale, batch, y)
    assert_close(y, case.expected(), torch.float32, f"ascend_native stand-in {mix}")
    assert_base_rows_untouched(y, case, "ascend_native stand-in")
    t = backend.shrink(case.x, case.A, batch)
    y2 = case.y.clone()
    backend.expand(t, case.B, case.scale, batch, y2)
    assert_close(y2, case.expected(), torch.float32, f"ascend_native shrink+expand {mix}")
