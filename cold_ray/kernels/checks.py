"""Argument checks shared by every kernel wrapper, run before any launch.

Each check raises ValueError (shapes, strides, devices, index range) or TypeError (dtypes) with
both the expected and the actual value. They run on every LoRA call, so the happy path is one
boolean expression of attribute reads (about 1 µs); the explaining branch runs only on failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cold_ray.kernels.dispatch import LoraBatch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_lora(
    x: torch.Tensor,  # [rows, in]
    A: torch.Tensor,  # [slots, r, in]
    B: torch.Tensor,  # [slots, out, r]
    scale: torch.Tensor,  # [slots]
    batch: LoraBatch,
    y: torch.Tensor,  # [rows, out]
) -> None:
    """Check the `lora_delta` contract: shapes, one dtype, unit inner strides, index range."""
    xs, As, Bs, ys = x.shape, A.shape, B.shape, y.shape  # tuples: int compares are cheapest
    if (
        len(xs) == 2
        and len(As) == 3
        and len(Bs) == 3
        and len(ys) == 2
        and xs[0] == ys[0] == batch.rows
        and xs[1] == As[2]
        and Bs[0] == As[0]
        and Bs[2] == As[1]
        and ys[1] == Bs[1]
        and scale.shape == (As[0],)
        and batch.max_slot < As[0]
        and x.dtype == A.dtype == B.dtype == y.dtype
        and x.dtype in FLOAT_DTYPES
        and x.is_contiguous()
        and y.stride(1) == 1
        and A.stride(2) == 1
        and B.stride(2) == 1
    ):
        return
    _explain_lora(x, A, B, scale, batch, y)


def _explain_lora(x, A, B, scale, batch, y) -> None:
    expect_dim("x", x, 2, "[rows, in]")
    expect_dim("A", A, 3, "[slots, r, in]")
    expect_dim("B", B, 3, "[slots, out, r]")
    expect_dim("y", y, 2, "[rows, out]")
    expect_dim("scale", scale, 1, "[slots]")
    slots, r, d_in = A.shape
    expect_eq("x rows", x.shape[0], "batch rows (from prepare(idx))", batch.rows)
    expect_eq("y rows", y.shape[0], "batch rows (from prepare(idx))", batch.rows)
    expect_eq("x in-features", x.shape[1], "A in-features (A.shape[2])", d_in)
    expect_eq("B slots", B.shape[0], "A slots", slots)
    expect_eq("B rank (B.shape[2])", B.shape[2], "A rank (A.shape[1])", r)
    expect_eq("y out-features", y.shape[1], "B out-features (B.shape[1])", B.shape[1])
    expect_eq("scale length", scale.shape[0], "A slots", slots)
    check_slot_range(batch.max_slot, slots)
    expect_float("x", x)
    for name, t in (("A", A), ("B", B), ("y", y)):
        if t.dtype != x.dtype:
            raise TypeError(
                f"{name} dtype {t.dtype} differs from x dtype {x.dtype}; expected one dtype"
            )
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous [rows, in]; got strides {tuple(x.stride())}")
    for name, t in (("y", y), ("A", A), ("B", B)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} last dim must have stride 1, got strides {tuple(t.stride())}")
    raise ValueError(  # unreachable: every condition of the fast path is explained above
        f"lora_delta arguments rejected: x {tuple(x.shape)}, A {tuple(A.shape)}, "
        f"B {tuple(B.shape)}, y {tuple(y.shape)}, scale {tuple(scale.shape)}"
    )


def check_shrink(x: torch.Tensor, A: torch.Tensor, batch: LoraBatch) -> None:
    expect_dim("x", x, 2, "[rows, in]")
    expect_dim("A", A, 3, "[slots, r, in]")
    expect_eq("x rows", x.shape[0], "batch rows (from prepare(idx))", batch.rows)
    expect_eq("x in-features", x.shape[1], "A in-features (A.shape[2])", A.shape[2])
    check_slot_range(batch.max_slot, A.shape[0])
    expect_float("x", x)
    if A.dtype != x.dtype:
        raise TypeError(f"A dtype {A.dtype} differs from x dtype {x.dtype}; expected one dtype")
    if not x.is_contiguous() or A.stride(2) != 1:
        raise ValueError(
            f"x must be contiguous and A's last dim stride 1; got x strides {tuple(x.stride())}, "
            f"A strides {tuple(A.stride())}"
        )


def check_expand(t, B, scale, batch: LoraBatch, y) -> None:
    expect_dim("t", t, 2, "[rows, r]")
    expect_dim("B", B, 3, "[slots, out, r]")
    expect_dim("scale", scale, 1, "[slots]")
    expect_dim("y", y, 2, "[rows, out]")
    expect_eq("t rows", t.shape[0], "batch rows (from prepare(idx))", batch.rows)
    expect_eq("y rows", y.shape[0], "batch rows (from prepare(idx))", batch.rows)
    expect_eq("t rank (t.shape[1])", t.shape[1], "B rank (B.shape[2])", B.shape[2])
    expect_eq("y out-features", y.shape[1], "B out-features (B.shape[1])", B.shape[1])
    expect_eq("scale length", scale.shape[0], "B slots", B.shape[0])
    check_slot_range(batch.max_slot, B.shape[0])
    for name, v in (("t", t), ("B", B), ("y", y)):
        expect_float(name, v)
    if B.dtype != y.dtype:
        raise TypeError(f"B dtype {B.dtype} differs from y dtype {y.dtype}; expected one dtype")
    if not t.is_contiguous() or B.stride(2) != 1 or y.stride(1) != 1:
        raise ValueError(
            f"t must be contiguous and B, y have last-dim stride 1; got t {tuple(t.stride())}, "
            f"B {tuple(B.stride())}, y {tuple(y.stride())}"
        )


def check_slot_range(max_slot: int, slots: int) -> None:
    if max_slot >= slots:
        raise ValueError(
            f"adapter index {max_slot} out of range: the weights hold {slots} slots (0..{slots - 1})"
        )


def expect_dim(name: str, t: torch.Tensor, dim: int, shape: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {shape}, got shape {tuple(t.shape)}")


def expect_eq(name: str, actual: int, expected_name: str, expected: int) -> None:
    if actual != expected:
        raise ValueError(f"{name} is {actual}, expected {expected} to match {expected_name}")


def expect_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} dtype must be one of {FLOAT_DTYPES}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must share one device, got {devices}")


def check_index(idx: torch.Tensor) -> None:
    """`idx: [rows]` integer adapter indices, -1 (no adapter) or a slot number."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"adapter index must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dim() != 1:
        raise ValueError(f"adapter index must be 1-D [rows], got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"adapter index dtype must be an integer type, got {idx.dtype}")


def check_contrastive(
    expert_logits: torch.Tensor,  # [rows, V]
    alpha: torch.Tensor,  # [rows]
    beta: torch.Tensor,  # [rows]
) -> None:
    expect_dim("expert_logits", expert_logits, 2, "[rows, V]")
    expect_float("expert_logits", expert_logits)
    rows = expert_logits.shape[0]
    for name, t in (("alpha", alpha), ("beta", beta)):
        expect_dim(name, t, 1, "[rows]")
        expect_eq(f"{name} length", t.shape[0], "expert_logits rows", rows)
        expect_float(name, t)
    if expert_logits.shape[1] == 0:
        raise ValueError("expert_logits has an empty vocabulary (shape [rows, 0])")


def check_amateur_full(expert_logits: torch.Tensor, amateur_logits: torch.Tensor) -> None:
    expect_dim("amateur_logits", amateur_logits, 2, "[rows, V]")
    expect_float("amateur_logits", amateur_logits)
    if amateur_logits.shape != expert_logits.shape:
        raise ValueError(
            f"amateur_logits shape {tuple(amateur_logits.shape)} must equal expert_logits "
            f"shape {tuple(expert_logits.shape)}"
        )


def check_amateur_head(
    expert_logits: torch.Tensor,  # [rows, V]
    amateur_hidden: torch.Tensor,  # [rows, H]
    lm_head: torch.Tensor,  # [V, H]
) -> None:
    expect_dim("amateur_hidden", amateur_hidden, 2, "[rows, H]")
    expect_dim("lm_head", lm_head, 2, "[V, H]")
    expect_float("amateur_hidden", amateur_hidden)
    expect_float("lm_head", lm_head)
    expect_eq(
        "amateur_hidden rows", amateur_hidden.shape[0], "expert_logits rows", expert_logits.shape[0]
    )
    expect_eq(
        "lm_head vocabulary (lm_head.shape[0])",
        lm_head.shape[0],
        "expert_logits V",
        expert_logits.shape[1],
    )
    expect_eq(
        "lm_head hidden (lm_head.shape[1])",
        lm_head.shape[1],
        "amateur_hidden H",
        amateur_hidden.shape[1],
    )
