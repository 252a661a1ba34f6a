"""Decode attention on CPU: `cpu_decode_attention.c`, compiled once per machine.

A decode token has only its GQA group of query rows per K/V head (3 for SmolLM2), so torch's
CPU SDPA spends its time setting up one tiny GEMM pair per (row, head) rather than reading the
cache: ≈ 6 GB/s over SmolLM2's cache at 16 rows, ≈ 15% of a decode step. The C kernel reads
each row's keys and values once, for exactly the positions the row has (no mask, no span
padding), ≈ 2x faster (`cold-ray bench attention`).

The kernel is compiled with the system C compiler (`$CC`, else `cc`/`gcc`/`clang`) for this
machine (`-march=native`) into the cold-ray cache folder, keyed by source, flags, compiler and
CPU (a cache folder shared by machines with other CPUs never hands one a library built for
instructions it lacks); where no compiler works, `load()` returns None and the model keeps
SDPA. It runs on one thread: the engine uses it when torch runs one intra-op thread (the
default), SDPA otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode_attention.c")
# -ffast-math: vectorised dot products and exp (glibc's libmvec); the source holds no infinity
# or NaN test that the finite-math assumption could remove.
FLAGS = (["-O3", "-march=native", "-ffast-math"], ["-O3", "-ffast-math"])
COMPILE_TIMEOUT_S = 120


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_identity() -> str:
    """What `-march=native` compiles for: the CPU model and its instruction-set flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:  # not Linux
        return platform.processor()


def library_name(flags: list[str], compiler_version: str, cpu: str) -> str:
    parts = [SOURCE.read_bytes(), " ".join(flags).encode(), compiler_version.encode(),
             platform.machine().encode(), cpu.encode()]  # fmt: skip
    return f"cpu_decode_attention-{hashlib.sha256(b'|'.join(parts)).hexdigest()[:16]}.so"


def _build(out_dir: Path) -> Path | None:
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: decode attention uses torch SDPA")
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=COMPILE_TIMEOUT_S).stdout  # fmt: skip
    for flags in FLAGS:
        target = out_dir / library_name(flags, version, cpu_identity())
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=out_dir, suffix=".so.partial")
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", partial, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if done.returncode == 0:
                os.replace(partial, target)  # atomic: concurrent builders write the same bytes
                return target
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        log.info("`%s` failed: %s", " ".join(cmd), done.stderr.strip()[:500])
    log.warning("the CPU decode-attention kernel did not compile: decode attention uses SDPA")
    return None


@cache
def load() -> DecodeAttentionKernel | None:
    """The compiled kernel, or None where it cannot be built or loaded."""
    from cold_ray.model.loader import cache_dir

    try:
        path = _build(cache_dir() / "kernels")
        return None if path is None else DecodeAttentionKernel(ctypes.CDLL(str(path)))
    except (OSError, subprocess.SubprocessError) as e:  # unwritable cache, a hung compiler…
        log.warning("CPU decode-attention kernel unavailable (%s): decode attention uses SDPA", e)
        return None


class DecodeAttentionKernel:
    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.decode_attention
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fn.argtypes = [ptr] * 6 + [i64] * 7 + [ctypes.c_float]
        self._fn.restype = ctypes.c_int

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """q: [n, heads, dim]; k, v: one layer's cache [slots, kv_heads, max_len, dim];
        slots, positions: [n] int64 — token i attends to positions 0..positions[i] of its slot.
        Returns [n, heads, dim]."""
        n, heads, dim = q.shape
        if not (q.dtype == k.dtype == v.dtype == torch.float32 and k.stride() == v.stride()
                and k.stride(-1) == 1 and slots.dtype == positions.dtype == torch.int64
                and heads % k.shape[1] == 0 and k.shape[-1] == dim
                and all(t.device.type == "cpu" for t in (q, k, v, slots, positions))):  # fmt: skip
            raise ValueError("decode attention kernel: CPU fp32 q/k/v with matching strides and "
                             "head sizes, int64 slots/positions expected")  # fmt: skip
        q, slots, positions = q.contiguous(), slots.contiguous(), positions.contiguous()
        out = torch.empty_like(q)
        status = self._fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                          slots.data_ptr(), positions.data_ptr(), n, heads, k.shape[1], dim,
                          k.stride(0), k.stride(1), k.stride(2), dim**-0.5)  # fmt: skip
        if status != 0:
            raise MemoryError("decode attention kernel: out of memory for its score buffer")
        return out
