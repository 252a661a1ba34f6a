"""Run Locust headless in a process of its own and turn its records into `summary.json`.

Locust runs as a separate Python process (gevent must patch the standard library before
torch/ray are imported) at a lower CPU priority (`nice`, default +10) and optionally pinned to
given cores, so that on a small machine the load generator does not take cycles from the
replica it measures. The priority and pinning used are written into the summary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cold_ray.benchmarks.common import host_record
from cold_ray.benchmarks.serving.loadtest.stats import summarize, summarize_by


@dataclass
class Workload:
    """What the simulated users send (forwarded to the locustfile's options)."""

    mix: str = "zipf"
    adapters: str = ""
    cold_fraction: float = 0.5
    alpha: float = 0.1
    beta: float = 0.5
    chat_fraction: float = 0.5
    stream_fraction: float = 0.5
    prompt_tokens: str = "uniform:48:160"
    prompt_mode: str = "random"  # random | fewshot | system (shared prefixes)
    shots: int = 8
    max_tokens: str = "fixed:64"
    ignore_eos: bool = False
    think_time: float = 0.0
    rps_per_user: float = 0.0
    request_timeout: float = 600.0
    workload_seed: int = 0

    def locust_args(self) -> list[str]:
        args = []
        for key, value in asdict(self).items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args += [flag] if value else []
            elif value != "":
                args += [flag, str(value)]
        return args


@dataclass
class LocustPlacement:
    nice: int = 10  # added to Locust's niceness: the replica wins when they contend
    cpus: list[int] = field(default_factory=list)  # pin Locust to these cores ([] = no pin)


def parse_duration(text: str) -> float:
    """'60s', '2m', '1h30m', '45' → seconds (Locust's -t syntax)."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"duration {text!r} must look like 60s, 2m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def locustfile_path() -> str:
    return importlib.util.find_spec("cold_ray.benchmarks.serving.loadtest.locustfile").origin


def run_locust(
    host: str,
    users: int,
    spawn_rate: float,
    duration: str,
    out_dir: Path,
    workload: Workload,
    placement: LocustPlacement,
    stop_timeout: float = 30.0,
    procs: list | None = None,
) -> tuple[list[dict], int]:
    """Run one headless Locust test; return (its request records, Locust's exit code).

    The Locust process is appended to `procs` while it runs, so a caller running this in a
    thread can stop it if the caller itself fails.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / "records.jsonl"
    records_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        locustfile_path(),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(spawn_rate),
        "-t",
        duration,
        "--host",
        host,
        "--stop-timeout",
        f"{int(stop_timeout)}s",
        "--csv",
        str(out_dir / "locust"),
        "--html",
        str(out_dir / "locust.html"),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--records",
        str(records_path),
        *workload.locust_args(),
    ]

    def placed():  # runs in the child before exec
        if placement.nice:
            os.nice(placement.nice)
        if placement.cpus:
            os.sched_setaffinity(0, placement.cpus)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(out_dir / "locust.log", "wb") as log:
        with subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=placed
        ) as proc:
            if procs is not None:
                procs.append(proc)
            try:
                proc.wait(timeout=parse_duration(duration) + stop_timeout + 120)
            except BaseException:
                proc.kill()
                raise
    records = []
    if records_path.exists():
        records = [json.loads(line) for line in records_path.read_text().splitlines() if line]
    return records, proc.returncode


def build_summary(
    records: list[dict],
    *,
    host: str,
    users: int,
    spawn_rate: float,
    duration: str,
    workload: Workload,
    placement: LocustPlacement,
    locust_rc: int,
    out_dir: Path,
) -> dict:
    summary = summarize(records)
    summary["by_decoding"] = summarize_by(records, "decoding")
    summary["by_endpoint"] = summarize_by(records, "endpoint")
    summary["run"] = {
        "host": host,
        "users": users,
        "spawn_rate": spawn_rate,
        "duration_s": parse_duration(duration),
        "workload": asdict(workload),
        "locust": {
            "nice": placement.nice,
            "cpus": placement.cpus,
            "exit_code": locust_rc,
            "log": str(out_dir / "locust.log"),
            "csv": str(out_dir / "locust_stats.csv"),
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": host_record(),
    }
    return summary
