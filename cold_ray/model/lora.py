"""A linear layer that holds one base weight plus stacked LoRA adapter slots (docs/design.md §2).

Fused projections (q/k/v, gate/up) keep each part's adapter in its own band of the rank
dimension: A is [slots, parts * r_max, in] and B is block-diagonal [slots, out, parts * r_max],
so one shrink and one expand serve all parts. The zero blocks add exact zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from cold_ray.kernels import LoraBackend, LoraBatch

# Up to this many rows, `W @ x.T` beats `x @ W.T` on CPU BLAS: the small-M GEMM path packs
# the whole weight, the transposed product streams it once (`cold-ray bench gemm`: 2.5x at
# 2 rows, 1.2x at 4; `x @ W.T` wins from 8).
SMALL_ROWS = 4
# Without the panel GEMM kernel, steps of up to this many rows read a kept row-major weight
# rather than the packed one: MKL streams it at ≈17 GB/s there (one row padded to two: its
# 2-column GEMM streams faster than its GEMV), the packed layout at ≈11–13 (`cold-ray bench gemm`).
# With the kernel (`kernels/cpu_gemm.py`) every step reads the one panel copy: ≈ 2–2.7x the
# packed layout's speed at 1–4 rows (streaming ≈ 25–30 GB/s), level with it on prefill chunks.
ROW_MAJOR_ROWS = 2
# Row count oneDNN lays packed weights out for; any row count works with the layout.
PACK_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, routed through the faster product for decode-sized batches on CPU."""
    rows = x.shape[0]
    if rows <= SMALL_ROWS and x.device.type == "cpu" and x.dim() == 2:
        y = torch.mm(weight, (torch.cat((x, x)) if rows == 1 else x).t()).t()[:rows].contiguous()
        return y if bias is None else y.add_(bias)
    return nn.functional.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` laid out once in oneDNN's blocked format for CPU GEMMs, or None where that is
    unavailable or not exact. Decode-sized products skip the per-call packing that plain BLAS
    does for every GEMM (≈1.5–2x at 4–64 rows on AVX2, `cold-ray bench gemm`)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        got = packed_linear(probe, packed, None)
    except (RuntimeError, AttributeError):  # an older torch or a build without the op
        return None
    want = nn.functional.linear(probe, weight)
    scale = float(want.abs().max()) + 1.0
    return packed if float((got - want).abs().max()) <= 1e-5 * scale else None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class LoraLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        part_out: tuple[int, ...],  # out features of each fused part, e.g. (q, k, v)
        bias: bool,
        max_loras: int,
        max_rank: int,
    ):
        super().__init__()
        out = sum(part_out)
        self.in_features, self.out_features = in_features, out
        self.part_out = part_out
        self.max_rank = max_rank
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        r = len(part_out) * max_rank
        self.register_buffer("lora_A", torch.zeros(max_loras, r, in_features), persistent=False)
        self.register_buffer("lora_B", torch.zeros(max_loras, out, r), persistent=False)
        self.register_buffer("lora_scale", torch.zeros(max_loras), persistent=False)
        # Set by the model before each forward: the step's adapter metadata and backend.
        self.backend: LoraBackend | None = None
        self.packed: torch.Tensor | None = None  # see `pack_base`; replaces `weight` when set
        self.panels: torch.Tensor | None = None  # see `use_panels`; replaces `weight`
        self.gemm = None  # the panel GEMM kernel that reads `panels`

    def use_panels(self, panels: torch.Tensor, gemm) -> None:
        """Serve every step from `panels` (this weight in `cpu_gemm`'s panel layout, filled)
        through the panel GEMM kernel `gemm`, and drop the row-major weight: one copy."""
        self.panels, self.gemm = panels, gemm
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def pack_base(self, small_batch: bool = False) -> bool:
        """Lay the base weight out packed for oneDNN (CPU without the panel GEMM kernel). With
        `small_batch` the row-major weight stays beside it for steps of up to ROW_MAJOR_ROWS
        rows (twice the memory); otherwise it is dropped."""
        packed = pack_weight(self.weight)
        if packed is not None:
            self.packed = packed
            if not small_batch:
                self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        return packed is not None

    def forward(self, x: torch.Tensor, batch: LoraBatch | None) -> torch.Tensor:
        # x: [tokens, in] -> [tokens, out]; the route is chosen by the step's rows alone
        rows = x.shape[0]
        if self.panels is not None:
            y = self.gemm(x, self.panels, self.bias)
        elif self.packed is not None and (rows > ROW_MAJOR_ROWS or not self.weight.numel()):
            y = packed_linear(x, self.packed, self.bias)
        else:
            y = linear(x, self.weight, self.bias)
        if batch is not None and self.backend is not None:
            self.backend.lora_delta(x, self.lora_A, self.lora_B, self.lora_scale, batch, y)
        return y

    @torch.no_grad()
    def set_slot(
        self,
        slot: int,
        parts: list[tuple[torch.Tensor, torch.Tensor] | None],  # per part: (A [r,in], B [out,r])
        scale: float,
    ) -> None:
        """Write one adapter into `slot`; a part that is None has no adapter weights (zeros)."""
        self.write_packed(slot, *self.pack(parts), scale)

    @torch.no_grad()
    def pack(
        self, parts: list[tuple[torch.Tensor, torch.Tensor] | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One adapter in this layer's slot layout, in host memory: (A [parts * r_max, in],
        B [out, parts * r_max]). Reads no slot state, so a load thread may call it."""
        a_all = torch.zeros(self.lora_A.shape[1:], dtype=self.lora_A.dtype)
        b_all = torch.zeros(self.lora_B.shape[1:], dtype=self.lora_B.dtype)
        offset = 0
        for j, (out, part) in enumerate(zip(self.part_out, parts)):
            if part is not None:
                a, b = part
                r = a.shape[0]
                band = slice(j * self.max_rank, j * self.max_rank + r)
                a_all[band].copy_(a)
                b_all[offset : offset + out, band].copy_(b)
            offset += out
        return a_all, b_all

    @torch.no_grad()
    def write_packed(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Install a `pack()`ed adapter: two copies, the only work left for the engine thread."""
        self.lora_A[slot].copy_(a)
        self.lora_B[slot].copy_(b)
        self.lora_scale[slot] = scale

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_scale[slot] = 0.0
