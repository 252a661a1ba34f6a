"""Overhead of the Ray Serve path (HTTP proxy → ingress → engine replica → SSE) over calling
the engine in-process, under the same load: N concurrent streams, same prompts and engine.

    cold-ray bench serve_overhead [--concurrency 16] [--max-tokens 64] [--mode cold|plain]

Each side runs in its own child process (the Serve side starts a private local Ray cluster
and speaks HTTP from the child, as a client would); sides alternate over `--rounds`. Prints
JSON: per side tokens/s and TTFT percentiles, and the overhead (tokens/s drop in %, p50 TTFT
difference in ms). TTFT is measured from sending the request to receiving its first token
(in-process: `submit` to the first output; Serve: HTTP request to the first SSE data line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cold_ray.benchmarks.common import THREAD_ENV, machine_record, run_json

DEMO = Path(__file__).resolve().parents[1] / "deployments" / "adapters" / "arith-demo"
CONFIG_KEYS = ("mode", "concurrency", "max_tokens", "prompt_len", "rounds", "repeat", "model",
               "adapter")  # fmt: skip


def _prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    text = " ".join(f"item {i} costs {i * 7 % 13} coins and weighs {i % 5} kg." for i in range(400))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [ids[i * 3 : i * 3 + length] for i in range(n)]


def _summary(ttfts: list[float], tokens: int, seconds: float) -> dict:
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else ttfts * 19
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p95_ms": round(1000 * q[18], 1),
    }


def _engine_config(a):

    rows = a.concurrency * (2 if a.mode == "cold" else 1)
    return dict(model=a.model, max_rows=max(rows, 2), max_model_len=a.prompt_len + a.max_tokens + 8,
                max_loras=1, max_lora_rank=a.max_lora_rank)  # fmt: skip


async def _inproc(a) -> dict:
    from cold_ray.config import EngineConfig
    from cold_ray.engine import AsyncEngine, ColdParams, SamplingParams

    engine = AsyncEngine(EngineConfig(**_engine_config(a)))
    engine.core.register_adapter("bench", a.adapter)
    engine.core.load_adapter("bench")
    cold = ColdParams() if a.mode == "cold" else None
    prompts = _prompts(engine.core.tokenizer, a.concurrency, a.prompt_len)

    async def one(prompt, max_tokens):
        t0 = time.perf_counter()
        ttft, n = None, 0
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        async for out in await engine.submit(prompt, params, "bench", cold):
            ttft = ttft or time.perf_counter() - t0
            n += len(out.token_ids)
        return ttft, n

    await asyncio.gather(*(one(p, 4) for p in prompts))  # warm-up
    results, seconds = [], 0.0
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        results += await asyncio.gather(*(one(p, a.max_tokens) for p in prompts))
        seconds += time.perf_counter() - t0
    engine.shutdown()
    return _summary([r[0] for r in results], sum(r[1] for r in results), seconds)


async def _http(url: str, a, prompts) -> dict:
    import httpx

    async def one(client, prompt, max_tokens):
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "cold": a.mode == "cold",
                "stream_options": {"include_usage": True}}  # fmt: skip
        t0 = time.perf_counter()
        ttft, n = None, 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    ttft = ttft or time.perf_counter() - t0
                    n = json.loads(line[6:]).get("usage", {}).get("completion_tokens", n)
        return ttft, n

    limits = httpx.Limits(max_connections=a.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(one(client, p, 4) for p in prompts))  # warm-up
        results, seconds = [], 0.0
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            results += await asyncio.gather(*(one(client, p, a.max_tokens) for p in prompts))
            seconds += time.perf_counter() - t0
    return _summary([r[0] for r in results], sum(r[1] for r in results), seconds)


def _serve(a) -> dict:
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from cold_ray.model.loader import resolve_model_path
    from cold_ray.serve.app import compose, prepare
    from cold_ray.serve.app_args import AppArgs

    tmp = Path(tempfile.mkdtemp(prefix="cold-bench-"))
    cfg = AppArgs(
        **{k: v for k, v in _engine_config(a).items()},
        registry=str(tmp / "registry.sqlite"), adapters=[{"name": "bench", "source": a.adapter}],
        cold_by_default=False, api_key_env="COLD_BENCH_NO_KEY", admin_key_env="COLD_BENCH_NO_KEY",
    )  # fmt: skip
    prepare(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(a.model)))
    prompts = _prompts(tokenizer, a.concurrency, a.prompt_len)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": a.concurrency * 2}
        serve.run(compose(cfg, engine), name="bench", route_prefix="/")
        result = asyncio.run(_http(f"http://127.0.0.1:{port}", a, prompts))
    finally:
        serve.shutdown()
        ray.shutdown()
    return result


def _child(side: str, a) -> dict:
    cmd = [sys.executable, "-m", "cold_ray.benchmarks.serve_overhead", "--side", side,
           "--concurrency", str(a.concurrency), "--max-tokens", str(a.max_tokens),
           "--prompt-len", str(a.prompt_len), "--mode", a.mode, "--adapter", a.adapter,
           "--max-lora-rank", str(a.max_lora_rank), "--repeat", str(a.repeat)] + (["--model", a.model] if a.model else [])  # fmt: skip
    return run_json(cmd, side)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cold-ray bench serve_overhead", description=__doc__)
    p.add_argument("--model", help="HF folder or .gguf (default SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=str(DEMO), help="PEFT adapter (default: the demo)")
    p.add_argument("--mode", choices=("cold", "plain"), default="cold")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each side")
    p.add_argument("--repeat", type=int, default=1, help="measured batches per run")
    p.add_argument("--side", choices=("inproc", "serve"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not Path(a.adapter, "adapter_model.safetensors").exists():
        print(f"error: no PEFT adapter at {a.adapter} (pass --adapter)", file=sys.stderr)
        return 2
    if a.side == "inproc":
        print(json.dumps(asyncio.run(_inproc(a))))
        return 0
    if a.side == "serve":
        print(json.dumps(_serve(a)))
        return 0
    runs = {"inproc": [], "serve": []}
    for r in range(a.rounds):
        for side in ("inproc", "serve") if r % 2 == 0 else ("serve", "inproc"):
            runs[side].append(_child(side, a))
    med = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in runs.items()}
    result = {
        "config": {k: getattr(a, k) for k in CONFIG_KEYS},
        "threads": THREAD_ENV,
        "machine": machine_record(),
        "inproc": med["inproc"],
        "serve": med["serve"],
        "runs": runs,
        "tokens_per_s_drop_pct": round(
            100 * (1 - med["serve"]["tokens_per_s"] / med["inproc"]["tokens_per_s"]), 1
        ),
        "ttft_p50_overhead_ms": round(
            med["serve"]["ttft_p50_ms"] - med["inproc"]["ttft_p50_ms"], 1
        ),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
