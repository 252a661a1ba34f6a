"""Time to first token through the whole Serve path (HTTP → ingress → engine replica → SSE)
with N concurrent streams on one resident adapter — optionally for two installations side by
side, e.g. before and after a change.

    cold-ray bench ttft_concurrency [--concurrency 64] [--max-tokens 4] [--kind completion|chat]
        [--rounds 3] [--baseline-python /path/to/other/venv/bin/python]

Each run is a child process with its own local Ray cluster and Serve app (SmolLM2 + the demo
adapter by default). It makes the adapter resident, sends one warm-up wave, then `--repeat`
waves of N concurrent streaming requests with text prompts (so the replica tokenises them),
and records each request's TTFT: from sending it to its first SSE data line. With
`--baseline-python`, runs alternate between that interpreter's cold-ray and this one's over
`--rounds`, so both sample the same machine load. Prints JSON: per side the TTFT p50/p90/p99
over every request of every round, and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# No cold_ray import at module level: with --baseline-python this file runs as a script under
# another installation's cold_ray, which may predate any module the parent side uses.

DEMO = Path(__file__).resolve().parents[1] / "deployments" / "adapters" / "arith-demo"


def _prompt(i: int, words: int) -> str:
    text = " ".join(f"item {i + k} costs {(i + k) * 7 % 13} coins" for k in range(words))
    return f"Question: {text}. What is the total?\nAnswer:"


def _body(a, i: int, max_tokens: int) -> tuple[str, dict]:
    body = {
        "model": "bench",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }  # fmt: skip  (no `cold`: the adapter's default, CoLD)
    if a.kind == "chat":
        body["messages"] = [{"role": "user", "content": _prompt(i, a.prompt_words)}]
        return "/v1/chat/completions", body
    body["prompt"] = _prompt(i, a.prompt_words)
    return "/v1/completions", body


async def _waves(url: str, a) -> list[float]:
    import httpx

    async def one(client, i, max_tokens):
        path, body = _body(a, i, max_tokens)
        t0 = time.perf_counter()
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
            ttft = None
            async for line in r.aiter_lines():
                if line.startswith("data: {") and ttft is None:
                    ttft = time.perf_counter() - t0
        return ttft

    limits = httpx.Limits(max_connections=a.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one(client, 0, 1)  # the adapter becomes resident
        await asyncio.gather(*(one(client, i, 1) for i in range(a.concurrency)))  # warm-up
        ttfts = []
        for w in range(a.repeat):
            n = a.concurrency
            ttfts += await asyncio.gather(*(one(client, w * n + i, a.max_tokens) for i in range(n)))
    return ttfts


def _run(a) -> dict:
    """One side, in this process: a private Ray cluster, the app, the waves."""
    import socket

    import ray
    from ray import serve

    from cold_ray.serve.app import compose, prepare
    from cold_ray.serve.app_args import AppArgs

    tmp = Path(tempfile.mkdtemp(prefix="cold-ttft-"))
    rows = 2 * a.concurrency  # every CoLD request admitted at once: no wait for rows
    cfg = AppArgs(
        registry=str(tmp / "registry.sqlite"),
        adapters=[{"name": "bench", "source": a.adapter}],
        api_key_env="COLD_BENCH_NO_KEY",
        admin_key_env="COLD_BENCH_NO_KEY",
        engine=dict(
            model=a.model,
            max_rows=rows,
            max_model_len=a.prompt_words * 12 + a.max_tokens + 64,
            max_loras=1,
            max_lora_rank=64,
        ),
    )
    prepare(cfg)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": rows,
                  "max_queued_requests": rows}  # fmt: skip
        serve.run(compose(cfg, engine), name="bench", route_prefix="/")
        ttfts = asyncio.run(_waves(f"http://127.0.0.1:{port}", a))
    finally:
        serve.shutdown()
        ray.shutdown()
    import cold_ray.serve.app as app

    return {"cold_ray": str(Path(app.__file__).parents[1]), "ttft_s": ttfts,
            "loadavg_1m": os.getloadavg()[0]}  # fmt: skip


def _child(python: str, a) -> dict:
    from cold_ray.benchmarks.common import run_json

    cmd = [python, str(Path(__file__).resolve()), "--side", "run", "--concurrency",
           str(a.concurrency), "--max-tokens", str(a.max_tokens), "--kind", a.kind,
           "--prompt-words", str(a.prompt_words), "--repeat", str(a.repeat), "--adapter",
           a.adapter] + (["--model", a.model] if a.model else [])  # fmt: skip
    # cwd elsewhere: Ray puts the driver's working directory on its workers' sys.path, which
    # would let a checkout there shadow the cold_ray installed for `python`
    return run_json(cmd, python, cwd=tempfile.gettempdir())


def _percentiles(xs: list[float]) -> dict:
    from cold_ray.loadtest.stats import percentile

    return {"n": len(xs), "ttft_p50_ms": round(1000 * percentile(xs, 50), 1),
            "ttft_p90_ms": round(1000 * percentile(xs, 90), 1),
            "ttft_p99_ms": round(1000 * percentile(xs, 99), 1),
            "ttft_max_ms": round(1000 * max(xs), 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cold-ray bench ttft_concurrency", description=__doc__)
    p.add_argument("--model", help="HF folder or .gguf (default SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=str(DEMO), help="PEFT adapter (default: the demo)")
    p.add_argument("--kind", choices=("completion", "chat"), default="completion")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--prompt-words", type=int, default=4, help="'item i costs c coins' phrases")
    p.add_argument("--repeat", type=int, default=2, help="measured waves per run")
    p.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating")
    p.add_argument("--baseline-python", help="interpreter of another cold-ray installation")
    p.add_argument("--side", choices=("run",), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not Path(a.adapter, "adapter_model.safetensors").exists():
        print(f"error: no PEFT adapter at {a.adapter} (pass --adapter)", file=sys.stderr)
        return 2
    if a.side == "run":
        print(json.dumps(_run(a)))
        return 0
    from cold_ray.benchmarks.common import THREAD_ENV, machine_record

    sides = {"current": sys.executable}
    if a.baseline_python:
        sides = {"baseline": a.baseline_python, **sides}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(a.rounds):
        for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            runs[side].append(_child(sides[side], a))
    result = {
        "config": {
            k: getattr(a, k)
            for k in (
                "kind",
                "concurrency",
                "max_tokens",
                "prompt_words",
                "repeat",
                "rounds",
                "model",
            )
        },  # fmt: skip
        "threads": THREAD_ENV,
        "machine": machine_record(),
    }
    for side, rs in runs.items():
        result[side] = {
            **_percentiles([t for r in rs for t in r["ttft_s"]]),
            "per_round_p99_ms": [_percentiles(r["ttft_s"])["ttft_p99_ms"] for r in rs],
            "loadavg_1m": [round(r["loadavg_1m"], 2) for r in rs],
            "cold_ray": rs[0]["cold_ray"],
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
