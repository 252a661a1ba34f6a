"""Decode attention on CPU: `cpu_decode_attention.c` (built by `cpu_kernels.py`).

A decode token has only its GQA group of query rows per K/V head (3 for SmolLM2), so torch's
CPU SDPA spends its time setting up one tiny GEMM pair per (row, head) rather than reading the
cache: ≈ 6 GB/s over SmolLM2's cache at 16 rows, ≈ 15% of a decode step. The C kernel reads
each row's keys and values once, for exactly the positions the row has (no mask, no span
padding), ≈ 2x faster (`cold-ray bench attention`); threads take (token, K/V head) pairs.
Where the library cannot be built, `load()` returns None and the model keeps SDPA.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from cold_ray.kernels import cpu_kernels

KV_DTYPES = (torch.float32, torch.bfloat16)  # what the cache may hold


@cache
def load() -> DecodeAttentionKernel | None:
    """The compiled kernel (one thread; `with_threads` for more), or None where it cannot be
    built or loaded."""
    lib = cpu_kernels.library()
    return None if lib is None else DecodeAttentionKernel(lib)


class DecodeAttentionKernel(cpu_kernels.Threaded):
    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.decode_attention
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fn.argtypes = [ptr] * 6 + [i64] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """q: [n, heads, dim] fp32; k, v: one layer's cache [slots, kv_heads, max_len, dim],
        fp32 or bf16; slots, positions: [n] int64 — token i attends to positions
        0..positions[i] of its slot. Returns [n, heads, dim] fp32.

        Semantics: softmax(q k[:len].float().T / sqrt(dim)) v[:len].float() per query head,
        over its K/V head, in fp32."""
        n, heads, dim = q.shape
        if not (
            q.dtype == torch.float32
            and k.dtype == v.dtype
            and k.dtype in KV_DTYPES
            and k.stride() == v.stride()
            and k.stride(-1) == 1
            and slots.dtype == positions.dtype == torch.int64
            and heads % k.shape[1] == 0
            and k.shape[-1] == dim
            and all(t.device.type == "cpu" for t in (q, k, v, slots, positions))
        ):
            raise ValueError(
                "decode attention kernel: CPU fp32 q, an fp32 or bf16 k/v cache with "
                "matching strides and head sizes, int64 slots/positions "
                f"expected; got q {q.dtype}, cache {k.dtype}"
            )
        q, slots, positions = q.contiguous(), slots.contiguous(), positions.contiguous()
        out = torch.empty_like(q)
        status = self._fn(
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            out.data_ptr(),
            slots.data_ptr(),
            positions.data_ptr(),
            n,
            heads,
            k.shape[1],
            dim,
            k.stride(0),
            k.stride(1),
            k.stride(2),
            dim**-0.5,
            int(k.dtype == torch.bfloat16),
            self.threads,
        )
        if status != 0:
            raise MemoryError("decode attention kernel: out of memory for its score buffer")
        return out
