"""The CPU C kernels (`cpu_decode_attention.c`, `cpu_gemm.c`, `cpu_rowwise.c` and their
worker pool `cpu_threads.c` in the repository's `kernels/`, shipped as `cold_ray/kernels/csrc/`),
compiled once per machine, and the blocking they take from the CPU they run on.

They are built into one shared library with the system C compiler (`$CC`, else
`cc`/`gcc`/`clang`) for this machine (`-march=native`) in the cold-ray cache folder, keyed by
the sources, flags, compiler and CPU: a cache folder shared by machines with other CPUs (an NFS
home across a Ray cluster) never hands one a library built for instructions it lacks. Where no
compiler works, `library()` returns None and the model keeps torch's operators (SDPA, BLAS).
Every kernel takes a thread count: it splits its work into chunks with disjoint outputs over a
pool of workers that it shares with nothing else (`cpu_threads.c` says why not OpenMP), and a
result never depends on the count. `cpu_attention.py`, `cpu_gemm.py` and `cpu_rowwise.py` wrap
them.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(
    CSRC / n for n in ("cpu_decode_attention.c", "cpu_gemm.c", "cpu_rowwise.c", "cpu_threads.c")
)
HEADERS = (CSRC / "cpu_threads.h",)
# -ffast-math: vectorised dot products and exp (glibc's libmvec); the sources hold no infinity
# or NaN test that the finite-math assumption could remove. -pthread: the worker pool.
FLAGS = (["-O3", "-march=native", "-ffast-math", "-pthread"], ["-O3", "-ffast-math", "-pthread"])
COMPILE_TIMEOUT_S = 300  # a loaded machine (or a slow one) builds for minutes


def compiler() -> str | None:
    """The C compiler the kernels are built with ($CC, cc, gcc or clang), or None."""
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
    parts = [
        *(s.read_bytes() for s in SOURCES + HEADERS),
        " ".join(flags).encode(),
        compiler_version.encode(),
        platform.machine().encode(),
        cpu.encode(),
    ]
    return f"cold_ray_cpu-{hashlib.sha256(b'|'.join(parts)).hexdigest()[:16]}.so"


def _build(out_dir: Path) -> Path | None:
    cc = compiler()
    if cc is None:
        log.info("no C compiler found: the CPU kernels are not built")
        return None
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
    ).stdout
    for flags in FLAGS:
        target = out_dir / library_name(flags, version, cpu_identity())
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=out_dir, suffix=".so.partial")
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", partial, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if done.returncode == 0:
                os.replace(partial, target)  # atomic: concurrent builders write the same bytes
                return target
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        log.info("`%s` failed: %s", " ".join(cmd), done.stderr.strip()[:500])
    log.warning("the CPU kernels did not compile")
    return None


@cache
def library() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built or loaded."""
    from cold_ray.model.loader import cache_dir

    try:
        path = _build(cache_dir() / "kernels")
        return None if path is None else ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:  # unwritable cache, a hung compiler…
        log.warning("CPU kernels unavailable (%s)", e)
        return None


# ---- what the kernels take from the CPU -------------------------------------------------------

DEFAULT_L2_BYTES = 1 << 20  # where the OS does not say (a typical per-core L2 of recent x86)


@dataclass(frozen=True)
class Blocking:
    """How the kernels split their work on this CPU, read from what it reports.

    Register blocks, as many 16-float accumulators as fit the CPU's vector registers beside the
    vectors being read (32 registers of 16 floats with AVX-512; 16 of 8 with AVX2; 32 of 4
    with NEON; `cold-ray bench gemm --row-blocks` measures the GEMM's):
    `row_block`: rows of x per panel of 16 outputs, two accumulators each (the panel GEMM's
    fixed summation order): 8 with AVX-512, 3 with AVX2 (12 registers).
    `dot_rows` x `dot_cols`: rows of x by outputs of a row-major weight (the LM head), one
    accumulator each: 4 x 4 with AVX-512, 2 x 2 with AVX2.
    `l2_bytes`: the per-core L2 cache, which bounds what a thread takes at a time (a quarter of
    it in weights, half of it in rows of x)."""

    isa: str  # avx512 | avx2 | neon | generic
    row_block: int
    dot_rows: int
    dot_cols: int
    l2_bytes: int

    def record(self) -> dict:
        return asdict(self)


def _cache_bytes(level: int, root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of cpu0's data or unified cache at `level`, from sysfs (None where not reported)."""
    try:
        for index in sorted(root.glob("index*")):
            kind = (index / "type").read_text().strip()
            if int((index / "level").read_text()) == level and kind in ("Data", "Unified"):
                text = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
                return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return None
    return None


def blocking_for(cpu: str, l2_bytes: int | None) -> Blocking:
    """The blocking for a CPU described by /proc/cpuinfo's text and its L2 size."""
    flags = cpu_flags(cpu)
    if "avx512f" in flags:
        isa, row_block, dot = "avx512", 8, (4, 4)
    elif "avx2" in flags and "fma" in flags:
        isa, row_block, dot = "avx2", 3, (2, 2)
    elif "asimd" in flags:  # 32 registers of 4 floats: 8 per row, 4 per weight vector
        isa, row_block, dot = "neon", 3, (1, 3)
    else:
        isa, row_block, dot = "generic", 1, (1, 1)
    return Blocking(isa, row_block, *dot, l2_bytes or DEFAULT_L2_BYTES)


@cache
def blocking() -> Blocking:
    """This machine's blocking (logged once by the engine, recorded by the benchmarks)."""
    return blocking_for(cpu_identity(), _cache_bytes(2))


# CPU flags of bf16 dot-product / matrix instructions (x86 AVX512-BF16 and AMX, Arm BF16):
# where a CPU has them, bf16 is its fast precision (`auto_dtype`).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpu: str) -> set[str]:
    """The first CPU's flags (x86 "flags", Arm "Features") in /proc/cpuinfo's text."""
    for line in cpu.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def auto_dtype(device: str, cpu: str | None = None) -> str:
    """What `dtype: auto` serves on `device` ("cpu", "cuda[:i]", "npu[:i]"): on a CPU,
    bfloat16 where it has bf16 matrix instructions, else float32 (without them bf16 only
    halves the bytes read; fp32 keeps the checkpoint's precision); bfloat16 on CUDA, float16
    on Ascend NPUs (what their deployments name)."""
    kind = device.split(":")[0]
    if kind == "cuda":
        return "bfloat16"
    if kind == "npu":
        return "float16"
    flags = cpu_flags(cpu_identity() if cpu is None else cpu)
    return "bfloat16" if flags & set(BF16_FLAGS) else "float32"


class Threaded:
    """A kernel wrapper bound to a thread count: `with_threads(n)` gives a copy that splits its
    work over n threads (the caller and n - 1 pool workers); itself where n is its count."""

    threads = 1

    def with_threads(self, threads: int) -> Threaded:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        if threads == self.threads:
            return self
        bound = copy.copy(self)
        bound.threads = threads
        return bound
