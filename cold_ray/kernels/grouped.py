"""Grouped (SGMV-style) LoRA: rows segmented by adapter, one GEMM pair per adapter segment.

The default on CPU. `prepare()` (once per step, see `dispatch.build_batch`) decides the plan;
each call replays it with as few torch ops as possible, because a decode step makes 120+ of
these calls on 1-32 rows and per-op overhead (~2-4 µs each) is most of the cost there:
- "runs"  (each slot's rows contiguous, incl. one adapter for the whole batch):
          per run `y[s:e].addmm_(x[s:e] @ A[k].T, B[k].T, alpha=scale[k])` on views;
- "gather" (slots interleaved, e.g. CoLD expert/amateur pairs with several adapters):
          one `index_select`, a GEMM pair per slot into one buffer, one `index_add_`.
Rows with index -1 are never read or written, so they stay bit-identical to the base output.
On CPU the engine may hand it the compiled GEMM kernel (`use_cpu_kernel`): a run of up to
`RUN_ROWS` rows (slots of rank up to `MAX_RANK`) is one C call on the engine's threads, and a
"gather" plan of up to four adapter rows (e.g. the expert rows of up to four CoLD pairs) one
call per row; the kernel streams the slot's factors with prefetching instead of two BLAS calls
on tiny shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cold_ray.kernels.dispatch import LoraBackend, LoraBatch

# Interleaved adapter rows (a "gather" plan) the kernel takes one call each: beyond, the calls
# cost more than one gather and a BLAS pair per slot.
INTERLEAVED_ROWS = 4
# Rows of a run the kernel takes: its expansion sums each output over the rank by a fixed tree,
# which costs more than BLAS's pair of GEMMs from 4 rows on (AVX2, rank 16, SmolLM2's shapes:
# 43 vs 18 µs at 4 rows, 366 vs 28 at 16).
RUN_ROWS = 4


class GroupedBackend(LoraBackend):
    name = "grouped"
    small_gemm = None  # kernels/cpu_gemm.py's kernel, set by `use_cpu_kernel`

    def use_cpu_kernel(self, kernel) -> bool:
        self.small_gemm = kernel
        return True

    def _lora_delta(self, x, A, B, scale, batch: LoraBatch, y) -> None:
        s = batch.scales(scale)
        kernel = self.small_gemm
        if kernel is not None and (A.shape[1] > kernel.MAX_RANK or x.dtype != torch.float32):
            kernel = None
        most = min(kernel.MAX_LORA_ROWS, RUN_ROWS) if kernel is not None else 0
        if batch.plan == "runs":
            rows = batch.rows
            for k, start, end in batch.segments:
                if end - start <= most:
                    kernel.lora(x, A, B, k, s[k], y, start, end)
                elif end - start == rows:  # one adapter for the whole batch: no slicing at all
                    y.addmm_(F.linear(x, A[k]), B[k].t(), alpha=s[k])
                else:
                    y[start:end].addmm_(F.linear(x[start:end], A[k]), B[k].t(), alpha=s[k])
            return
        if batch.num_active <= min(most, INTERLEAVED_ROWS):  # one kernel call each
            for k, start, end in batch.segments:
                for i in batch.perm_rows[start:end]:
                    kernel.lora(x, A, B, k, s[k], y, i, i + 1)
            return
        perm = batch.perm
        xg = x.index_select(0, perm)  # [active, in], rows sorted by slot
        d = torch.empty(batch.num_active, y.shape[1], dtype=y.dtype, device=y.device)
        for k, start, end in batch.segments:
            dk = d[start:end]  # [n_k, out]; beta=0 ignores the uninitialised contents
            torch.addmm(dk, F.linear(xg[start:end], A[k]), B[k].t(), beta=0, alpha=s[k], out=dk)
        y.index_add_(0, perm, d)

    def _shrink(self, x, A, batch: LoraBatch) -> torch.Tensor:
        t = torch.zeros(batch.rows, A.shape[1], dtype=torch.float32, device=x.device)
        if batch.plan == "runs":
            for k, start, end in batch.segments:
                t[start:end] = F.linear(x[start:end], A[k])
        elif batch.plan == "gather":
            xg = x.index_select(0, batch.perm)
            tg = torch.empty(batch.num_active, A.shape[1], dtype=x.dtype, device=x.device)
            for k, start, end in batch.segments:
                torch.mm(xg[start:end], A[k].t(), out=tg[start:end])
            t.index_copy_(0, batch.perm, tg.float())
        return t

    def _expand(self, t, B, scale, batch: LoraBatch, y) -> None:
        s = batch.scales(scale)
        t = t.to(B.dtype)
        if batch.plan == "runs":
            for k, start, end in batch.segments:
                y[start:end].addmm_(t[start:end], B[k].t(), alpha=s[k])
            return
        tg = t.index_select(0, batch.perm)
        d = torch.empty(batch.num_active, y.shape[1], dtype=y.dtype, device=y.device)
        for k, start, end in batch.segments:
            dk = d[start:end]
            torch.addmm(dk, tg[start:end], B[k].t(), beta=0, alpha=s[k], out=dk)
        y.index_add_(0, batch.perm, d)
