"""The CPU C kernels (`cpu_decode_attention.c`, `cpu_small_gemm.c`, `cpu_rowwise.c` in the
repository's `kernels/`, shipped as `cold_ray/kernels/csrc/`), compiled once per machine.

They are built into one shared library with the system C compiler (`$CC`, else
`cc`/`gcc`/`clang`) for this machine (`-march=native`) in the cold-ray cache folder, keyed by
the sources, flags, compiler and CPU: a cache folder shared by machines with other CPUs (an NFS
home across a Ray cluster) never hands one a library built for instructions it lacks. Where no
compiler works, `library()` returns None and the model keeps torch's operators (SDPA, BLAS).
The kernels run on one thread: the engine uses them when torch runs one intra-op thread (the
default). `cpu_attention.py`, `cpu_gemm.py` and `cpu_rowwise.py` wrap them.
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

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).parent / "csrc" / n
    for n in ("cpu_decode_attention.c", "cpu_small_gemm.c", "cpu_rowwise.c")
)
# -ffast-math: vectorised dot products and exp (glibc's libmvec); the sources hold no infinity
# or NaN test that the finite-math assumption could remove.
FLAGS = (["-O3", "-march=native", "-ffast-math"], ["-O3", "-ffast-math"])
COMPILE_TIMEOUT_S = 120


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
    parts = [*(s.read_bytes() for s in SOURCES), " ".join(flags).encode(),
             compiler_version.encode(), platform.machine().encode(), cpu.encode()]  # fmt: skip
    return f"cold_ray_cpu-{hashlib.sha256(b'|'.join(parts)).hexdigest()[:16]}.so"


def _build(out_dir: Path) -> Path | None:
    cc = compiler()
    if cc is None:
        log.info("no C compiler found: the CPU kernels are not built")
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
