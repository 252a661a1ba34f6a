"""Row-wise operations of a forward pass on CPU: `cpu_rowwise.c` (built by `cpu_kernels.py`).

Residual add + RMS norm, rotary embedding + KV-cache write, and SiLU·mul, each one C call on
fp32 rows where torch runs a chain of small operators (≈ 8 for an RMS norm): at a decode step
of a few rows these chains, not arithmetic, cost milliseconds. Threads split the rows of calls
large enough to pay for it (prefill chunks). Where the library cannot be built, `load()`
returns None and the model keeps torch's operators.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from cold_ray.kernels import cpu_kernels


@cache
def load() -> RowwiseKernels | None:
    """The compiled kernels (one thread; `with_threads` for more), or None where they cannot be
    built or loaded."""
    lib = cpu_kernels.library()
    return None if lib is None else RowwiseKernels(lib)


_F32 = torch.float32


def _f32(t: torch.Tensor) -> bool:
    """Contiguous CPU fp32 (a call per tensor: generators cost more than the C call itself)."""
    return t.dtype == _F32 and t.is_cpu and t.is_contiguous()


class RowwiseKernels(cpu_kernels.Threaded):
    def __init__(self, lib: ctypes.CDLL):
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._norm = lib.add_rms_norm
        self._norm.argtypes = [ptr] * 4 + [i64, i64, ctypes.c_float, i32]
        self._norm.restype = None
        self._rope = lib.rope_cache_write
        self._rope.argtypes = [ptr] * 7 + [i64] * 7 + [i32, i32]
        self._rope.restype = None
        self._silu = lib.silu_mul
        self._silu.argtypes = [ptr, ptr, i64, i64, i32]
        self._silu.restype = None

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """x [rows, n] += delta (in place; None: nothing to add), then RMS-normed and scaled by
        weight [n]: a new [rows, n]."""
        rows, n = x.shape
        if not (
            _f32(x)
            and _f32(weight)
            and weight.shape == (n,)
            and (delta is None or (_f32(delta) and delta.shape == x.shape))
        ):
            raise ValueError(
                f"add_rms_norm: contiguous CPU fp32 x [rows, n], delta like x, "
                f"weight [n] expected; got x {list(x.shape)}, weight "
                f"{list(weight.shape)}"
            )
        y = torch.empty_like(x)
        self._norm(
            x.data_ptr(),
            None if delta is None else delta.data_ptr(),
            weight.data_ptr(),
            y.data_ptr(),
            rows,
            n,
            eps,
            self.threads,
        )
        return y

    def rope_cache_write(
        self,
        heads: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        q_heads: int,
    ) -> None:
        """heads [rows, q_heads + 2 kv, dim] (q, k, v heads): q and k rotated in place by the
        rows' positions (cos/sin tables [max_len, dim]); k and v written into one layer's cache
        [slots, kv, max_len, dim] at (slots[r], positions[r]), fp32 or rounded to the bf16
        cache's precision (nearest-even, as `Tensor.to` rounds). The caller checks positions
        and slots once per forward pass (`check_rows`): every layer writes at the same places."""
        rows, width, dim = heads.shape
        kv = (width - q_heads) // 2
        _, cache_kv, max_len, cache_dim = k_cache.shape
        if not (
            _f32(heads)
            and _f32(cos)
            and _f32(sin)
            and k_cache.stride() == v_cache.stride()
            and k_cache.shape == v_cache.shape
            and k_cache.dtype == v_cache.dtype
            and k_cache.dtype in (_F32, torch.bfloat16)
            and k_cache.stride(-1) == 1
            and cache_kv == kv
            and cache_dim == dim
            and cos.shape == sin.shape == (max_len, dim)
            and positions.shape == slots.shape == (rows,)
            and positions.dtype == slots.dtype == torch.int64
            and positions.is_contiguous()
            and slots.is_contiguous()
        ):
            raise ValueError(
                f"rope_cache_write: heads [rows, {q_heads} + 2 kv, dim] and "
                f"[max_len, dim] tables, CPU fp32, and a layer cache [slots, kv, "
                f"max_len, dim], fp32 or bf16, expected; got heads "
                f"{list(heads.shape)}, cache {k_cache.dtype} {list(k_cache.shape)}, "
                f"tables {list(cos.shape)}"
            )
        self._rope(
            heads.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            positions.data_ptr(),
            slots.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            rows,
            q_heads,
            kv,
            dim,
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            int(k_cache.dtype == torch.bfloat16),
            self.threads,
        )

    @staticmethod
    def check_rows(
        positions: torch.Tensor, slots: torch.Tensor, max_len: int, max_slots: int
    ) -> None:
        """Every position in [0, max_len) and slot in [0, max_slots): the kernel writes there."""
        if not positions.numel():
            return
        (p_lo, p_hi), (s_lo, s_hi) = positions.aminmax(), slots.aminmax()
        if not (
            0 <= int(p_lo) and int(p_hi) < max_len and 0 <= int(s_lo) and int(s_hi) < max_slots
        ):
            raise ValueError(
                f"rope_cache_write: positions must lie in [0, {max_len}) and slots "
                f"in [0, {max_slots})"
            )

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [rows, 2 n] -> silu(gate_up[:, :n]) * gate_up[:, n:], [rows, n]."""
        rows, width = gate_up.shape
        if not (_f32(gate_up) and width % 2 == 0):
            raise ValueError(
                f"silu_mul: contiguous CPU fp32 [rows, 2 n] expected, got "
                f"{gate_up.dtype} {list(gate_up.shape)}"
            )
        y = gate_up.new_empty(rows, width // 2)
        self._silu(gate_up.data_ptr(), y.data_ptr(), rows, width // 2, self.threads)
        return y
