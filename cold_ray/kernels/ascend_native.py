"""Ascend native LoRA path: vllm-ascend's Ascend C `bgmv_shrink` / `bgmv_expand` ops.

Written against the documented vllm-ascend API (`vllm_ascend/lora/lora_ops.py` and its op
tests); it CANNOT run on this project's CPU CI — it needs an Ascend NPU, torch_npu and
vllm-ascend. Its tests run the wrapper against stand-in ops registered under the same names,
which pins the argument order and the per-slot scaling, not the Ascend C kernels themselves.

The ops, as documented:
    torch.ops._C_ascend.bgmv_shrink(x, w, indices, y, scaling)
        y[i] += scaling * x[i] @ w[indices[i]].T      x: [rows, in], w: [slots, r, in], y: [rows, r]
    torch.ops._C_ascend.bgmv_expand(x, w, indices, y, slice_offset, slice_size)
        y[i, off:off+size] += x[i] @ w[indices[i]].T  x: [rows, r], w: [slots, out, r]
    Rows with indices[i] < 0 are skipped by both.
`scaling` is one float for the call, while our `scale` is per slot: the wrapper shrinks with
1.0 and scales each row of the fp32 intermediate by scale[idx[i]] before expanding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cold_ray.kernels.dispatch import LoraBackend, LoraBatch


def native_ops_available() -> bool:
    """True when vllm-ascend's custom ops are importable and registered (never on CPU CI)."""
    try:
        import torch_npu  # noqa: F401
    except Exception:  # torch_npu raises more than ImportError without CANN
        return False
    try:
        from vllm_ascend.utils import enable_custom_op

        enable_custom_op()
    except Exception:
        try:
            import vllm_ascend.vllm_ascend_C  # noqa: F401
        except Exception:
            return False
    return _ops_registered()


def _ops_registered() -> bool:
    try:
        ns = torch.ops._C_ascend
        return hasattr(ns, "bgmv_shrink") and hasattr(ns, "bgmv_expand")
    except (AttributeError, RuntimeError):
        return False


class AscendNativeBackend(LoraBackend):
    name = "ascend_native"

    def __init__(self, device: torch.device | str = "npu", *, require_ops: bool = True) -> None:
        super().__init__(device)
        if require_ops and not native_ops_available():
            raise RuntimeError(
                "LoRA backend 'ascend_native' needs torch_npu and vllm-ascend (its "
                "torch.ops._C_ascend.bgmv_shrink/bgmv_expand); not found. Use 'triton' "
                "(triton-ascend) or 'grouped'."
            )

    def prepare(self, idx: torch.Tensor | Sequence[int]) -> LoraBatch:
        batch = super().prepare(idx)
        batch.safe_idx = batch.idx.clamp(min=0)  # [rows] for the per-row scale gather
        return batch

    def _lora_delta(self, x, A, B, scale, batch: LoraBatch, y) -> None:
        """Ascend C BGMV shrink (scaling 1.0), the per-slot scale on the fp32 intermediate,
        then expand; -1 rows are skipped by the ops."""
        if x.device != y.device or A.device != x.device or batch.idx.device != x.device:
            raise ValueError(
                f"x {x.device}, A {A.device}, y {y.device} and idx {batch.idx.device} must "
                "share the NPU"
            )
        t = torch.zeros(batch.rows, A.shape[1], dtype=torch.float32, device=x.device)  # [rows, r]
        ops = torch.ops._C_ascend
        ops.bgmv_shrink(x, A, batch.idx, t, 1.0)
        t.mul_(scale.index_select(0, batch.safe_idx).float().unsqueeze(1))
        ops.bgmv_expand(t, B, batch.idx, y, 0, y.shape[1])

    def _shrink(self, x, A, batch: LoraBatch) -> torch.Tensor:
        t = torch.zeros(batch.rows, A.shape[1], dtype=torch.float32, device=x.device)
        if batch.plan != "none":
            torch.ops._C_ascend.bgmv_shrink(x, A, batch.idx, t, 1.0)
        return t

    def _expand(self, t, B, scale, batch: LoraBatch, y) -> None:
        ts = t.float() * scale.index_select(0, batch.safe_idx).float().unsqueeze(1)
        torch.ops._C_ascend.bgmv_expand(ts, B, batch.idx, y, 0, y.shape[1])
