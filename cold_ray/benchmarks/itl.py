"""Inter-token latency of decoding streams while long prompts arrive, per prefill budget.

    cold-ray bench itl --json --plot itl.png
    cold-ray bench itl --streams 2 --long-prompts 2 --long-len 200 --stream-tokens 48  # smoke

`--streams` requests decode (greedy, fixed length, on the demo adapter; `--decoding cold`
makes every request CoLD) while `--long-prompts` prompts of `--long-len` tokens arrive, one
whenever every stream has produced another `--arrive-every` tokens, starting at token
`--arrive-at`. The engine (`EngineCore`, stepped in-process, prefix cache off) prefills them in
chunks under `max_prefill_tokens` = each of `--budgets`; the run named `none` has the same
streams and no arrivals (budget 256). Every setting runs in its own child process, in an
order that alternates over `--rounds`.

Reported per setting: p50/p99/max of the streams' inter-token gaps from token `--arrive-at`
to the end (the same tokens in every setting), the steps taken, and the long prompts' time to
first token (what a small budget costs them); and each budget's p50/p99 ÷ the `none` run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cold_ray.benchmarks.common import (
    grouped_bars,
    positive_ints,
    provenance,
    pyplot,
    report,
    run_children,
    save,
)
from cold_ray.benchmarks.serving.loadtest.stats import percentile

DEMO_ADAPTER = Path(__file__).resolve().parents[1] / "deployments" / "adapters" / "arith-demo"


def long_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` distinct prompts of exactly `length` tokens (worked problems of the demo task)."""
    from cold_ray.adapters.demo_task import make_split

    out, start = [], 0
    while len(out) < count:
        ids: list[int] = []
        while len(ids) < length:
            items = make_split("validation", 20, seed=start)
            start += 1
            ids += tokenizer.encode(" ".join(i["question"] + " " + i["answer"] for i in items))
        out.append(ids[:length])
    return out


def stream_prompts(count: int) -> list[str]:
    from cold_ray.adapters.demo_task import format_prompt, make_split

    return [format_prompt(i["question"]) for i in make_split("test", count)]


def run_setting(s: dict) -> dict:
    """One budget (or `none`) in this process: step the engine, stamp every token."""
    import torch
    from transformers import AutoTokenizer

    from cold_ray.config import EngineConfig
    from cold_ray.engine import ColdParams, EngineCore, SamplingParams
    from cold_ray.model.loader import resolve_model_path

    cold = ColdParams(0.1, 0.5) if s["decoding"] == "cold" else None
    rows = 2 if cold else 1
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(s["model"])))
    prompts = [tokenizer.encode(p) for p in stream_prompts(s["streams"])]
    arrivals = [] if s["budget"] == "none" else long_prompts(tokenizer, s["long_prompts"],
                                                             s["long_len"])  # fmt: skip
    config = EngineConfig(
        model=s["model"], max_loras=1, prefix_cache_bytes=0,
        max_prefill_tokens=256 if s["budget"] == "none" else s["budget"],
        max_rows=max(2, rows * (s["streams"] + s["long_prompts"])),
        max_model_len=max(s["long_len"] + s["long_new_tokens"],
                          max(map(len, prompts)) + s["stream_tokens"]) + 1,
    )  # fmt: skip
    core = EngineCore(config)
    core.register_adapter("adapter", s["adapter"])
    core.load_adapter("adapter")
    core.generate(["Warm up: 1 2 3"], SamplingParams(temperature=0.0, max_tokens=4), "adapter",
                  cold)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=s["stream_tokens"], ignore_eos=True)
    streams = [core.make_request(p, params, "adapter", cold) for p in prompts]
    long_params = SamplingParams(temperature=0.0, max_tokens=s["long_new_tokens"], ignore_eos=True)
    stamps: dict[str, list[float]] = {r.request_id: [] for r in streams}
    long_ttft: list[float] = []
    pending: dict[str, float] = {}  # long request id -> when it arrived
    for r in streams:
        core.add(r)
    steps = 0
    with torch.inference_mode():
        while core.has_work():
            arrived = s["long_prompts"] - len(arrivals)
            due = s["arrive_at"] + arrived * s["arrive_every"]  # in tokens of the slowest stream
            if arrivals and min(len(r.output_ids) for r in streams) >= due:
                req = core.make_request(arrivals.pop(0), long_params, "adapter", cold)
                core.add(req)
                pending[req.request_id] = time.perf_counter()
            outputs = core.step()
            now = time.perf_counter()
            steps += 1
            for out in outputs:
                if out.request_id in stamps and out.token_ids:
                    stamps[out.request_id].append(now)
                elif out.request_id in pending and out.token_ids:
                    long_ttft.append((now - pending.pop(out.request_id)) * 1e3)
    gaps = [(t[j] - t[j - 1]) * 1e3 for t in stamps.values()
            for j in range(max(1, s["arrive_at"]), len(t))]  # fmt: skip
    return {
        "itl_ms": {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99), "max": max(gaps),
                   "mean": statistics.mean(gaps), "count": len(gaps)},
        "steps": steps,
        "prefill_tokens": core.stats["prefill_tokens"],
        "long_ttft_ms": {"p50": percentile(long_ttft, 50), "max": max(long_ttft)}
        if long_ttft else None,
    }  # fmt: skip


