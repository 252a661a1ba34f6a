"""The one place that knows about devices: CPU, CUDA GPUs and Ascend NPUs (torch_npu)."""

from __future__ import annotations

import contextlib
import os

import torch


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def resolve(name: str) -> torch.device:
    """Turn a configured device name into a torch.device, or fail with a clear message."""
    kind = name.split(":")[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} configured, but no CUDA GPU is visible to torch")
        return torch.device(name)
    if kind == "npu":
        if not _npu_available():
            raise RuntimeError(
                f"device {name!r} configured, but no Ascend NPU is usable: install torch_npu "
                "matching your torch and CANN, and check ASCEND_RT_VISIBLE_DEVICES"
            )
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; expected cpu, cuda[:i] or npu[:i]")


def from_ray_assignment(configured: str) -> tuple[str, dict]:
    """Device for a Ray actor, from the accelerators Ray assigned it.

    Ray sets CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES for the actor, so the assigned
    accelerator is always index 0 inside the process. Returns (device, what Ray assigned).
    """
    import ray

    ids = ray.get_runtime_context().get_accelerator_ids()
    info = {
        "gpu_ids": ids.get("GPU", []),
        "npu_ids": ids.get("NPU", []),
        "ascend_visible": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    kind = configured.split(":")[0]
    if kind == "npu" and not info["npu_ids"]:
        raise RuntimeError("device 'npu' configured, but Ray assigned no NPU to this replica")
    if kind == "cuda" and not info["gpu_ids"]:
        raise RuntimeError("device 'cuda' configured, but Ray assigned no GPU to this replica")
    return (f"{kind}:0" if kind in ("npu", "cuda") else "cpu"), info


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def current(device: torch.device):
    """A context in which `device` is the current CUDA/NPU device (stream capture records the
    current device's stream); nothing on CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    if device.type == "npu":
        return torch.npu.device(device)
    return contextlib.nullcontext()


def graph_api(device: torch.device):
    """(graph class, capture context manager taking `pool=`) for capturing a step on this
    device: CUDA graphs, or ACLGraph through torch_npu's `torch.npu.NPUGraph` / `graph`;
    None where the device has none (CPU, a torch_npu without ACLGraph)."""
    if device.type == "cuda":
        return torch.cuda.CUDAGraph, torch.cuda.graph
    if device.type == "npu" and hasattr(torch.npu, "NPUGraph") and hasattr(torch.npu, "graph"):
        return torch.npu.NPUGraph, torch.npu.graph
    return None
