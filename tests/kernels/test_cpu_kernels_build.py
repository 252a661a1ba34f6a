"""The CPU kernels' build (`cold_ray/kernels/cpu_kernels.py`): compiled once per machine into the cache
folder, keyed by the CPU, and without a working compiler the engine keeps torch's operators."""

import os
import subprocess
import sys
import textwrap

import pytest

from cold_ray.kernels import cpu_kernels
from tests.helpers import NO_COMPILER, compiler_present

needs_library = pytest.mark.skipif(not compiler_present(), reason=NO_COMPILER)


@needs_library
def test_the_kernels_build_wherever_a_compiler_is_present():
    """A kernel that does not compile while a compiler is present is a failure, never a silent
    fall-back to torch's operators."""
    assert cpu_kernels.library() is not None, f"{cpu_kernels.compiler()} did not build the kernels"


PROBE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO)
    from cold_ray.config import EngineConfig
    from cold_ray.engine import EngineCore, SamplingParams
    from cold_ray.kernels import cpu_kernels
    print("LIBRARY", cpu_kernels.library() is not None)
    core = EngineCore(EngineConfig(model=sys.argv[1], max_rows=2, max_model_len=32))
    print("ATTENTION", core.model.layers[0].self_attn.decode_kernel is not None)
    print("GEMM", core.model.layers[0].mlp.down_proj.panels is not None)
    out = core.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    print("TOKENS", len(out[0]["token_ids"]))
""")


def _probe(tiny_llama, tmp_path, **env):
    env = {**os.environ, "COLD_RAY_CACHE": str(tmp_path / "cache"), **env}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tiny_llama)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


@pytest.mark.parametrize(
    "env",
    [{"PATH": "/nonexistent", "CC": ""}, {"CC": "/bin/false"}],
    ids=["no compiler", "compiler fails"],
)
def test_without_a_working_compiler_the_engine_uses_torch(tiny_llama, tmp_path, env):
    out, err = _probe(tiny_llama, tmp_path, **env)
    assert "LIBRARY False" in out and "ATTENTION False" in out and "GEMM False" in out, out
    assert "TOKENS 4" in out, out
    assert "decode attention: torch SDPA" in err and "products: BLAS" in err, err[-2000:]
    assert not list((tmp_path / "cache").glob("kernels/*.partial"))


@needs_library
def test_compiled_once_per_machine(tiny_llama, tmp_path):
    """The first process compiles both kernels into one library in the cache folder; the next
    one loads that library."""
    out, err = _probe(tiny_llama, tmp_path)
    assert "LIBRARY True" in out and "ATTENTION True" in out and "GEMM True" in out, out
    assert "TOKENS 4" in out, out
    assert "decode attention: C kernel" in err and "products: C kernel" in err, err[-2000:]
    built = list((tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so", built
    stamp = (built[0].stat().st_ino, built[0].stat().st_mtime_ns)
    out, _ = _probe(tiny_llama, tmp_path)
    assert "LIBRARY True" in out, out
    again = list((tmp_path / "cache" / "kernels").iterdir())
    assert again == built and (again[0].stat().st_ino, again[0].stat().st_mtime_ns) == stamp


def test_the_library_is_keyed_by_the_cpu_it_was_built_for():
    """A cache folder shared by machines with different CPUs (an NFS home across a Ray
    cluster) must not hand a machine a library built with instructions it lacks."""
    here = cpu_kernels.cpu_identity()
    assert here  # model name / flags read from this machine
    flags, version = cpu_kernels.FLAGS[0], "cc 1.0"
    name = cpu_kernels.library_name(flags, version, here)
    assert name == cpu_kernels.library_name(flags, version, here)
    assert name != cpu_kernels.library_name(flags, version, here + "flags : avx512f\n")
    assert name != cpu_kernels.library_name(flags, "cc 2.0", here)
    assert name != cpu_kernels.library_name(cpu_kernels.FLAGS[1], version, here)
