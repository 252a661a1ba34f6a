"""Shared helpers for kernel tests: tolerance table, `assert_close`, LoRA case builder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cold_ray.benchmarks.workloads import adapter_mix
from cold_ray.kernels import reference

# (atol, rtol) per dtype of the compared output. Low-precision rows round the base output and
# (for grouped/gather-BMM) the rank-r intermediate; the worst case over the sweep uses about
# a third of each budget (measured), leaving room for other accumulation orders (GPU).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.5e-2),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""
) -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise; reports the max difference."""
    atol, rtol = TOLERANCES[dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bad.any() or a.isnan().any() != e.isnan().any():
        i = int(diff.nan_to_num(float("inf")).argmax())
        at = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), diff.shape))
        raise AssertionError(
            f"{what}: max |diff| {diff.max().item():.3e} at {at} (actual "
            f"{a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}); "
            f"{int(bad.sum())} of {diff.numel()} outside atol {atol} + rtol {rtol} ({dtype})"
        )


@dataclass
class LoraCase:
    x: torch.Tensor  # [rows, in]
    A: torch.Tensor  # [slots, r, in]
    B: torch.Tensor  # [slots, out, r]
    scale: torch.Tensor  # [slots] fp32
    idx: torch.Tensor  # [rows] int64
    y: torch.Tensor  # [rows, out], the base output

    def expected(self) -> torch.Tensor:
        y = self.y.clone()
        reference.lora_delta(self.x, self.A, self.B, self.scale, self.idx, y)
        return y

    def describe(self) -> str:
        rows, d_in = self.x.shape
        slots, r, _ = self.A.shape
        return (
            f"rows={rows} in={d_in} out={self.B.shape[1]} rank={r} slots={slots} "
            f"dtype={self.x.dtype} idx={self.idx.tolist()[:12]}"
        )


def make_case(
    rows: int,
    rank: int,
    d_in: int,
    d_out: int,
    dtype: torch.dtype,
    mix: str,
    slots: int = 5,
    seed: int = 0,
) -> LoraCase:
    """Random LoRA inputs at realistic scales (delta and base output both O(1))."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(adapter_mix(mix, rows, slots, seed), dtype=torch.int64)
    return LoraCase(
        x=torch.randn(rows, d_in, generator=g).to(dtype),
        A=(torch.randn(slots, rank, d_in, generator=g) / d_in**0.5).to(dtype),
        B=(torch.randn(slots, d_out, rank, generator=g) / rank**0.5).to(dtype),
        scale=0.5 + 1.5 * torch.rand(slots, generator=g),
        idx=idx,
        y=torch.randn(rows, d_out, generator=g).to(dtype),
    )


def assert_base_rows_untouched(after: torch.Tensor, case: LoraCase, what: str) -> None:
    base = case.idx < 0
    if not torch.equal(after[base], case.y[base]):
        raise AssertionError(f"{what}: rows with adapter -1 changed ({case.describe()})")


@dataclass
class ColdCase:
    expert: torch.Tensor  # [rows, V]
    hidden: torch.Tensor  # [rows, H], amateur final hidden state
    lm_head: torch.Tensor  # [V, H]
    alpha: torch.Tensor  # [rows]
    beta: torch.Tensor  # [rows]

    @property
    def amateur(self) -> torch.Tensor:  # [rows, V], the full amateur head
        return self.hidden @ self.lm_head.T


def make_cold_case(rows: int, vocab: int, hidden: int, seed: int = 0) -> ColdCase:
    """Peaked expert logits (a few hot tokens, like an LM) and an amateur head that disagrees.

    alpha and beta vary per row, so a kernel mixing rows up fails.
    """
    g = torch.Generator().manual_seed(seed)
    expert = torch.randn(rows, vocab, generator=g)
    hot = torch.randint(0, vocab, (rows, 8), generator=g)
    expert.scatter_add_(1, hot, 10.0 + 1.5 * torch.rand(rows, 8, generator=g))
    alphas = torch.tensor([0.05, 0.1, 0.5, 1.0])
    betas = torch.tensor([0.0, 0.5, 1.0, 3.0])
    return ColdCase(
        expert=expert,
        hidden=torch.randn(rows, hidden, generator=g),
        lm_head=5.0 * torch.randn(vocab, hidden, generator=g) / hidden**0.5,
        alpha=alphas[torch.randint(0, 4, (rows,), generator=g)],
        beta=betas[torch.randint(1, 4, (rows,), generator=g)],
    )
