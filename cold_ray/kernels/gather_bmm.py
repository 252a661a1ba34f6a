"""Gather-BMM LoRA: the paper's naive baseline, kept for the benchmark only (never auto-picked).

It materialises every row's adapter weights, `A[idx]` ([rows, r, in]) and `B[idx]`
([rows, out, r]), then runs one batched matmul. Simple, but it copies `rows x r x (in + out)`
weights per call — the memory blow-up (and OOM on Ascend) that grouped/BGMV kernels avoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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

    def _shrink(self, x, A, batch: LoraBatch) -> torch.Tensor:
        return self._bmm_shrink(x, A, batch).float().masked_fill_(~batch.active, 0.0)

    def _expand(self, t, B, scale, batch: LoraBatch, y) -> None:
        self._bmm_expand(t.to(B.dtype), B, scale, batch, y)

    def _lora_delta(self, x, A, B, scale, batch: LoraBatch, y) -> None:
        self._bmm_expand(self._bmm_shrink(x, A, batch), B, scale, batch, y)

    @staticmethod
    def _bmm_shrink(x: torch.Tensor, A: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        a = A.index_select(0, batch.safe_idx)  # [rows, r, in]: the per-row weight copy
        return torch.bmm(a, x.unsqueeze(-1)).squeeze(-1)  # [rows, r]

    @staticmethod
    def _bmm_expand(t, B, scale, batch: LoraBatch, y: torch.Tensor) -> None:
        b = B.index_select(0, batch.safe_idx)  # [rows, out, r]: the per-row weight copy
        d = torch.bmm(b, t.unsqueeze(-1)).squeeze(-1)  # [rows, out]
        d = d.float() * scale.index_select(0, batch.safe_idx).float().unsqueeze(1)
        # where(), not `y += d * mask`: -1 rows must stay bit-identical (-0.0 + 0.0 is +0.0).
        y.copy_(torch.where(batch.active, y.float() + d, y.float()))
