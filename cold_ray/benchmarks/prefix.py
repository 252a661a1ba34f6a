"""Shared-prefix workloads with the prefix cache on and off, side by side in one run.

    cold-ray bench prefix --json --plot prefix.png
    cold-ray bench prefix --workloads fewshot --users 4 --shots 2 --new-tokens 8   # smoke

Workloads (`cold_ray.workloads.shared_prefix_requests`): `fewshot` — 8-shot GSM8K-style
prompts, one common prefix of worked examples from the demo task's train split, a different
test question each; `chat` — one long system prompt through the tokenizer's chat template, a
different user turn each. `--users` users arrive one every `--interval-ms` (staggered), each
sending `--requests-per-user` requests back to back (closed loop), through
`cold_ray.engine.AsyncEngine` in-process, greedy with a fixed number of new tokens.

Every (workload, decoding, cache) setting runs in its own child process; per workload and
decoding the cache-on and cache-off runs are adjacent, their order alternating over
`--rounds`. Reported per setting: p50/p95 time to first token, tokens/s (generated tokens ÷
first arrival to last finish), prompt tokens the engine computed, the prefix cache's hit rate
(hit ÷ queried tokens) and whether every request produced the same tokens with the cache as
without; per workload and decoding the ratios cache on ÷ off with the goals (p50 TTFT ≤ 0.3×,
tokens/s ≥ 1.5×).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

from cold_ray.benchmarks import goals
from cold_ray.benchmarks.common import grouped_bars, provenance, pyplot, report, run_children, save
from cold_ray.benchmarks.serving.loadtest.stats import percentile
from cold_ray.workloads import PREFIX_KINDS

DECODINGS = ("cold", "plain")
DEMO_ADAPTER = Path(__file__).resolve().parents[1] / "deployments" / "adapters" / "arith-demo"


def prompt_ids(tokenizer, body: dict) -> list[int]:
    """Token ids of a request body as the service makes them: chat through the template with
    no extra special tokens, a completion prompt through `encode` (BOS where the model wants)."""
    if "messages" in body:
        text = tokenizer.apply_chat_template(body["messages"], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(body["prompt"])


async def _drive(engine, prompts: list[list[int]], setting: dict, adapter: str) -> list[dict]:
    """Users arrive staggered; each sends its requests one after another. One record per
    request: its submit time, first-token time and finish time (perf_counter seconds)."""
    from cold_ray.engine import ColdParams, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=setting["new_tokens"], ignore_eos=True)
    cold = ColdParams(0.1, 0.5) if setting["decoding"] == "cold" else None
    per_user = setting["requests_per_user"]
    records: list[dict] = []

    async def user(u: int) -> None:
        await asyncio.sleep(u * setting["interval_ms"] / 1000)
        for j in range(per_user):
            index = u * per_user + j
            rec = {"index": index, "user": u, "prompt_tokens": len(prompts[index]),
                   "submit": time.perf_counter(), "first": None, "tokens": []}  # fmt: skip
            async for out in await engine.submit(prompts[index], params, adapter, cold):
                if out.token_ids and rec["first"] is None:
                    rec["first"] = time.perf_counter()
                rec["tokens"] += out.token_ids
            rec["end"] = time.perf_counter()
            records.append(rec)

    await asyncio.gather(*(user(u) for u in range(setting["users"])))
    return sorted(records, key=lambda r: r["index"])


def run_setting(setting: dict) -> dict:
    """One (workload, decoding, cache) run in this process."""
    from transformers import AutoTokenizer

    from cold_ray.config import EngineConfig
    from cold_ray.engine import AsyncEngine, ColdParams, SamplingParams
    from cold_ray.model.loader import resolve_model_path
    from cold_ray.workloads import shared_prefix_requests

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(setting["model"])))
    n = setting["users"] * setting["requests_per_user"]
    bodies = shared_prefix_requests(setting["workload"], n, setting["seed"], setting["shots"])
    prompts = [prompt_ids(tokenizer, b) for b in bodies]
    rows = 2 if setting["decoding"] == "cold" else 1
    config = EngineConfig(
        model=setting["model"], max_rows=max(2, setting["users"] * rows), max_loras=1,
        max_model_len=max(map(len, prompts)) + setting["new_tokens"] + 1,
        max_prefill_tokens=setting["max_prefill_tokens"],
        prefix_cache_bytes=setting["prefix_cache_mib"] << 20 if setting["cache"] else 0,
    )  # fmt: skip
    engine = AsyncEngine(config)
    core = engine.core
    try:
        core.register_adapter("adapter", setting["adapter"])
        core.load_adapter("adapter")
        # Warm both decodings on a prompt that shares no block with the workload: the
        # measured run starts with none of its prefix cached.
        warm = tokenizer.encode("Warm up: count 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19.")

        async def warm_up():
            for cold in (ColdParams(0.1, 0.5), None):
                p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
                async for _ in await engine.submit(warm, p, "adapter", cold):
                    pass

        asyncio.run(warm_up())
        cache = core.prefix_cache
        before = (core.stats["prefill_tokens"], dict(cache.stats) if cache is not None else None)
        records = asyncio.run(_drive(engine, prompts, setting, "adapter"))
        computed = core.stats["prefill_tokens"] - before[0]
        cache_stats = {k: v - before[1][k] for k, v in cache.stats.items()} if cache else None
    finally:
        engine.shutdown()
    return summarize_run(records, computed, cache_stats, rows)


def summarize_run(records: list[dict], computed: int, cache_stats: dict | None,
                  rows: int) -> dict:  # fmt: skip
    ttft = [(r["first"] - r["submit"]) * 1e3 for r in records]
    latency = [(r["end"] - r["submit"]) * 1e3 for r in records]
    span = max(r["end"] for r in records) - min(r["submit"] for r in records)
    tokens = sum(len(r["tokens"]) for r in records)
    prompt_tokens = sum(r["prompt_tokens"] for r in records)
    out = {
        "requests": len(records),
        "ttft_ms": {"p50": percentile(ttft, 50), "p95": percentile(ttft, 95),
                    "mean": statistics.mean(ttft)},
        "latency_ms": {"p50": percentile(latency, 50), "p95": percentile(latency, 95)},
        "tokens_per_s": tokens / span,
        "generated_tokens": tokens,
        "span_s": span,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_computed": computed,  # over all rows: a CoLD prompt counts twice
        "prompt_tokens_computed_fraction": computed / (rows * prompt_tokens),
        "prefix_cache": cache_stats,
        "prefix_hit_rate": cache_stats["hit_tokens"] / cache_stats["queried_tokens"]
        if cache_stats and cache_stats["queried_tokens"]
        else None,
        # a digest of every request's tokens: cache on and off must agree (a hit is exact)
        "tokens_digest": hashlib.sha256(
            json.dumps([r["tokens"] for r in records]).encode()
        ).hexdigest()[:16],
    }  # fmt: skip
    return out


def compare(records: list[dict]) -> list[dict]:
    """Per (workload, decoding): medians over rounds with the cache on and off, and on ÷ off."""
    out = []
    keys = sorted({(r["workload"], r["decoding"]) for r in records})
    for workload, decoding in keys:
        side = {}
        for cache in (True, False):
            rs = [r for r in records if (r["workload"], r["decoding"], r["cache"]) ==
                  (workload, decoding, cache)]  # fmt: skip
            if rs:
                side[cache] = {
                    "ttft_p50_ms": statistics.median(r["ttft_ms"]["p50"] for r in rs),
                    "ttft_p95_ms": statistics.median(r["ttft_ms"]["p95"] for r in rs),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "prefix_hit_rate": rs[0]["prefix_hit_rate"],
                    "prompt_tokens_computed_fraction": rs[0]["prompt_tokens_computed_fraction"],
                    "rounds": len(rs),
                }
        row = {"workload": workload, "decoding": decoding,
               "cache_on": side.get(True), "cache_off": side.get(False)}  # fmt: skip
        if True in side and False in side:
            on, off = side[True], side[False]
            row["ttft_p50_on_over_off"] = on["ttft_p50_ms"] / off["ttft_p50_ms"]
            row["ttft_p95_on_over_off"] = on["ttft_p95_ms"] / off["ttft_p95_ms"]
            row["tokens_per_s_on_over_off"] = on["tokens_per_s"] / off["tokens_per_s"]
            row["goals"] = {
                g: goals.BY_NAME[g].holds(row[key])
                for g, key in (("prefix_ttft", "ttft_p50_on_over_off"),
                               ("prefix_tokens", "tokens_per_s_on_over_off"))
            }  # fmt: skip
            digests = {r["tokens_digest"] for r in records
                       if (r["workload"], r["decoding"]) == (workload, decoding)}  # fmt: skip
            row["same_tokens_on_and_off"] = len(digests) == 1
        out.append(row)
    return out


def plot(rows: list[dict], path: str) -> None:
    rows = [r for r in rows if r["cache_on"] and r["cache_off"]]
    labels = [f"{r['workload']}\n{r['decoding']}" for r in rows]
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, key, unit in ((axes[0], "ttft_p50_ms", "p50 time to first token (ms)"),
                          (axes[1], "tokens_per_s", "generated tokens / s")):  # fmt: skip
        grouped_bars(ax, labels, {"cache off": [r["cache_off"][key] for r in rows],
                                  "cache on": [r["cache_on"][key] for r in rows]},
                     colors={"cache off": "tab:gray", "cache on": "tab:green"})  # fmt: skip
        ax.set_ylabel(unit)
    fig.suptitle("shared-prefix workloads: prefix cache on vs off")
    save(fig, path)


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {list(allowed)}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cold-ray bench prefix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--workloads", type=lambda t: _choices(t, PREFIX_KINDS, "workloads"),
                   default=list(PREFIX_KINDS))  # fmt: skip
    p.add_argument("--decodings", type=lambda t: _choices(t, DECODINGS, "decodings"),
                   default=list(DECODINGS))  # fmt: skip
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--requests-per-user", type=int, default=1)
    p.add_argument("--interval-ms", type=float, default=500.0, help="between users' arrivals")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--shots", type=int, default=8, help="worked examples in the fewshot prefix")
    p.add_argument("--max-prefill-tokens", type=int, default=256)
    p.add_argument("--prefix-cache-mib", type=int, default=256, help="size when the cache is on")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="which test questions are asked")
    p.add_argument("--adapter", default=str(DEMO_ADAPTER), help="PEFT adapter (default: demo)")
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--plot", help="write a PNG here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a setting as JSON
    args = p.parse_args(argv)
    if args.child:
        return args
    for name in ("users", "requests_per_user", "new_tokens", "max_prefill_tokens",
                 "prefix_cache_mib", "rounds"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.interval_ms < 0 or args.shots < 0:
        p.error("--interval-ms and --shots must be >= 0")
    if args.users * args.requests_per_user > 1000:
        p.error("at most 1000 requests (users x requests per user): the question pool's size")
    if not (Path(args.adapter) / "adapter_config.json").exists():
        p.error(f"--adapter {args.adapter!r} is not a PEFT adapter folder")
    return args


def settings(args: argparse.Namespace) -> list[list[dict]]:
    """Per round, the settings in the order they run (cache on/off adjacent, alternating)."""
    common = {k: getattr(args, k) for k in ("users", "requests_per_user", "interval_ms",
              "new_tokens", "shots", "max_prefill_tokens", "prefix_cache_mib", "seed",
              "adapter", "model")}  # fmt: skip
    rounds = []
    for rnd in range(args.rounds):
        order = []
        for workload in args.workloads:
            for decoding in args.decodings:
                caches = (True, False) if rnd % 2 == 0 else (False, True)
                order += [{**common, "workload": workload, "decoding": decoding, "cache": c,
                           "round": rnd} for c in caches]  # fmt: skip
        rounds.append(order)
    return rounds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_setting(json.loads(args.child))))
        return 0
    from cold_ray.benchmarks.common import machine_record

    host = machine_record()
    records = run_children(
        "cold_ray.benchmarks.prefix", [s for order in settings(args) for s in order],
        lambda s, rec: f"# {s['workload']} {s['decoding']} cache {'on ' if s['cache'] else 'off'}: "
                       f"p50 TTFT {rec['ttft_ms']['p50']:.0f} ms, {rec['tokens_per_s']:.1f} tok/s, "
                       f"hit rate {rec['prefix_hit_rate'] or 0:.2f}",
    )  # fmt: skip
    if records is None:
        return 1
    rows = compare(records)
    result = {"comparison": rows, "runs": records, **provenance(host, argv)}
    return report(result, args.json, lambda path: plot(rows, path), args.plot)


if __name__ == "__main__":
    sys.exit(main())
