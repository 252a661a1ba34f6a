"""The C kernels' worker pool (`kernels/cpu_threads.c`) and the blocking they take from the CPU
(`cpu_kernels.blocking`): results never depend on the threads, concurrent callers and forked
children are served, and the blocking follows the CPU's flags and caches."""

import os
import threading

import pytest
import torch

from cold_ray.kernels import cpu_gemm, cpu_kernels
from cold_ray.kernels.cpu_kernels import Blocking, blocking_for
from tests.helpers import NO_COMPILER, compiler_present

needs_kernel = pytest.mark.skipif(not compiler_present(), reason=NO_COMPILER)


def test_blocking_follows_the_cpus_vector_registers():
    """Panel GEMM: two 16-float accumulators per row beside the weight vectors, 8 rows in
    AVX-512's 32 registers of 16 floats, 3 in AVX2's 16 of 8 or NEON's 32 of 4, 1 elsewhere.
    Row-major (LM head) dots: one accumulator per (row, output), 4 x 4 with AVX-512, 2 x 2
    with AVX2, 1 x 3 with NEON."""
    assert blocking_for("flags\t: fpu avx2 fma avx512f avx512bw\n", 2 << 20) == Blocking(
        "avx512", 8, 4, 4, 2 << 20
    )
    assert blocking_for("flags : sse4_2 avx avx2 fma\n", 512 << 10) == Blocking(
        "avx2", 3, 2, 2, 512 << 10
    )
    assert blocking_for("Features : fp asimd sve\n", None) == Blocking(
        "neon", 3, 1, 3, cpu_kernels.DEFAULT_L2_BYTES
    )
    generic = blocking_for("flags : sse2 avx\n", None)  # AVX without FMA
    assert (generic.row_block, generic.dot_rows, generic.dot_cols) == (1, 1, 1)


def _cache_index(root, name, level, kind, size):
    index = root / name
    index.mkdir()
    for file, text in (("level", level), ("type", kind), ("size", size)):
        (index / file).write_text(f"{text}\n")


def test_cache_sizes_are_read_from_sysfs(tmp_path):
    _cache_index(tmp_path, "index0", 1, "Data", "48K")
    _cache_index(tmp_path, "index1", 1, "Instruction", "32K")
    _cache_index(tmp_path, "index2", 2, "Unified", "2048K")
    _cache_index(tmp_path, "index3", 3, "Unified", "105M")
    assert cpu_kernels._cache_bytes(1, tmp_path) == 48 << 10
    assert cpu_kernels._cache_bytes(2, tmp_path) == 2 << 20
    assert cpu_kernels._cache_bytes(3, tmp_path) == 105 << 20
    assert cpu_kernels._cache_bytes(4, tmp_path) is None
    assert cpu_kernels._cache_bytes(2, tmp_path / "missing") is None


def test_this_machines_blocking_is_what_its_cpu_reports():
    here = cpu_kernels.blocking()
    assert here == blocking_for(cpu_kernels.cpu_identity(), cpu_kernels._cache_bytes(2))
    assert set(here.record()) == {"isa", "row_block", "dot_rows", "dot_cols", "l2_bytes"}


def test_a_thread_count_must_be_positive():
    with pytest.raises(ValueError, match="threads must be a positive integer, got 0"):
        cpu_kernels.Threaded().with_threads(0)


def _gemm_case(rows=40, k=576, out=960, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, x = torch.randn(out, k, generator=gen), torch.randn(rows, k, generator=gen)
    return cpu_gemm.to_panels([w])[0], x


@needs_kernel
def test_concurrent_callers_each_get_their_own_results():
    """Python threads calling kernels at once: one holds the pool, the others run alone."""
    kernel = cpu_gemm.load()
    cases = [_gemm_case(rows=3 + 9 * i, seed=i) for i in range(4)]
    want = [kernel(x, p) for p, x in cases]
    bad: list[int] = []

    def call(i: int) -> None:
        panels, x = cases[i]
        many = kernel.with_threads(2)
        for _ in range(100):
            if not torch.equal(many(x, panels), want[i]):
                bad.append(i)

    workers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not bad


@needs_kernel
def test_more_threads_than_cores_finish_every_call():
    """Workers the OS cannot schedule at once cost time, never a call: the caller takes the
    chunks nobody claimed."""
    panels, x = _gemm_case(rows=5)
    kernel = cpu_gemm.load()
    want, crowded = kernel(x, panels), kernel.with_threads(8)
    assert all(torch.equal(crowded(x, panels), want) for _ in range(2000))


@needs_kernel
def test_a_forked_child_runs_the_kernels_without_the_parents_workers():
    panels, x = _gemm_case(rows=9)
    kernel = cpu_gemm.load().with_threads(2)
    want = kernel(x, panels)  # the parent's workers are running
    pid = os.fork()
    if pid == 0:  # the child has the pool's state but none of its threads
        ok = all(torch.equal(kernel(x, panels), want) for _ in range(50))
        os._exit(0 if ok else 1)
    waited: list[int] = []
    waiter = threading.Thread(target=lambda: waited.append(os.waitpid(pid, 0)[1]))
    waiter.start()
    waiter.join(timeout=120)
    if not waited:
        os.kill(pid, 9)
        waiter.join()
        pytest.fail("the forked child's kernel call did not return")
    assert os.waitstatus_to_exitcode(waited[0]) == 0
