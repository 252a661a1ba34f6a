"""What the benchmarks share: one-thread child processes, their JSON, and the argument type
for comma-separated counts."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# One intra-op thread, no OpenMP spin-waiting: what an engine replica runs with.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1"}


def positive_ints(text: str) -> list[int]:
    """argparse type: "1,4,8" -> [1, 4, 8]; anything else is a usage error naming it."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def run_child(module: str, setting: dict) -> dict | None:
    """`python -m <module> --child <setting>` in a fresh one-thread process; its last stdout
    line is its JSON record, merged over `setting`. None (stderr shown) when it fails."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(setting)]
    res = subprocess.run(cmd, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return None
    return {**setting, **json.loads(res.stdout.strip().splitlines()[-1])}


def report(result: dict, as_json: bool, plot=None, plot_path: str | None = None) -> int:
    """Draw `plot(result...)` to `plot_path` if asked, print the JSON, exit code 0."""
    if plot_path and plot is not None:
        plot(plot_path)
    print(json.dumps(result, indent=None if as_json else 2))
    return 0
