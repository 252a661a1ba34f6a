"""Decode-sized products on CPU: `cpu_small_gemm.c` (built by `cpu_kernels.py`) over weights
laid out in panels of 16 output features, in memory backed by 2 MiB pages.

A decode step of a few rows reads every weight once for a few FLOPs each: its speed is the
speed of streaming the weights. MKL's GEMV / two-column GEMM on the row-major weight and
oneDNN's packed layout reach ≈ 11–20 GB/s on this CPU at 1–2 rows; the panel kernel streams
each weight front to back in one pass at ≈ 25–30 GB/s, and stays level with or ahead of the
packed layout up to 32 rows (`cold-ray bench gemm`). With 4 KiB pages one core's reads stall
on TLB misses; transparent huge pages (`madvise`) lift a plain sum from ≈ 22 to ≈ 29–34 GiB/s
(`cold-ray bench roofline`, `bandwidth_gib_s_by_pages`).
Where the library cannot be built, `load()` returns None and the model keeps BLAS.
"""

from __future__ import annotations

import ctypes
import mmap
from functools import cache

import torch

from cold_ray.kernels import cpu_kernels

PANEL = 16  # output features per panel: one 64-byte fp32 vector
HUGE_PAGE = 2**21


def huge_page_empty(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised 1-D tensor whose memory Linux is asked to back with 2 MiB pages
    (`MADV_HUGEPAGE`; honoured where transparent huge pages are `always` or `madvise`). Plain
    torch memory where the platform has no such advice or the tensor is under one page."""
    nbytes = numel * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return torch.empty(numel, dtype=dtype)
    try:  # private anonymous memory: a shared mapping would follow the shmem huge-page setting
        buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # e.g. a mapping-count limit: torch's allocator may still manage
        return torch.empty(numel, dtype=dtype)
    try:
        buf.madvise(advice)
    except OSError:  # huge pages turned off: 4 KiB pages, same contents
        pass
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # the tensor keeps `buf` alive
    start = -raw.data_ptr() % HUGE_PAGE  # align, so whole 2 MiB pages can back it
    return raw[start : start + nbytes].view(dtype)


def to_panels(weights: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each weight [out, in] as panels [out / 16, in, 16] (panels[p, k, j] = weight[16p + j, k]),
    or None where the kernel cannot take it (not CPU fp32, or out features not a multiple of
    16). All in one huge-page buffer: a buffer per weight would leave a partly used 2 MiB page
    resident behind each."""
    fits = [w.dtype == torch.float32 and w.device.type == "cpu" and w.shape[0] % PANEL == 0
            for w in weights]  # fmt: skip
    buffer = huge_page_empty(sum(w.numel() for w, ok in zip(weights, fits) if ok))
    out, start = [], 0  # every start is a multiple of 16 floats: 64-byte aligned panels
    for w, ok in zip(weights, fits):
        if not ok:
            out.append(None)
            continue
        rows, k = w.shape
        panels = buffer[start : start + w.numel()].view(rows // PANEL, k, PANEL)
        panels.copy_(w.detach().view(rows // PANEL, PANEL, k).transpose(1, 2))
        out.append(panels)
        start += w.numel()
    return out


@cache
def load() -> SmallGemmKernel | None:
    """The compiled kernel, or None where it cannot be built or loaded."""
    lib = cpu_kernels.library()
    return None if lib is None else SmallGemmKernel(lib)


class SmallGemmKernel:
    MAX_LORA_ROWS, MAX_RANK = 4, 1024  # lora_small's limits (its stack buffer)

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.small_gemm
        self._fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
        self._fn.restype = None
        self._lora = lib.lora_small
        ptr = ctypes.c_void_p
        self._lora.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr] + [ctypes.c_int64] * 5
        self._lora.restype = ctypes.c_int

    def __call__(self, x: torch.Tensor, panels: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """x: [rows, in] CPU fp32; panels: from `to_panels`; bias: [out] or None ->
        [rows, out]. Four rows read the weights once; more rows read them once per four."""
        rows, k = x.shape
        out = panels.shape[0] * PANEL
        if x.dtype != torch.float32 or x.device.type != "cpu" or k != panels.shape[1]:
            raise ValueError(f"small GEMM kernel: CPU fp32 [rows, {panels.shape[1]}] input "
                             f"expected, got {x.dtype} {list(x.shape)} on {x.device}")  # fmt: skip
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out,)):
            raise ValueError(f"small GEMM kernel: fp32 bias of {out} features expected")
        x = x.contiguous()
        bias = None if bias is None else bias.contiguous()  # held: the kernel reads its memory
        y = x.new_empty(rows, out)
        self._fn(x.data_ptr(), panels.data_ptr(), None if bias is None else bias.data_ptr(),
                 y.data_ptr(), rows, k, out)  # fmt: skip
        return y

    def lora(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slot: int, scale: float,
             y: torch.Tensor, start: int, end: int) -> None:  # fmt: skip
        """y[start:end] += scale * (x[start:end] @ A[slot].T) @ B[slot].T in place, for up to 4
        rows, straight from the LoRA buffers: x [rows, in] and A [slots, r, in], B [slots, out,
        r] contiguous, y [rows, out] with unit inner stride, all CPU fp32. Pointers, not views:
        a step makes 120+ of these calls."""
        slots, rank, k = A.shape
        out, f32 = B.shape[1], torch.float32
        if not (0 <= start < end <= x.shape[0] and end - start <= self.MAX_LORA_ROWS
                and 0 <= slot < slots and rank <= self.MAX_RANK and x.shape[1] == k
                and B.shape[0] == slots and B.shape[2] == rank and y.shape[1] == out
                and y.shape[0] == x.shape[0] and y.stride(1) == 1
                and x.dtype == f32 and A.dtype == f32 and B.dtype == f32 and y.dtype == f32
                and x.is_contiguous() and A.is_contiguous() and B.is_contiguous()):  # fmt: skip
            raise ValueError(f"small LoRA kernel: up to {self.MAX_LORA_ROWS} rows of one slot, "
                             f"rank up to {self.MAX_RANK}, contiguous fp32 buffers expected; got "
                             f"rows [{start}, {end}) of x {list(x.shape)}, slot {slot} of A "
                             f"{list(A.shape)}, B {list(B.shape)}, y {list(y.shape)}")  # fmt: skip
        row = y.stride(0)
        self._lora(x.data_ptr() + 4 * start * k, A.data_ptr() + 4 * slot * rank * k,
                   B.data_ptr() + 4 * slot * out * rank, scale, y.data_ptr() + 4 * start * row,
                   end - start, k, rank, out, row)  # fmt: skip
