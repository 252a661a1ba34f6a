"""Per-step LoRA batch metadata, the backend interface, and the one-time backend choice.

`select_backend(name, device)` picks an implementation once (config value or "auto") and logs
which; the engine then calls, per step, `batch = backend.prepare(idx)` and, per LoRA site,
`backend.lora_delta(x, A, B, scale, batch, y)`. The base class `LoraBackend` is the plain-torch
reference; the others live beside it and are imported only when picked.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cold_ray.kernels import contrastive, reference
from cold_ray.kernels.checks import (
    check_amateur_full,
    check_amateur_head,
    check_contrastive,
    check_expand,
    check_index,
    check_lora,
    check_shrink,
)
from cold_ray.kernels.contrastive import ColdStep

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoraBatch:
    """Adapter metadata for one step, built once by `prepare()` and shared by every LoRA layer.

    The grouped (SGMV) plan is worked out here so the 100+ LoRA calls of a step only replay it:
    - "none":   every row is base (-1); nothing to add.
    - "runs":   each used slot's rows form one contiguous run; `segments` index x/y directly
                (views, no gather/scatter). One adapter for the whole batch is one run.
    - "gather": otherwise; `perm` lists the active rows sorted by slot and `segments` index
                x[perm] (one gather, one GEMM pair per slot, one index_add).
    """

    idx: torch.Tensor  # [rows] int64 on the backend's device; -1 = base model only
    rows: int
    max_slot: int  # largest slot any row uses; -1 when every row is base
    num_active: int  # rows with idx >= 0
    plan: str  # "none" | "runs" | "gather"
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end), end exclusive
    perm: torch.Tensor | None = None  # [num_active] int64 row ids sorted by slot ("gather")
    perm_rows: tuple[int, ...] = ()  # `perm` on the host, for per-row CPU kernel calls
    safe_idx: torch.Tensor | None = None  # [rows] int64, -1 -> 0 (gather-style backends)
    active: torch.Tensor | None = None  # [rows, 1] bool, idx >= 0 (gather-style backends)
    scale_cache: dict = field(default_factory=dict)  # (ptr, version) -> list[float]

    def scales(self, scale: torch.Tensor) -> list[float]:
        """`scale` [slots] as Python floats: free on CPU, one device sync per tensor per step."""
        if scale.is_cpu:
            return scale.tolist()
        key = (scale.data_ptr(), scale._version)
        cached = self.scale_cache.get(key)
        if cached is None:
            cached = self.scale_cache[key] = scale.tolist()
        return cached


def build_batch(idx: torch.Tensor | Sequence[int], device: torch.device | str) -> LoraBatch:
    """Validate `idx` ([rows], -1 = base) and work out the grouped plan (host-side, once)."""
    if not isinstance(idx, torch.Tensor):
        idx = torch.tensor(list(idx), dtype=torch.int64)
    check_index(idx)
    ids: list[int] = idx.tolist()
    rows = len(ids)
    if ids and min(ids) < -1:
        raise ValueError(f"adapter index {min(ids)} is invalid: expected -1 (base) or a slot >= 0")
    by_slot: dict[int, list[int]] = {}
    runs: list[tuple[int, int, int]] = []
    for i, k in enumerate(ids):
        if k < 0:
            continue
        by_slot.setdefault(k, []).append(i)
        if runs and runs[-1][0] == k and runs[-1][2] == i:
            runs[-1] = (k, runs[-1][1], i + 1)
        else:
            runs.append((k, i, i + 1))
    num_active = sum(len(r) for r in by_slot.values())
    dev_idx = idx.to(device=device, dtype=torch.int64).contiguous()
    if not by_slot:
        return LoraBatch(dev_idx, rows, -1, 0, "none", ())
    max_slot = max(by_slot)
    if len(runs) == len(by_slot):  # every slot contiguous: slice, never gather
        return LoraBatch(dev_idx, rows, max_slot, num_active, "runs", tuple(runs))
    order: list[int] = []
    segments = []
    for k, members in sorted(by_slot.items()):
        segments.append((k, len(order), len(order) + len(members)))
        order.extend(members)
    perm = torch.tensor(order, dtype=torch.int64, device=device)
    return LoraBatch(
        dev_idx, rows, max_slot, num_active, "gather", tuple(segments), perm, perm_rows=tuple(order)
    )


class LoraBackend:
    """The contract of every implementation, written once; this base class is also the plain
    torch reference (fp32). Implementations override only the `_` hooks: the public methods
    check shapes, dtypes and indices first, so no hook repeats a check or a docstring.

    LoRA (docs/design.md §2), rows with idx -1 are never read or written:
        t[i]  = x[i] @ A[k].T                      shrink, k = idx[i] >= 0
        y[i] += scale[k] * t[i] @ B[k].T           expand, in place
    Contrastive step (docs/design.md §1): see `contrastive_full` / `contrastive_restricted`.
    Precision: the reference and Triton accumulate in fp32; the grouped and gather-BMM paths
    compute in the input dtype (bit-equal in fp32, within the dtype's tolerance otherwise).
    `options` are a backend's own tuning knobs (Triton's `split_k`), ignored by the others.
    """

    name = "reference"
    # True where `lora_delta` over a `graph_batch` launches fixed work and reads the adapter
    # index on the device only, so a decode step can be captured as a graph (engine/graphs.py)
    graph_safe = False

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def use_cpu_kernel(self, kernel) -> bool:
        """Take `cold_ray/kernels/cpu_gemm.py`'s compiled kernel for small CPU steps; False
        where this backend has no use for it."""
        return False

    # -- LoRA ---------------------------------------------------------------------------------
    def prepare(self, idx: torch.Tensor | Sequence[int]) -> LoraBatch:
        """Build the step's adapter metadata once; pass it to every LoRA call of the step."""
        return build_batch(idx, self.device)

    def graph_batch(self, idx: torch.Tensor, slots: int) -> LoraBatch:
        """The metadata of a captured step from its device index alone ([rows], -1 = base,
        rewritten before each replay), never read on the host: any slot may be in use and
        every row counts as active (graph-safe backends skip -1 rows on the device)."""
        rows = idx.shape[0]
        return LoraBatch(idx, rows, slots - 1, rows, "gather", ())

    def shrink(
        self,
        x: torch.Tensor,  # [rows, in]
        A: torch.Tensor,  # [slots, r, in]
        batch: LoraBatch,
        **options,
    ) -> torch.Tensor:  # [rows, r] fp32, zero on -1 rows
        """Semantics: t[i] = x[i].float() @ A[idx[i]].float().T if idx[i] >= 0 else 0."""
        check_shrink(x, A, batch)
        return self._shrink(x, A, batch, **options)

    def expand(
        self,
        t: torch.Tensor,  # [rows, r]
        B: torch.Tensor,  # [slots, out, r]
        scale: torch.Tensor,  # [slots]
        batch: LoraBatch,
        y: torch.Tensor,  # [rows, out], updated in place
        **options,
    ) -> None:
        """Semantics:
        for i with k = idx[i] >= 0:
            y[i] = (y[i].float() + scale[k] * (t[i].float() @ B[k].float().T)).to(y.dtype)
        """
        check_expand(t, B, scale, batch, y)
        if batch.plan != "none":
            self._expand(t, B, scale, batch, y, **options)

    def lora_delta(
        self,
        x: torch.Tensor,  # [rows, in]
        A: torch.Tensor,  # [slots, r, in]
        B: torch.Tensor,  # [slots, out, r]
        scale: torch.Tensor,  # [slots]
        batch: LoraBatch,
        y: torch.Tensor,  # [rows, out], updated in place
        **options,
    ) -> None:
        """Semantics: y[i] += scale[k] * (x[i] @ A[k].T) @ B[k].T for k = idx[i] >= 0
        (shrink, then expand, in one call: the engine's path at every LoRA site)."""
        check_lora(x, A, B, scale, batch, y)
        if batch.plan != "none":
            self._lora_delta(x, A, B, scale, batch, y, **options)

    # -- contrastive step -----------------------------------------------------------------------
    def contrastive_full(
        self,
        expert_logits: torch.Tensor,  # [rows, V]
        amateur_logits: torch.Tensor,  # [rows, V]
        alpha: torch.Tensor,  # [rows]
        beta: torch.Tensor,  # [rows]
        *,
        with_scores: bool = False,
    ) -> ColdStep:
        """CoLD step from full amateur logits; tokens equal `reference.contrastive_greedy`.

        Semantics:
            valid  = expert >= max(expert) + ln(alpha)                    # EXPERT logits
            scores = where(valid, (1 + beta) * expert - beta * amateur, -inf)   fp32 [rows, V]
            tokens = argmax(scores)   (first index on ties)
        """
        check_contrastive(expert_logits, alpha, beta)
        check_amateur_full(expert_logits, amateur_logits)
        return self._contrastive_full(expert_logits, amateur_logits, alpha, beta, with_scores)

    def contrastive_restricted(
        self,
        expert_logits: torch.Tensor,  # [rows, V]
        amateur_hidden: torch.Tensor,  # [rows, H], the amateur rows' final (normed) hidden state
        lm_head: torch.Tensor,  # [V, H]
        alpha: torch.Tensor,  # [rows]
        beta: torch.Tensor,  # [rows]
    ) -> ColdStep:
        """CoLD step computing the amateur head only at the expert's plausible tokens.

        Semantics:
            ids, mask = plausible_candidates(expert, alpha)               # [rows, K]
            amateur   = amateur_hidden[i] . lm_head[ids[i, j]]            # K dots, not V
            scores    = where(mask, (1 + beta) * expert[ids] - beta * amateur, -inf)
            tokens    = ids[argmax(scores)]  (lowest token id on ties, as the full step)
        Gives the same tokens as `contrastive_full` with amateur = amateur_hidden @ lm_head.T.
        """
        check_contrastive(expert_logits, alpha, beta)
        check_amateur_head(expert_logits, amateur_hidden, lm_head)
        return self._contrastive_restricted(expert_logits, amateur_hidden, lm_head, alpha, beta)

    def contrastive_greedy(
        self,
        expert_logits: torch.Tensor,  # [rows, V]
        amateur_logits: torch.Tensor,  # [rows, V]
        alpha: torch.Tensor,  # [rows]
        beta: torch.Tensor,  # [rows]
    ) -> torch.Tensor:  # [rows] int64
        """Semantics: reference.contrastive_greedy(expert_logits, amateur_logits, alpha, beta)."""
        return self.contrastive_full(expert_logits, amateur_logits, alpha, beta).tokens

    # -- the hooks implementations override (arguments already checked) -------------------------
    def _shrink(self, x, A, batch: LoraBatch) -> torch.Tensor:
        return reference.shrink(x, A, batch.idx)

    def _expand(self, t, B, scale, batch: LoraBatch, y) -> None:
        reference.expand(t, B, batch.idx, scale, y)

    def _lora_delta(self, x, A, B, scale, batch: LoraBatch, y) -> None:
        reference.lora_delta(x, A, B, scale, batch.idx, y)

    def _contrastive_full(self, expert_logits, amateur_logits, alpha, beta, with_scores):
        return contrastive.full_torch(expert_logits, amateur_logits, alpha, beta, with_scores)

    def _contrastive_restricted(self, expert_logits, amateur_hidden, lm_head, alpha, beta):
        return contrastive.restricted_torch(expert_logits, amateur_hidden, lm_head, alpha, beta)


