"""Choose a LoRA backend once, from the device and what is installed (or a forced name)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from cold_ray.kernels import reference

log = logging.getLogger(__name__)


@dataclass
class LoraBatch:
    """Per-step adapter metadata, built once per step and shared by every LoRA layer."""

    idx: torch.Tensor  # [rows] int64, -1 = base model only


class LoraBackend:
    """Interface of every implementation; this base class is the reference (plain torch)."""

    name = "reference"

    def prepare(self, idx: torch.Tensor) -> LoraBatch:
        return LoraBatch(idx=idx)

    def lora_delta(
        self,
        x: torch.Tensor,  # [rows, in]
        A: torch.Tensor,  # [slots, r, in]
        B: torch.Tensor,  # [slots, out, r]
        scale: torch.Tensor,  # [slots]
        batch: LoraBatch,
        y: torch.Tensor,  # [rows, out], updated in place
    ) -> None:
        reference.lora_delta(x, A, B, scale, batch.idx, y)


_BACKENDS: dict[str, type[LoraBackend]] = {"reference": LoraBackend}


def select_backend(name: str = "auto", device: torch.device | str = "cpu") -> LoraBackend:
    """Return the backend called `name`, or the best available one for `device` if "auto"."""
    if name == "auto":
        name = "reference"
    if name not in _BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; available: {sorted(_BACKENDS)}")
    backend = _BACKENDS[name]()
    log.info("LoRA backend: %s (device %s)", backend.name, device)
    return backend