def compare(records: list[dict]) -> list[dict]:
    """Median over rounds per budget, and each budget's p50/p99 against `none`."""
    out = []
    for budget in dict.fromkeys(r["budget"] for r in records):
        rs = [r for r in records if r["budget"] == budget]
        row = {"budget": budget, "rounds": len(rs)}
        for q in ("p50", "p99", "max"):
            row[f"itl_{q}_ms"] = statistics.median(r["itl_ms"][q] for r in rs)
        if rs[0]["long_ttft_ms"]:
            row["long_ttft_p50_ms"] = statistics.median(r["long_ttft_ms"]["p50"] for r in rs)
        out.append(row)
    base = next((r for r in out if r["budget"] == "none"), None)
    for row in out:
        if base and row is not base:
            row["itl_p50_over_none"] = row["itl_p50_ms"] / base["itl_p50_ms"]
            row["itl_p99_over_none"] = row["itl_p99_ms"] / base["itl_p99_ms"]
    return out


def plot(rows: list[dict], path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    grouped_bars(ax, [str(r["budget"]) for r in rows],
                 {q: [r[f"itl_{q}_ms"] for r in rows] for q in ("p50", "p99")})  # fmt: skip
    ax.set(xlabel="max_prefill_tokens (none: no long prompts arrive)",
           ylabel="inter-token latency of the streams (ms)")  # fmt: skip
    save(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cold-ray bench itl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--budgets", type=positive_ints, default=[64, 256, 1024])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream-tokens", type=int, default=160)
    p.add_argument("--long-prompts", type=int, default=4)
    p.add_argument("--long-len", type=int, default=900)
    p.add_argument("--long-new-tokens", type=int, default=4)
    p.add_argument("--arrive-at", type=int, default=16, help="stream token of the first arrival")
    p.add_argument("--arrive-every", type=int, default=24, help="stream tokens between arrivals")
    p.add_argument("--decoding", choices=("plain", "cold"), default="plain")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--adapter", default=str(DEMO_ADAPTER), help="PEFT adapter (default: demo)")
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    for name in ("streams", "stream_tokens", "long_prompts", "long_len", "long_new_tokens",
                 "arrive_at", "arrive_every", "rounds"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    last = args.arrive_at + (args.long_prompts - 1) * args.arrive_every
    if last >= args.stream_tokens:
        p.error(f"the last long prompt arrives at stream token {last}, but streams end at "
                f"--stream-tokens {args.stream_tokens}: raise it above {last}")  # fmt: skip
    if not (Path(args.adapter) / "adapter_config.json").exists():
        p.error(f"--adapter {args.adapter!r} is not a PEFT adapter folder")
    return args


def settings(args: argparse.Namespace) -> list[dict]:
    common = {k: getattr(args, k) for k in ("streams", "stream_tokens", "long_prompts",
              "long_len", "long_new_tokens", "arrive_at", "arrive_every", "decoding",
              "adapter", "model")}  # fmt: skip
    budgets = ["none", *args.budgets]
    out = []
    for rnd in range(args.rounds):
        for b in budgets if rnd % 2 == 0 else budgets[::-1]:
            out.append({**common, "budget": b, "round": rnd})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_setting(json.loads(args.child))))
        return 0
    from cold_ray.benchmarks.common import machine_record

    host = machine_record()
    records = run_children(
        "cold_ray.benchmarks.itl", settings(args),
        lambda s, rec: f"# budget {s['budget']}: ITL p50 {rec['itl_ms']['p50']:.1f} ms, "
                       f"p99 {rec['itl_ms']['p99']:.1f} ms",
    )  # fmt: skip
    if records is None:
        return 1
    rows = compare(records)
    result = {"comparison": rows, "runs": records, **provenance(host, argv)}
    return report(result, args.json, lambda path: plot(rows, path), args.plot)


if __name__ == "__main__":
    sys.exit(main())
