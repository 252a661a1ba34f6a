"""LoRA (BGMV) and contrastive-step kernels behind one contract (installed as cold_ray.kernels).

Contract (docs/design.md §2), shared by every implementation:

    backend = select_backend(cfg.lora_backend, device)  # once; backend.name is the metrics label
    batch = backend.prepare(idx)                  # idx: [rows] int64, -1 = no adapter; once per step
    backend.lora_delta(x, A, B, scale, batch, y)  # y[i] += scale[k] * (x[i] @ A[k].T) @ B[k].T
    step = backend.contrastive_restricted(expert_logits, amateur_hidden, lm_head, alpha, beta)
    step = backend.contrastive_full(expert_logits, amateur_logits, alpha, beta)

Implementations: `reference` (plain torch, the fp32 oracle), `gather_bmm` (naive baseline,
benchmark only), `grouped` (SGMV-style, CPU default), `triton` (CUDA / Ascend via
triton-ascend), `ascend_native` (vllm-ascend's Ascend C ops). `select_backend` picks once.
"""

from cold_ray.kernels.contrastive import ColdStep
from cold_ray.kernels.dispatch import (
    BACKEND_NAMES,
    LoraBackend,
    LoraBatch,
    auto_backend_name,
    select_backend,
)

__all__ = [
    "BACKEND_NAMES",
    "ColdStep",
    "LoraBackend",
    "LoraBatch",
    "auto_backend_name",
    "select_backend",
]