# name -> "module:Class"; imported only when picked, so a missing optional package (triton,
# vllm-ascend) only matters to the backend that needs it.
_BACKENDS: dict[str, str] = {
    "reference": "cold_ray.kernels.dispatch:LoraBackend",
    "gather_bmm": "cold_ray.kernels.gather_bmm:GatherBmmBackend",
    "grouped": "cold_ray.kernels.grouped:GroupedBackend",
    "triton": "cold_ray.kernels.triton_backend:TritonBackend",
    "ascend_native": "cold_ray.kernels.ascend_native:AscendNativeBackend",
}
BACKEND_NAMES = ("auto", *_BACKENDS)


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def ascend_native_available() -> bool:
    from cold_ray.kernels.ascend_native import native_ops_available

    return native_ops_available()


def device_type(device: torch.device | str) -> str:
    """ "cuda" for "cuda:1"; works for "npu" even where torch_npu is not installed."""
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def auto_backend_name(device: torch.device | str) -> tuple[str, str]:
    """The backend "auto" picks for `device`, and why."""
    kind = device_type(device)
    if kind == "cuda":
        if triton_importable():
            return "triton", "CUDA device with triton installed"
        return "grouped", "CUDA device without triton"
    if kind == "npu":
        if ascend_native_available():
            return "ascend_native", "NPU with vllm-ascend's bgmv ops"
        if triton_importable():
            return "triton", "NPU with triton-ascend, without vllm-ascend"
        return "grouped", "NPU without vllm-ascend or triton-ascend"
    return "grouped", f"{kind} device"


def select_backend(name: str = "auto", device: torch.device | str = "cpu") -> LoraBackend:
    """Return the backend called `name`, or the best available one for `device` if "auto".

    Picks once; the chosen `backend.name` is logged and serves as a metrics label.
    """
    if name == "auto":
        name, why = auto_backend_name(device)
    else:
        why = "forced by config"
    if name not in _BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; expected one of {list(BACKEND_NAMES)}")
    module_name, cls_name = _BACKENDS[name].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except ImportError as e:
        raise RuntimeError(f"LoRA backend {name!r} cannot be imported: {e}") from e
    backend = cls(device)
    log.info("LoRA backend: %s on %s (%s)", backend.name, device, why)
    return backend
