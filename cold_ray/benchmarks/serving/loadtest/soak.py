"""`cold-ray soak`: a bounded overload soak of the deployment, with leak and stability checks.

    cold-ray soak --deployment deployments/cold.yaml --duration 10m --overload 2 --out DIR

1. Calibrate (unless `--target-rps` is given): a closed-loop Locust run (`--calibrate-users`
   users, `--calibrate` long) measures the requests/s the deployment sustains.
2. Soak: `--users` users pace themselves (open loop) to `--overload` × that rate in all, for
   `--duration`, while the engine replica's RSS and the engine's gauges (rows, KV use, queue)
   are sampled every `--sample-every` seconds.
3. Check, and exit 1 if any fails: no 5xx but deliberate 503 backpressure (and no other failed
   request); the engine queue stays bounded; the engine replica's RSS grows < `--max-rss-growth`
   from minute 2 (`--rss-baseline-s`) to the end; once the load stops the engine's rows, KV
   cache and queue drain back to zero.

Writes DIR/soak.json, DIR/soak.png and the soak run's summary.json / run.png / records.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time


def add_parser(subparsers) -> None:
    from cold_ray.benchmarks.serving.loadtest.cli import add_target_args
    from cold_ray.benchmarks.serving.loadtest.options import add_workload_args

    p = subparsers.add_parser(
        "soak",
        help="bounded overload soak: 503-only errors, bounded queue, no leaks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(p)
    p.add_argument("--duration", default="10m")
    p.add_argument("--users", type=int, default=64, help="open-loop users sharing the rate")
    p.add_argument("--spawn-rate", type=float)
    p.add_argument("--stop-timeout", type=float, default=60.0)
    p.add_argument("--target-rps", type=float, help="skip calibration: offer this rate")
    p.add_argument("--overload", type=float, default=2.0, help="offered / sustained rate")
    p.add_argument("--calibrate", default="30s", help="length of the calibration run")
    p.add_argument("--calibrate-users", type=int, default=16)
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--rss-baseline-s", type=float, default=120.0)
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument(
        "--max-queue", type=int, help="bound on engine waiting requests (default: no bound checked)"
    )
    add_workload_args(p)
    p.set_defaults(func=main_args)


GAUGES = ("running_rows", "running_requests", "waiting_requests", "kv_cache_usage")


def parse_gauges(text: str) -> dict[str, float]:
    """Sum `ray_cold_<gauge>` over replicas from Prometheus exposition text."""
    out = dict.fromkeys(GAUGES, 0.0)
    seen = False
    for line in text.splitlines():
        if not line.startswith("ray_cold_"):
            continue
        name, _, value = line.rpartition(" ")
        key = name.split("{", 1)[0][len("ray_cold_") :]
        if key in out:
            out[key] += float(value)
            seen = True
    return out if seen else {}


class EngineGauges:
    """The engine gauges (rows, requests, queue, KV use) from the cluster's Prometheus export.

    Ray reports metrics every few seconds, so a value lags the engine by up to that long.
    """

    def __init__(self, service):
        self.service = service
        self.url: str | None = None

    def read(self) -> dict | None:
        from http.client import HTTPException

        from cold_ray.benchmarks.serving.loadtest.service import http_get

        urls = [self.url] if self.url else self.service.metrics_urls()
        for url in urls:
            try:
                status, body = http_get(url, timeout=5)
            except (OSError, ValueError, HTTPException):  # e.g. the agent's gRPC port
                continue
            gauges = parse_gauges(body.decode(errors="replace")) if status == 200 else {}
            if gauges:
                self.url = url
                return gauges
        return None


def replica_rss_mib(pids: list[int]) -> float | None:
    """RSS of the largest Serve replica process (the engine: it holds the model weights)."""
    import psutil

    sizes = []
    for pid in pids:
        try:
            sizes.append(psutil.Process(pid).memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return max(sizes) / 2**20 if sizes else None


def checks(summary: dict, samples: list[dict], final: dict | None, args) -> dict:
    """The soak's pass/fail verdicts, each with the numbers it was judged on."""
    out = {}
    five_xx = {k: v for k, v in summary["errors"].items() if k[:1] == "5"}
    out["only_503_errors"] = {
        "passed": summary["failures"] == 0,
        "failures": summary["failures"],
        "rejected_503": summary["rejected_503"],
        "other_5xx": five_xx,
        "errors": summary["errors"],
    }
    rss = [(s["t"], s["rss_mib"]) for s in samples if s.get("rss_mib") is not None]
    if rss:
        base = next((m for t, m in rss if t >= args.rss_baseline_s), rss[0][1])
        growth = (rss[-1][1] - base) / base
        out["rss_growth"] = {
            "passed": growth < args.max_rss_growth,
            "baseline_mib": round(base, 1),
            "end_mib": round(rss[-1][1], 1),
            "growth": round(growth, 4),
            "limit": args.max_rss_growth,
        }
    else:
        out["rss_growth"] = {"passed": None, "why": "replica process not found (use --deployment)"}
    waits = [s["engine"]["waiting_requests"] for s in samples if s.get("engine")]
    if waits:
        peak = max(waits)
        ok = args.max_queue is None or peak <= args.max_queue
        out["bounded_queue"] = {"passed": ok, "peak_waiting": peak, "limit": args.max_queue}
    else:
        out["bounded_queue"] = {"passed": None, "why": "engine stats not available"}
    if final is not None:
        drained = all(final[k] == 0 for k in final)
        out["drained"] = {"passed": drained, "after_load": final}
    else:
        out["drained"] = {"passed": None, "why": "engine stats not available"}
    return out


