"""Gather-BMM LoRA: the paper's naive baseline, kept for the benchmark only (never auto-picked).

It materialises every row's adapter weights, `A[idx]` ([rows, r, in]) and `B[idx]`
([rows, out, r]), then runs one batched matmul. Simple, but it copies `rows x r x (in + out)`
weights per call — the memory blow-up (and OOM on Ascend) that grouped/BGMV kernels avoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cold_ray.kernels.checks import check_expand, check_lora, check_shrink
from cold_ray.kernels.dispatch import LoraBackend, LoraBatch


class GatherBmmBackend(LoraBackend):
    name = "gather_bmm"
    graph_safe = True  # fixed shapes, device-side masks

    def prepare(self, idx: torch.Tensor | Sequence[int]) -> LoraBatch:
        return self._masks(super().prepare(idx))

    def graph_batch(self, idx: torch.Tensor, slots: int) -> LoraBatch:
        return self._masks(super().graph_batch(idx, slots))  # masks made inside the graph

    @staticmethod
    def _masks(batch: LoraBatch) -> LoraBatch:
        batch.safe_idx = batch.idx.clamp(min=0)  # [rows]; -1 rows compute with slot 0, then masked
        batch.active = (batch.idx >= 0).unsqueeze(1)  # [rows, 1]
        return batch

    def shrink(
        self,
        x: torch.Tensor,  # [rows, in]
        A: torch.Tensor,  # [slots, r, in]
        batch: LoraBatch,
    ) -> torch.Tensor:  # [rows, r] fp32
        """Semantics: t[i] = x[i] @ A[idx[i]].T if idx[i] >= 0 else 0 (fp32 out)."""
        check_shrink(x, A, batch)
        t = self._shrink(x, A, batch).float()
        return t.masked_fill_(~batch.active, 0.0)

    def expand(
        self,
        t: torch.Tensor,  # [rows, r]
        B: torch.Tensor,  # [slots, out, r]
        scale: torch.Tensor,  # [slots]
        batch: LoraBatch,
        y: torch.Tensor,  # [rows, out], updated in place
    ) -> None:
        """Semantics: y[i] += scale[k] * t[i] @ B[k].T for k = idx[i] >= 0."""
        check_expand(t, B, scale, batch, y)
        self._expand(t.to(B.dtype), B, scale, batch, y)

    def lora_delta(
        self,
        x: torch.Tensor,  # [rows, in]
        A: torch.Tensor,  # [slots, r, in]
        B: torch.Tensor,  # [slots, out, r]
        scale: torch.Tensor,  # [slots]
        batch: LoraBatch,
        y: torch.Tensor,  # [rows, out], updated in place
    ) -> None:
        """Semantics: y[i] += scale[k] * (x[i] @ A[k].T) @ B[k].T for k = idx[i] >= 0."""
        check_lora(x, A, B, scale, batch, y)
        self._expand(self._shrink(x, A, batch), B, scale, batch, y)

    @staticmethod
    def _shrink(x: torch.Tensor, A: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        a = A.index_select(0, batch.safe_idx)  # [rows, r, in]: the per-row weight copy
        return torch.bmm(a, x.unsqueeze(-1)).squeeze(-1)  # [rows, r]

    @staticmethod
    def _expand(t, B, scale, batch: LoraBatch, y: torch.Tensor) -> None:
        b = B.index_select(0, batch.safe_idx)  # [rows, out, r]: the per-row weight copy
        d = torch.bmm(b, t.unsqueeze(-1)).squeeze(-1)  # [rows, out]
        d = d.float() * scale.index_select(0, batch.safe_idx).float().unsqueeze(1)
        # where(), not `y += d * mask`: -1 rows must stay bit-identical (-0.0 + 0.0 is +0.0).
        y.copy_(torch.where(batch.active, y.float() + d, y.float()))
