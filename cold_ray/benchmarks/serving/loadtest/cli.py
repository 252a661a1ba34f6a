"""`cold-ray loadtest`: start the service (or target one), run Locust headless, write the report.

    cold-ray loadtest --deployment deployments/cold.yaml --users 32 --spawn-rate 8 \
        --duration 60s --out results/lt --max-p95-ttft-ms 5000 --max-failure-rate 0
    cold-ray loadtest --host http://127.0.0.1:8000 --sweep 1,2,4,8,16,32 --duration 30s \
        --out results/sweep

Writes DIR/summary.json (requests, failures, rejected_503, rps, tokens_per_s, latency_ms /
ttft_ms / itl_ms with p50/p95/p99, per decoding and per endpoint), DIR/run.png, Locust's CSVs
and HTML, and per-request records. A missed threshold exits 1; a run that could not be made
(service down, Locust crashed) exits 2. `--sweep` runs every user count once with CoLD and once
with plain decoding on one service and writes DIR/sweep.json + DIR/sweep.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from cold_ray.benchmarks.common import positive_ints
from cold_ray.benchmarks.serving.loadtest.options import add_workload_args
from cold_ray.benchmarks.serving.loadtest.stats import THRESHOLDS, check_thresholds

DEFAULT_DEPLOYMENT = "deployments/cold.yaml"


def add_target_args(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument("--deployment", help=f"Serve YAML to start (default {DEFAULT_DEPLOYMENT})")
    target.add_argument("--host", help="URL of a running service instead of starting one")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a YAML field, e.g. applications.0.args.engine.model=/path",
    )
    p.add_argument(
        "--port", type=int, default=0, help="HTTP port for the started service (0: free)"
    )
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--locust-nice",
        type=int,
        default=10,
        help="niceness added to the Locust process (the replica wins contention)",
    )
    p.add_argument(
        "--locust-cpus",
        type=positive_ints,
        default=[],
        help="pin Locust to these cores, e.g. 1 (default: no pinning)",
    )


def workload_from(args: argparse.Namespace, **changes):
    from cold_ray.benchmarks.serving.loadtest.runner import Workload

    fields = {k: getattr(args, k) for k in Workload.__dataclass_fields__ if hasattr(args, k)}
    fields.update(changes)
    return Workload(**fields)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "loadtest",
        help="Locust load test (or --sweep) with a JSON + PNG report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(p)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all)")
    p.add_argument("--duration", default="60s", help="Locust -t: 60s, 2m, ...")
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds users get to finish their request when the time is up",
    )
    p.add_argument("--sweep", type=positive_ints, help="user counts, e.g. 1,2,4,8,16,32")
    p.add_argument("--sweep-decodings", default="cold,plain")
    for name, (_, kind, what) in THRESHOLDS.items():
        p.add_argument("--" + name.replace("_", "-"), type=float, help=f"{kind} {what}")
    add_workload_args(p)
    p.set_defaults(func=main_args)

    from cold_ray.benchmarks.serving.loadtest import soak

    soak.add_parser(subparsers)


@contextmanager
def service_for(args: argparse.Namespace):
    from cold_ray.benchmarks.serving.loadtest.service import Service

    if args.host:
        yield Service.attach(args.host)
        return
    svc = Service.from_yaml(
        args.deployment or DEFAULT_DEPLOYMENT,
        args.out,
        args.port,
        args.overrides,
        args.startup_timeout,
    )
    try:
        yield svc
    finally:
        svc.stop()


def one_run(url: str, args, users: int, out: Path, workload, procs: list | None = None) -> dict:
    """One Locust run into `out`: records → summary.json + run.png; returns the summary."""
    from cold_ray.benchmarks.serving.loadtest.report import plot_run
    from cold_ray.benchmarks.serving.loadtest.runner import (
        LocustPlacement,
        build_summary,
        run_locust,
    )

    placement = LocustPlacement(args.locust_nice, args.locust_cpus)
    spawn = args.spawn_rate or users
    records, rc = run_locust(
        url, users, spawn, args.duration, out, workload, placement, args.stop_timeout, procs
    )
    summary = build_summary(
        records,
        host=url,
        users=users,
        spawn_rate=spawn,
        duration=args.duration,
        workload=workload,
        placement=placement,
        locust_rc=rc,
        out_dir=out,
    )
    if records:
        plot_run(records, summary, out / "run.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _line(summary: dict) -> str:
    return (
        f"requests {summary['requests']} (ok {summary['ok']}, failures {summary['failures']}, "
        f"503 {summary['rejected_503']}) · {summary['rps']} req/s · "
        f"{summary['tokens_per_s']} tok/s · p95 latency {summary['latency_ms']['p95']} ms · "
        f"p95 TTFT {summary['ttft_ms']['p95']} ms · p95 ITL {summary['itl_ms']['p95']} ms"
    )


def main_args(args: argparse.Namespace) -> int:
    from cold_ray.benchmarks.serving.loadtest.service import ServiceError

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with service_for(args) as svc:
            if args.sweep:
                return _sweep(svc.url, args)
            summary = one_run(svc.url, args, args.users, args.out, workload_from(args))
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _judge(summary, args, args.out)


def _judge(summary: dict, args: argparse.Namespace, out: Path) -> int:
    print(_line(summary))
    print(f"report: {out / 'summary.json'}, {out / 'run.png'}")
    if summary["requests"] == 0:
        print(f"error: no request finished; see {out / 'locust.log'}", file=sys.stderr)
        return 2
    limits = {name: getattr(args, name, None) for name in THRESHOLDS}
    violations = check_thresholds(summary, limits)
    summary["thresholds"] = {
        "limits": {k: v for k, v in limits.items() if v is not None},
        "violations": violations,
        "passed": not violations,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for v in violations:
        print(f"THRESHOLD MISSED: {v}", file=sys.stderr)
    return 1 if violations else 0


def _sweep(url: str, args: argparse.Namespace) -> int:
    from cold_ray.benchmarks.serving.loadtest.report import plot_sweep

    points = []
    for decoding in [d for d in args.sweep_decodings.split(",") if d]:
        if decoding not in ("cold", "plain"):
            print(f"error: sweep decodings are cold and plain, got {decoding!r}", file=sys.stderr)
            return 2
        workload = workload_from(args, cold_fraction=1.0 if decoding == "cold" else 0.0)
        for users in args.sweep:
            out = args.out / f"{decoding}-u{users}"
            summary = one_run(url, args, users, out, workload)
            print(f"{decoding:5s} users {users:3d}: {_line(summary)}")
            keep = (
                "requests",
                "ok",
                "failures",
                "rejected_503",
                "rps",
                "tokens_per_s",
                "latency_ms",
                "ttft_ms",
                "itl_ms",
            )
            points.append({"decoding": decoding, "users": users, **{k: summary[k] for k in keep}})
    (args.out / "sweep.json").write_text(json.dumps({"points": points}, indent=2))
    plot_sweep(points, args.out / "sweep.png")
    print(f"report: {args.out / 'sweep.json'}, {args.out / 'sweep.png'}")
    return 0 if all(p["ok"] for p in points) else 2


def main(argv: list[str] | None = None) -> int:
    """`python -m cold_ray.benchmarks.serving.loadtest.cli ...` == `cold-ray loadtest ...`."""
    parser = argparse.ArgumentParser(prog="cold-ray")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["loadtest", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
