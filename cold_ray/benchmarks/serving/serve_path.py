"""What the Serve path (HTTP proxy → ingress → engine replica → SSE) costs over calling the
engine in-process, and time to first token with N concurrent streams — optionally for another
installation side by side (before and after a change).

    cold-ray bench serving --scenario overhead [--concurrency 16] [--max-tokens 64]
        [--decoding cold|plain] [--kind completion|chat] [--sides inproc,serve]
        [--rounds 1] [--repeat 1] [--baseline-python /other/venv/bin/python]

Sides, each a child process, alternating over `--rounds` so that all sample the same load:
- inproc: `AsyncEngine` in the child, the same prompts and engine settings;
- serve: a private local Ray cluster running the app (SmolLM2 + the demo adapter by default),
  spoken to over HTTP from the child, as a client would;
- baseline (with `--baseline-python`): the serve side under that interpreter's cold-ray. This
  file then runs as a script there, so it imports nothing of cold_ray at module level.
Every side makes the adapter resident, sends one warm-up wave, then `--repeat` waves of N
concurrent streaming requests with text prompts (the replica tokenises them), each decoding
`--max-tokens` tokens (EOS ignored). TTFT runs from sending a request to its first token
(in-process: `submit` to the first output; HTTP: to the first SSE data line).

Prints JSON: per side tokens/s (tokens ÷ the waves' wall time) and TTFT p50/p90/p99/max over
every request of every round, each round's p99 and load average; the serve side's tokens/s drop
(%) and p50 TTFT difference (ms) against inproc; the settings and the machine.
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

SIDES = ("inproc", "serve")
DEMO = Path(__file__).resolve().parents[2] / "deployments" / "adapters" / "arith-demo"
SETTINGS = "kind decoding concurrency max_tokens prompt_words repeat rounds model adapter".split()


def _prompt(i: int, words: int) -> str:
    text = " ".join(f"item {i + k} costs {(i + k) * 7 % 13} coins" for k in range(words))
    return f"Question: {text}. What is the total?\nAnswer:"


def _engine(a) -> dict:
    rows = max(2, a.concurrency * (2 if a.decoding == "cold" else 1))  # all admitted at once
    length = a.prompt_words * 12 + a.max_tokens + 64
    return dict(model=a.model, max_rows=rows, max_loras=1, max_lora_rank=64, max_model_len=length)


async def _waves(one, a) -> tuple[list[float], int, float]:
    """Residency, warm-up, then the measured waves: (TTFTs, tokens, seconds)."""
    await one(0, 1)
    await asyncio.gather(*(one(i, 1) for i in range(a.concurrency)))
    ttfts, tokens, seconds = [], 0, 0.0
    for w in range(a.repeat):
        t0 = time.perf_counter()
        n = a.concurrency
        results = await asyncio.gather(*(one(w * n + i, a.max_tokens) for i in range(n)))
        seconds += time.perf_counter() - t0
        ttfts += [r[0] for r in results]
        tokens += sum(r[1] for r in results)
    return ttfts, tokens, seconds


async def _inproc(a) -> tuple[list[float], int, float]:
    from cold_ray.config import EngineConfig
    from cold_ray.engine import AsyncEngine, ColdParams, SamplingParams

    engine = AsyncEngine(EngineConfig(**_engine(a)))
    engine.core.register_adapter("bench", a.adapter)
    cold = ColdParams() if a.decoding == "cold" else None
    tokenizer = engine.core.tokenizer

    async def one(i: int, max_tokens: int) -> tuple[float, int]:
        prompt = _prompt(i, a.prompt_words)
        if a.kind == "chat":
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t0, ttft, n = time.perf_counter(), None, 0
        async for out in await engine.submit(prompt, params, "bench", cold):
            ttft = ttft or time.perf_counter() - t0
            n += len(out.token_ids)
        return ttft, n

    try:
        return await _waves(one, a)
    finally:
        engine.shutdown()


async def _http(url: str, a) -> tuple[list[float], int, float]:
    import httpx

    async def one(i: int, max_tokens: int) -> tuple[float, int]:
        body = dict(
            model="bench",
            max_tokens=max_tokens,
            temperature=0,
            ignore_eos=True,
            stream=True,
            cold=a.decoding == "cold",
            stream_options={"include_usage": True},
        )
        text = _prompt(i, a.prompt_words)
        if a.kind == "chat":
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
        else:
            path, body["prompt"] = "/v1/completions", text
        t0, ttft, n = time.perf_counter(), None, 0
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    ttft = ttft or time.perf_counter() - t0
                    usage = json.loads(line[6:]).get("usage") or {}
                    n = usage.get("completion_tokens", n)
        return ttft, n

    limits = httpx.Limits(max_connections=a.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        return await _waves(one, a)


def _serve(a) -> tuple[list[float], int, float]:
    import socket

    import ray
    from ray import serve

    from cold_ray.serve.app import compose, prepare

    try:
        from cold_ray.serve.app_args import AppArgs
    except ImportError:  # a --baseline-python installation from before serve/app_args.py
        from cold_ray.serve.config import AppArgs

    tmp = Path(tempfile.mkdtemp(prefix="cold-bench-serve-"))
    engine = _engine(a)
    adapters, no_key = [{"name": "bench", "source": a.adapter}], "COLD_BENCH_NO_KEY"
    cfg = AppArgs(
        registry=str(tmp / "registry.sqlite"),
        adapters=adapters,
        engine=engine,
        api_key_env=no_key,
        admin_key_env=no_key,
    )
    prepare(cfg)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rows = engine["max_rows"]
        options = dict(
            ray_actor_options={"num_cpus": 1}, max_ongoing_requests=rows, max_queued_requests=rows
        )
        serve.run(compose(cfg, options), name="bench", route_prefix="/")
        return asyncio.run(_http(f"http://127.0.0.1:{port}", a))
    finally:
        serve.shutdown()
        ray.shutdown()


def _side(a) -> dict:
    """One side in this process: its TTFTs, tokens and seconds, and which cold-ray ran."""
    ttfts, tokens, seconds = _serve(a) if a.side == "serve" else asyncio.run(_inproc(a))
    import cold_ray.config  # cold_ray is a namespace package: no __file__ of its own

    where = str(Path(cold_ray.config.__file__).parent)
    return dict(
        ttft_s=ttfts, tokens=tokens, seconds=seconds, cold_ray=where, loadavg_1m=os.getloadavg()[0]
    )


def _child(side: str, python: str, a) -> dict:
    from cold_ray.benchmarks.common import run_json

    given = [
        f"--{k.replace('_', '-')}={getattr(a, k)}"
        for k in SETTINGS
        if k != "rounds" and getattr(a, k) is not None
    ]
    cmd = [python, str(Path(__file__).resolve()), "--side", side if side == "inproc" else "serve"]
    cmd += given
    # cwd elsewhere: Ray puts the driver's working directory on its workers' sys.path, which
    # would let a checkout there shadow the cold_ray installed for `python`
    return run_json(cmd, f"{side} side", cwd=tempfile.gettempdir())


def summarize(runs: list[dict]) -> dict:
    """One side's rounds: tokens/s over all waves, TTFT percentiles over all requests."""
    from cold_ray.benchmarks.serving.loadtest.stats import percentile

    ttfts = [t for r in runs for t in r["ttft_s"]]
    ms = lambda q: round(1000 * percentile(ttfts, q), 1)  # noqa: E731
    tokens_per_s = sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs)
    return dict(
        requests=len(ttfts),
        tokens_per_s=round(tokens_per_s, 2),
        ttft_p50_ms=ms(50),
        ttft_p90_ms=ms(90),
        ttft_p99_ms=ms(99),
        ttft_max_ms=round(1000 * max(ttfts), 1),
        per_round_p99_ms=[round(1000 * percentile(r["ttft_s"], 99), 1) for r in runs],
        loadavg_1m=[round(r["loadavg_1m"], 2) for r in runs],
        cold_ray=runs[0]["cold_ray"],
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cold-ray bench serving --scenario overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="HF folder or .gguf (default SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=str(DEMO), help="PEFT adapter (default: the demo)")
    p.add_argument("--kind", choices=("completion", "chat"), default="completion")
    p.add_argument("--decoding", choices=("cold", "plain"), default="cold")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=4, help="'item i costs c coins' phrases")
    p.add_argument("--repeat", type=int, default=1, help="measured waves per run")
    p.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating")
    p.add_argument("--sides", default=",".join(SIDES), help="inproc,serve or one of them")
    p.add_argument("--baseline-python", help="interpreter of another cold-ray installation")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:  # a child, perhaps under another installation: the parent checked the rest
        return a
    from cold_ray.benchmarks.common import require_positive

    require_positive(p, a, "concurrency", "max_tokens", "prompt_words", "repeat", "rounds")
    a.sides = [s for s in a.sides.split(",") if s]
    if not a.sides or set(a.sides) - set(SIDES):
        p.error(f"--sides: expected some of {SIDES}, got {a.sides}")
    if not Path(a.adapter, "adapter_model.safetensors").exists():
        p.error(f"no PEFT adapter at {a.adapter} (pass --adapter)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.side:
        print(json.dumps(_side(a)))
        return 0
    from cold_ray.benchmarks.common import THREAD_ENV, machine_record

    pythons = {s: sys.executable for s in a.sides}
    if a.baseline_python:
        pythons["baseline"] = a.baseline_python
    runs: dict[str, list[dict]] = {s: [] for s in pythons}
    for r in range(a.rounds):
        for side in list(pythons) if r % 2 == 0 else list(pythons)[::-1]:
            try:
                runs[side].append(_child(side, pythons[side], a))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
    result = {
        "settings": {k: getattr(a, k) for k in SETTINGS},
        "threads": THREAD_ENV,
        "machine": machine_record(),
        **{s: summarize(rs) for s, rs in runs.items()},
    }
    if "inproc" in result and "serve" in result:
        inproc, served = result["inproc"], result["serve"]
        result["tokens_per_s_drop_pct"] = round(
            100 * (1 - served["tokens_per_s"] / inproc["tokens_per_s"]), 1
        )
        result["ttft_p50_overhead_ms"] = round(served["ttft_p50_ms"] - inproc["ttft_p50_ms"], 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a script: this folder's modules must not shadow top-level names
    sys.exit(main())
