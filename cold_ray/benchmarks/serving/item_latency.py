"""The paper's end-to-end metric: mean latency per task item, CoLD vs expert greedy.

    cold-ray bench serving --scenario item_latency --json [--n 50] [--plot item_latency.png]

On the demo adapter's test split (or `--data`: a JSONL of {question, answer}, a pulled
dataset name, or demo:SPLIT, as `cold-ray eval` takes), with the evaluation harness's prompt,
stop strings, token budget and answer extractor (the data's task; gsm8k for a plain file):

- alone: each item is one request on an idle engine, one at a time — the latency a user sees
  for one request. The two modes alternate item by item (CoLD first on even items), so both
  sample the same machine load.
- batched: every item submitted at once per mode (continuous batching, `--max-rows` rows), as
  the harness runs; per-item latency is the mode's wall time ÷ items. Modes alternate order
  over `--rounds`.

Reported per mode: mean and median latency per item, time to first token, completion tokens
and ms per generated token (latency = tokens × per-token cost: a CoLD answer that is shorter
can end sooner although each of its steps costs more), accuracy; and the CoLD ÷ greedy ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from cold_ray.benchmarks.common import (
    DEMO_ADAPTER,
    grouped_bars,
    pyplot,
    report,
    require_positive,
    save,
)

MODES = ("cold", "greedy")


def _requests(core, items: list[dict], mode: str, task, args) -> list:
    from cold_ray.engine import ColdParams, SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens or task.max_tokens, stop=task.stop
    )
    cold = ColdParams(args.alpha, args.beta) if mode == "cold" else None
    return [core.make_request(task.prompt(i["question"]), params, "adapter", cold) for i in items]


def _run(core, reqs: list) -> dict:
    """Submit `reqs` together and step until all finish: request id -> record."""
    texts = {r.request_id: [] for r in reqs}
    recs: dict[str, dict] = {}
    start = time.perf_counter()
    for r in reqs:
        core.add(r)
        recs[r.request_id] = {"submit": start, "first": None}
    while any("end" not in rec for rec in recs.values()):
        for out in core.step():
            rec = recs.get(out.request_id)
            if rec is None:
                continue
            now = time.perf_counter()
            if out.error is not None:
                raise out.error
            texts[out.request_id].append(out.text)
            if out.token_ids and rec["first"] is None:
                rec["first"] = now
            if out.finished:
                rec.update(
                    end=now, text="".join(texts[out.request_id]), tokens=out.completion_tokens
                )
    return recs


def _stats(recs: list[dict], golds: list[str], task) -> dict:
    latency = [(r["end"] - r["submit"]) * 1e3 for r in recs]
    ttft = [(r["first"] - r["submit"]) * 1e3 for r in recs if r["first"] is not None]
    tokens = [r["tokens"] for r in recs]
    correct = [task.extract(r["text"]) == g for r, g in zip(recs, golds)]
    return {
        "items": len(recs),
        "latency_ms_mean": statistics.mean(latency),
        "latency_ms_median": statistics.median(latency),
        "ttft_ms_mean": statistics.mean(ttft) if ttft else None,
        "completion_tokens_mean": statistics.mean(tokens),
        "ms_per_token": sum(latency) / max(1, sum(tokens)),
        "accuracy": sum(correct) / len(correct),
    }


def measure(core, items: list[dict], task, args) -> dict:
    golds = [task.extract(i["answer"]) for i in items]
    alone: dict[str, list[dict]] = {m: [] for m in MODES}
    for k, item in enumerate(items):  # alone: one request at a time, modes alternating
        for mode in MODES if k % 2 == 0 else MODES[::-1]:
            (req,) = _requests(core, [item], mode, task, args)
            alone[mode].append(_run(core, [req])[req.request_id])
    out = {"alone": {m: _stats(alone[m], golds, task) for m in MODES}}
    if args.batched:
        batched: dict[str, list[dict]] = {m: [] for m in MODES}
        size = -(-len(items) // args.rounds)
        for rnd in range(args.rounds):
            chunk = items[rnd * size : (rnd + 1) * size]
            for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                reqs = _requests(core, chunk, mode, task, args)
                t0 = time.perf_counter()
                recs = _run(core, reqs)
                wall = time.perf_counter() - t0
                batched[mode].append({"wall_s": wall, "recs": [recs[r.request_id] for r in reqs]})
        out["batched"] = {}
        for mode in MODES:
            recs = [r for part in batched[mode] for r in part["recs"]]
            wall = sum(part["wall_s"] for part in batched[mode])
            out["batched"][mode] = {
                **_stats(recs, golds, task),
                "wall_s": wall,
                "wall_ms_per_item": wall / len(items) * 1e3,
                "tokens_per_s": sum(r["tokens"] for r in recs) / wall,
            }
    out["ratios_cold_over_greedy"] = ratios(out)
    return out


def ratios(result: dict) -> dict:
    a = result["alone"]
    out = {
        "alone_latency_mean": a["cold"]["latency_ms_mean"] / a["greedy"]["latency_ms_mean"],
        "alone_latency_median": a["cold"]["latency_ms_median"] / a["greedy"]["latency_ms_median"],
        "alone_ms_per_token": a["cold"]["ms_per_token"] / a["greedy"]["ms_per_token"],
        "completion_tokens_mean": a["cold"]["completion_tokens_mean"]
        / a["greedy"]["completion_tokens_mean"],
    }
    if "batched" in result:
        b = result["batched"]
        out["batched_wall_per_item"] = (
            b["cold"]["wall_ms_per_item"] / b["greedy"]["wall_ms_per_item"]
        )
    return out


def plot(result: dict, path: str) -> None:
    groups = [
        ("alone: mean", "alone", "latency_ms_mean"),
        ("alone: median", "alone", "latency_ms_median"),
    ]
    if "batched" in result:
        groups.append(("batched: wall / item", "batched", "wall_ms_per_item"))
    fig, ax = pyplot().subplots(figsize=(7, 4))
    grouped_bars(
        ax,
        [g[0] for g in groups],
        {mode: [result[g][mode][k] for _, g, k in groups] for mode in MODES},
    )
    ax.set_ylabel("latency per item (ms)")
    save(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cold-ray bench serving --scenario item_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default="demo:test", help="items (default: the demo test split)")
    p.add_argument("--n", type=int, default=50, help="first N items")
    p.add_argument("--adapter", default=str(DEMO_ADAPTER), help="PEFT adapter (default: demo)")
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, help="generation budget (default: the task's)")
    p.add_argument("--batched", action="store_true", help="also all items at once per mode")
    p.add_argument("--max-rows", type=int, default=32, help="batch rows for --batched")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=1, help="--batched: slices, modes alternating")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    require_positive(p, args, "n", "rounds")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_rows < 2:
        p.error(f"--max-rows must be >= 2 (a CoLD request takes two), got {args.max_rows}")
    if args.rounds > args.n:
        p.error(f"--rounds {args.rounds} exceeds --n {args.n}")
    if not (Path(args.adapter) / "adapter_config.json").exists():
        p.error(f"--adapter {args.adapter!r} is not a PEFT adapter folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from cold_ray.benchmarks.common import machine_record
    from cold_ray.config import EngineConfig
    from cold_ray.engine import ColdParams, EngineCore, EngineError
    from cold_ray.eval import data, harness

    try:
        ColdParams(args.alpha, args.beta)  # validates the range
        path, task_name = data.resolve(args.data)
        items = harness.load_items(path, args.n)
        task = harness.make_task(task_name or "gsm8k", max_tokens=args.max_tokens)
        core = EngineCore(
            EngineConfig(
                model=args.model,
                max_rows=args.max_rows,
                max_loras=1,
                max_model_len=args.max_model_len,
                num_threads=1,
            )
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host = machine_record()
    torch.set_num_threads(1)
    core.register_adapter("adapter", args.adapter)
    core.load_adapter("adapter")
    harness.warm_up(
        core,
        items,
        "adapter",
        [harness.Mode("greedy"), harness.Mode("cold", args.alpha, args.beta)],
        task,
    )
    try:
        with torch.inference_mode():
            result = measure(core, items, task, args)
    except EngineError as e:  # e.g. a prompt longer than --max-model-len
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(
        data=args.data,
        n=len(items),
        adapter=args.adapter,
        alpha=args.alpha,
        beta=args.beta,
        max_tokens=args.max_tokens or task.max_tokens,
        host_at_start=host,
        host_at_end=machine_record(),
    )
    return report(result, args.json, lambda path: plot(result, path), args.plot)


if __name__ == "__main__":
    sys.exit(main())
