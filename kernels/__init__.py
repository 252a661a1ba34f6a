"""LoRA (BGMV) and contrastive-step kernels behind one contract.

Contract (DESIGN §2), shared by every implementation:

    batch = backend.prepare(idx)                  # idx: [rows] int64, -1 = no adapter; once per step
    backend.lora_delta(x, A, B, scale, batch, y)  # y[i] += scale[k] * (x[i] @ A[k].T) @ B[k].T

`reference` is the fp32 oracle. `select_backend` picks one implementation, once.
"""

from cold_ray.kernels.dispatch import LoraBackend, LoraBatch, select_backend

__all__ = ["LoraBackend", "LoraBatch", "select_backend"]