def main_args(args: argparse.Namespace) -> int:
    from cold_ray.benchmarks.serving.loadtest.cli import _line, one_run, service_for, workload_from
    from cold_ray.benchmarks.serving.loadtest.report import plot_soak
    from cold_ray.benchmarks.serving.loadtest.service import ServiceError

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with service_for(args) as svc:
            target = args.target_rps
            calibration = None
            if target is None:
                cal = argparse.Namespace(**{**vars(args), "duration": args.calibrate})
                calibration = one_run(
                    svc.url, cal, args.calibrate_users, args.out / "calibrate", workload_from(args)
                )
                print(f"calibration: {_line(calibration)}")
                target = args.overload * calibration["rps"]
                if target <= 0:
                    print("error: calibration finished no request", file=sys.stderr)
                    return 2
            workload = workload_from(args, rps_per_user=target / args.users)
            pids = svc.replica_pids()
            samples: list[dict] = []
            gauges = EngineGauges(svc)
            result: dict = {}
            procs: list = []
            runner = threading.Thread(
                target=lambda: result.update(
                    summary=one_run(svc.url, args, args.users, args.out, workload, procs)
                ),
                daemon=True,
            )
            t0 = time.monotonic()
            runner.start()
            try:
                while runner.is_alive():
                    samples.append(
                        {
                            "t": round(time.monotonic() - t0, 1),
                            "rss_mib": replica_rss_mib(pids),
                            "engine": gauges.read(),
                        }
                    )
                    runner.join(args.sample_every)
            finally:  # never leave Locust hammering a service that is going away
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
            final = None
            for _ in range(30):  # Ray exports gauges every few seconds: wait for fresh ones
                time.sleep(1.0)
                final = gauges.read()
                if final is None or all(v == 0 for v in final.values()):
                    break
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = result.get("summary")
    if not summary or summary["requests"] == 0:
        print(
            f"error: the soak finished no request; see {args.out / 'locust.log'}", file=sys.stderr
        )
        return 2
    verdicts = checks(summary, samples, final, args)
    report = {
        "offered_rps": round(target, 3),
        "users": args.users,
        "duration": args.duration,
        "calibration": calibration and {k: calibration[k] for k in ("rps", "tokens_per_s")},
        "summary": {
            k: summary[k]
            for k in (
                "requests",
                "ok",
                "failures",
                "rejected_503",
                "rps",
                "tokens_per_s",
                "latency_ms",
                "ttft_ms",
                "errors",
            )
        },
        "checks": verdicts,
        "samples": samples,
        "passed": all(v["passed"] is not False for v in verdicts.values()),
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    if samples:
        plot_soak(samples, args.out / "soak.png")
    print(f"soak: offered {target:.2f} req/s · {_line(summary)}")
    for name, v in verdicts.items():
        print(
            f"  {name}: {'PASS' if v['passed'] else 'n/a' if v['passed'] is None else 'FAIL'} "
            f"{ {k: x for k, x in v.items() if k != 'passed'} }"
        )
    print(f"report: {args.out / 'soak.json'}, {args.out / 'soak.png'}")
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cold-ray")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["soak", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
