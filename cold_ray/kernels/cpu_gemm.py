"""Products of the base weights on CPU: `cpu_gemm.c` (built by `cpu_kernels.py`) over weights
laid out in panels of 16 output features, in memory backed by 2 MiB pages. One copy in this
layout serves steps of any size, decode and prefill.

A decode step of a few rows reads every weight once for a few FLOPs each: its speed is the
speed of streaming the weights. MKL's GEMV / two-column GEMM on the row-major weight and
oneDNN's packed layout reach ≈ 11–20 GB/s on this CPU at 1–2 rows; the panel kernel streams
each weight front to back in one pass at ≈ 25–30 GB/s, and stays level with or ahead of the
packed layout up to 32 rows (`cold-ray bench gemm`); beyond, register blocks of rows sized
to the CPU's vector registers (`cpu_kernels.blocking`) keep it level with oneDNN on prefill
chunks. With 4 KiB pages one core's reads stall on TLB misses; transparent huge pages
(`madvise`) lift a plain sum from ≈ 22 to ≈ 29–34 GiB/s (`cold-ray bench roofline`,
`bandwidth_gib_s_by_pages`).
Where the library cannot be built, `load()` returns None and the model keeps BLAS.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import mmap
from functools import cache

import torch

from cold_ray.kernels import cpu_kernels

PANEL = 16  # output features per panel: one 64-byte fp32 vector
PANEL_DTYPES = (torch.float32, torch.bfloat16)  # bf16 panels are widened to fp32 as read
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


@cache
def _malloc_trim():
    try:  # glibc's; other C libraries have none
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the pages of freed heap memory back to the OS (glibc's `malloc_trim`; nothing
    elsewhere). Weights freed one at a time from the middle of the heap otherwise stay resident
    until everything above them is freed too, and the peak RSS of packing would hold two copies
    of the model after all."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def panel_views(
    weights: list[torch.Tensor], dtype: torch.dtype = torch.float32
) -> list[torch.Tensor | None]:
    """Uninitialised panels [out / 16, in, 16] of `dtype` (fp32 or bf16) for each weight
    [out, in], or None where the kernel cannot take it (not CPU fp32, or out features not a
    multiple of 16); fill each with `fill_panels`. All in one huge-page buffer: a buffer per
    weight would leave a partly used 2 MiB page resident behind each. Pages take memory only
    once filled, so a caller that drops each weight right after filling its panels never holds
    two copies of the model."""
    if dtype not in PANEL_DTYPES:
        raise ValueError(f"panels hold {sorted(map(str, PANEL_DTYPES))}, not {dtype}")
    fits = [
        w.dtype == torch.float32
        and w.device.type == "cpu"
        and w.dim() == 2
        and w.shape[0] % PANEL == 0
        for w in weights
    ]
    buffer = huge_page_empty(sum(w.numel() for w, ok in zip(weights, fits) if ok), dtype)
    out, start = [], 0  # every start is a multiple of 16 elements: 32- or 64-byte aligned
    for w, ok in zip(weights, fits):
        if not ok:
            out.append(None)
            continue
        rows, k = w.shape
        out.append(buffer[start : start + w.numel()].view(rows // PANEL, k, PANEL))
        start += w.numel()
    return out


def fill_panels(panels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """panels[p, k, j] = weight[16 p + j, k] (rounded to nearest-even for bf16 panels);
    returns panels."""
    rows, k = weight.shape
    return panels.copy_(weight.detach().view(rows // PANEL, PANEL, k).transpose(1, 2))


def to_panels(
    weights: list[torch.Tensor], dtype: torch.dtype = torch.float32
) -> list[torch.Tensor | None]:
    """`panel_views` filled: each weight [out, in] as panels [out / 16, in, 16] of `dtype`
    (panels[p, k, j] = weight[16p + j, k]), or None where the kernel cannot take it."""
    views = panel_views(weights, dtype)
    return [None if v is None else fill_panels(v, w) for v, w in zip(views, weights)]


@cache
def load() -> PanelGemmKernel | None:
    """The compiled kernel (one thread; `with_threads` for more), or None where it cannot be
    built or loaded."""
    lib = cpu_kernels.library()
    return None if lib is None else PanelGemmKernel(lib, cpu_kernels.blocking())


class PanelGemmKernel(cpu_kernels.Threaded):
    # LoRA rows per call (a decode step's run; prefill chunks keep BLAS) and lora_small's rank
    # limit (its stack buffer)
    MAX_LORA_ROWS, MAX_RANK = 32, 1024

    def __init__(self, lib: ctypes.CDLL, blocking: cpu_kernels.Blocking):
        self.blocking = blocking
        self._fns = {torch.float32: lib.gemm_panels, torch.bfloat16: lib.gemm_panels_bf16}
        for fn in self._fns.values():
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int]
            fn.restype = None
        self._rows = lib.gemm_rows
        self._rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6 + [ctypes.c_int] * 2
        self._rows.restype = None
        self._lora = lib.lora_rows
        ptr = ctypes.c_void_p
        self._lora.argtypes = (
            [ptr, ptr, ptr, ctypes.c_float, ptr] + [ctypes.c_int64] * 5 + [ctypes.c_int]
        )
        self._lora.restype = ctypes.c_int

    def with_blocking(self, **blocks: int) -> PanelGemmKernel:
        """A copy with other register blocks (`row_block` 1-8, `dot_rows`/`dot_cols` 1-4):
        benchmarks and tests."""
        limits = {"row_block": 8, "dot_rows": 4, "dot_cols": 4}
        for name, value in blocks.items():
            if name not in limits or not 1 <= value <= limits[name]:
                raise ValueError(
                    f"{name} must be one of {sorted(limits)}, in [1, "
                    f"{limits.get(name, '?')}]; got {value}"
                )
        bound = copy.copy(self)
        bound.blocking = dataclasses.replace(self.blocking, **blocks)
        return bound

    def __call__(
        self, x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [rows, in] CPU fp32; panels: from `to_panels`, fp32 or bf16; bias: [out] or None
        -> [rows, out] fp32. The weights leave memory once per chunk of rows that fits in L2.

        Semantics: y = x @ W.T + bias in fp32, W = the panels' weights widened to fp32."""
        rows, k = x.shape
        out = panels.shape[0] * PANEL
        fn = self._fns.get(panels.dtype)
        if x.dtype != torch.float32 or x.device.type != "cpu" or k != panels.shape[1]:
            raise ValueError(
                f"panel GEMM kernel: CPU fp32 [rows, {panels.shape[1]}] input "
                f"expected, got {x.dtype} {list(x.shape)} on {x.device}"
            )
        if fn is None or not panels.is_contiguous() or panels.shape[2] != PANEL:
            raise ValueError(
                f"panel GEMM kernel: contiguous fp32 or bf16 panels [out / 16, in, "
                f"16] expected, got {panels.dtype} {list(panels.shape)}"
            )
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out,)):
            raise ValueError(f"panel GEMM kernel: fp32 bias of {out} features expected")
        x = x.contiguous()
        bias = None if bias is None else bias.contiguous()  # held: the kernel reads its memory
        y = x.new_empty(rows, out)
        b = self.blocking
        fn(
            x.data_ptr(),
            panels.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            rows,
            k,
            out,
            b.row_block,
            b.l2_bytes,
            self.threads,
        )
        return y

    def by_rows(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x: [rows, in] CPU fp32; weight: [out, in] row-major, fp32 or bf16 (the LM head: the
        embedding it is tied to) -> [rows, out] fp32.

        Semantics: y = x @ weight.float().T in fp32."""
        rows, k = x.shape
        if not (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and weight.dim() == 2
            and weight.shape[1] == k
            and weight.dtype in PANEL_DTYPES
            and weight.device.type == "cpu"
            and weight.is_contiguous()
        ):
            raise ValueError(
                f"row-major GEMM kernel: CPU fp32 x [rows, in] and a contiguous fp32 "
                f"or bf16 weight [out, in] expected, got x {x.dtype} "
                f"{list(x.shape)}, weight {weight.dtype} {list(weight.shape)}"
            )
        x = x.contiguous()
        y = x.new_empty(rows, weight.shape[0])
        b = self.blocking
        self._rows(
            x.data_ptr(),
            weight.data_ptr(),
            y.data_ptr(),
            rows,
            k,
            weight.shape[0],
            b.dot_rows,
            b.dot_cols,
            b.l2_bytes,
            int(weight.dtype == torch.bfloat16),
            self.threads,
        )
        return y

    def lora(
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        slot: int,
        scale: float,
        y: torch.Tensor,
        start: int,
        end: int,
    ) -> None:
        """y[start:end] += scale * (x[start:end] @ A[slot].T) @ B[slot].T in place, for up to
        MAX_LORA_ROWS rows (a decode step's run), straight from the LoRA buffers: x [rows, in]
        and A [slots, r, in], B [slots, out, r] contiguous, y [rows, out] with unit inner
        stride, all CPU fp32. Four rows at a time, the fours across threads; each row as it is
        computed alone. Pointers, not views: a step makes 120+ of these calls."""
        slots, rank, k = A.shape
        out, f32 = B.shape[1], torch.float32
        if not (
            0 <= start < end <= x.shape[0]
            and end - start <= self.MAX_LORA_ROWS
            and 0 <= slot < slots
            and rank <= self.MAX_RANK
            and x.shape[1] == k
            and B.shape[0] == slots
            and B.shape[2] == rank
            and y.shape[1] == out
            and y.shape[0] == x.shape[0]
            and y.stride(1) == 1
            and x.dtype == f32
            and A.dtype == f32
            and B.dtype == f32
            and y.dtype == f32
            and x.is_contiguous()
            and A.is_contiguous()
            and B.is_contiguous()
        ):
            raise ValueError(
                f"LoRA kernel: up to {self.MAX_LORA_ROWS} rows of one slot, rank up "
                f"to {self.MAX_RANK}, contiguous fp32 buffers expected; got rows "
                f"[{start}, {end}) of x {list(x.shape)}, slot {slot} of A "
                f"{list(A.shape)}, B {list(B.shape)}, y {list(y.shape)}"
            )
        row = y.stride(0)
        self._lora(
            x.data_ptr() + 4 * start * k,
            A.data_ptr() + 4 * slot * rank * k,
            B.data_ptr() + 4 * slot * out * rank,
            scale,
            y.data_ptr() + 4 * start * row,
            end - start,
            k,
            rank,
            out,
            row,
            self.threads,
        )
