"""Requests arriving at the engine in-process, every token time-stamped: what the prefix cache
buys on shared-prefix workloads, and how smooth decoding streams stay while long prompts
arrive, per prefill budget.

    cold-ray bench serving --scenario prefix --json --plot prefix.png
    cold-ray bench serving --scenario prefix --workloads fewshot --users 4 --shots 2 --new-tokens 8
    cold-ray bench serving --scenario itl --json --plot itl.png
    cold-ray bench serving --scenario itl --streams 2 --long-prompts 2 --long-len 200 --stream-tokens 48

One driver serves both: `EngineCore` stepped here, users whose requests join between steps,
greedy with a fixed number of new tokens on the demo adapter (CoLD or plain).
- prefix: workloads from `workloads.shared_prefix_requests` — `fewshot` (8-shot prompts of the
  demo task, one common prefix of worked examples, a different question each) and `chat` (one
  long system prompt through the chat template, a different user turn each). `--users` users
  arrive one every `--interval-ms`, each sending `--requests-per-user` requests back to back.
  Variants: the prefix cache on and off.
- itl: `--streams` requests decode `--stream-tokens` tokens while `--long-prompts` prompts of
  `--long-len` tokens arrive, one whenever every stream has produced another `--arrive-every`
  tokens from token `--arrive-at`, prefix cache off. Variants: `max_prefill_tokens` = each of
  `--budgets`, and `none` (no long prompts, budget 256).
A request's TTFT runs from when it was due (a request due during a step waits for it).

Every (workload, decoding, variant) runs in its own child process, the variants of one
workload and decoding adjacent, their order alternating over `--rounds`. Reported per run:
TTFT p50/p95, the streams' inter-token gaps p50/p99/max (from token `--arrive-at`; 1 for
prefix), tokens/s (generated ÷ first arrival to last finish), the long prompts' TTFT, prompt
tokens computed, the prefix cache's hit rate, and a digest of every request's tokens. Per
workload and decoding, each variant's medians over rounds and its ratios to the reference
(cache off; `none`), whether it produced the reference's tokens, and the goals of `goals.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

from cold_ray.benchmarks import goals
from cold_ray.benchmarks.common import (
    DEMO_ADAPTER,
    choice_list,
    grouped_bars,
    positive_ints,
    provenance,
    pyplot,
    report,
    require_positive,
    run_children,
    save,
)
from cold_ray.benchmarks.serving.loadtest.stats import percentile
from cold_ray.benchmarks.workloads import PREFIX_KINDS

DECODINGS = ("cold", "plain")
REFERENCE = {"prefix": "cache off", "itl": "none"}
RATIOS = ("ttft_p50_ms", "ttft_p95_ms", "tokens_per_s", "itl_p50_ms", "itl_p99_ms")


@dataclass
class User:
    """Requests sent one after another; the first when `start_s` has passed or every stream has
    `start_tokens` tokens."""

    prompts: list[list[int]]
    long: bool = False  # a long prompt arriving (itl), reported apart from the streams
    start_s: float = 0.0
    start_tokens: int | None = None
    records: list[dict] = field(default_factory=list)


def prompt_ids(tokenizer, body: dict) -> list[int]:
    """Token ids of a request body as the service makes them: chat through the template with
    no extra special tokens, a completion prompt through `encode` (BOS where the model wants)."""
    if "messages" in body:
        text = tokenizer.apply_chat_template(
            body["messages"], tokenize=False, add_generation_prompt=True
        )
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(body["prompt"])


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


def users_of(s: dict, tokenizer) -> list[User]:
    """The setting's users: prefix workload users, or streams plus arriving long prompts."""
    if s["scenario"] == "prefix":
        from cold_ray.benchmarks.workloads import shared_prefix_requests

        per = s["requests_per_user"]
        bodies = shared_prefix_requests(s["workload"], s["users"] * per, s["seed"], s["shots"])
        ids = [prompt_ids(tokenizer, b) for b in bodies]
        return [
            User(ids[u * per : (u + 1) * per], start_s=u * s["interval_ms"] / 1000)
            for u in range(s["users"])
        ]
    from cold_ray.adapters.demo_task import format_prompt, make_split

    streams = [
        User([tokenizer.encode(format_prompt(i["question"]))])
        for i in make_split("test", s["streams"])
    ]
    if s["variant"] == "none":
        return streams
    arrivals = long_prompts(tokenizer, s["long_prompts"], s["long_len"])
    return streams + [
        User([p], long=True, start_tokens=s["arrive_at"] + k * s["arrive_every"])
        for k, p in enumerate(arrivals)
    ]


def run_setting(s: dict) -> dict:
    """One (workload, decoding, variant) in this process: step the engine, stamp every token."""
    import torch
    from transformers import AutoTokenizer

    from cold_ray.config import EngineConfig
    from cold_ray.engine import ColdParams, EngineCore, SamplingParams
    from cold_ray.model.loader import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(s["model"])))
    users = users_of(s, tokenizer)
    cold = ColdParams(0.1, 0.5) if s["decoding"] == "cold" else None
    streams = [u for u in users if not u.long]
    new = {False: s["new_tokens"], True: s.get("long_new_tokens", 1)}
    budget = s["variant"] if isinstance(s["variant"], int) else s["max_prefill_tokens"]
    cache_on = s["variant"] == "cache on"
    config = EngineConfig(
        model=s["model"],
        max_loras=1,
        max_prefill_tokens=budget,
        max_rows=max(2, len(users) * (2 if cold else 1)),
        max_model_len=max(len(p) + new[u.long] for u in users for p in u.prompts) + 1,
        prefix_cache_bytes=s["prefix_cache_mib"] << 20 if cache_on else 0,
    )
    core = EngineCore(config)
    core.register_adapter("adapter", s["adapter"])
    core.load_adapter("adapter")
    # Warm both decodings on a prompt that shares no block with the workload: the measured
    # run starts with none of its prefix cached.
    warm = tokenizer.encode("Warm up: count 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19.")
    for c in (ColdParams(0.1, 0.5), None):
        core.generate([warm], SamplingParams(temperature=0.0, max_tokens=4), "adapter", c)
    cache = core.prefix_cache
    computed, hits = core.stats["prefill_tokens"], dict(cache.stats) if cache else None
    live: dict[str, dict] = {}  # request id -> its record

    def send(user: User, due: float) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=new[user.long], ignore_eos=True)
        req = core.make_request(user.prompts[len(user.records)], params, "adapter", cold)
        rec = {"prompt_tokens": len(req.prompt_ids), "submit": due, "stamps": [], "tokens": []}
        user.records.append(rec)
        live[req.request_id] = rec
        rec["user"] = user
        core.add(req)

    start, steps = time.perf_counter(), 0
    waiting = list(users)  # users whose first request has not been sent
    with torch.inference_mode():
        while waiting or core.has_work():
            now = time.perf_counter()
            least = min((len(u.records[0]["tokens"]) if u.records else 0) for u in streams)
            for u in list(waiting):
                if u.start_tokens is None and now >= start + u.start_s:
                    send(u, start + u.start_s)
                elif u.start_tokens is not None and least >= u.start_tokens:
                    send(u, now)
                else:
                    continue
                waiting.remove(u)
            if not core.has_work():
                if all(u.start_tokens is not None for u in waiting):
                    raise RuntimeError("long prompts wait for stream tokens no stream will make")
                time.sleep(max(0.0, min(start + u.start_s for u in waiting) - now))
                continue
            outputs = core.step()
            now, steps = time.perf_counter(), steps + 1
            for out in outputs:
                rec = live[out.request_id]
                rec["stamps"] += [now] * len(out.token_ids)
                rec["tokens"] += out.token_ids
                if out.finished:
                    rec["end"] = now
                    user = live.pop(out.request_id).pop("user")
                    if len(user.records) < len(user.prompts):
                        send(user, now)  # closed loop: the next request at once
    engine = {
        "computed": core.stats["prefill_tokens"] - computed,
        "rows": 2 if cold else 1,
        "cache": {k: v - hits[k] for k, v in cache.stats.items()} if cache else None,
    }
    core.shutdown()
    longs = [r for u in users if u.long for r in u.records]
    return {
        **summarize_run([r for u in streams for r in u.records], longs, engine, s["itl_from"]),
        "steps": steps,
    }


def _pcts(values: list[float], *qs: int) -> dict:
    return {f"p{q}": percentile(values, q) for q in qs}


def summarize_run(records: list[dict], longs: list[dict], engine: dict, itl_from: int) -> dict:
    """The streams' (or users') TTFT, gaps from token `itl_from`, latency and tokens/s; the long
    prompts' TTFT; prompt tokens computed and the prefix cache's counts (`engine`)."""
    ms = lambda end, rs: [(end(r) - r["submit"]) * 1e3 for r in rs]  # noqa: E731
    ttft, latency = ms(lambda r: r["stamps"][0], records), ms(lambda r: r["end"], records)
    long_ttft = ms(lambda r: r["stamps"][0], longs)
    gaps = [
        (t[j] - t[j - 1]) * 1e3
        for t in (r["stamps"] for r in records)
        for j in range(max(1, itl_from), len(t))
    ]
    span = max(r["end"] for r in records) - min(r["submit"] for r in records)
    prompt_tokens = sum(r["prompt_tokens"] for r in records + longs)
    generated = sum(len(r["tokens"]) for r in records)
    cache = engine["cache"]
    return {
        "requests": len(records),
        "ttft_ms": {**_pcts(ttft, 50, 95), "mean": statistics.mean(ttft)},
        "itl_ms": {**_pcts(gaps, 50, 99), "max": max(gaps, default=None), "count": len(gaps)},
        "long_ttft_ms": {**_pcts(long_ttft, 50), "max": max(long_ttft)} if long_ttft else None,
        "latency_ms": _pcts(latency, 50, 95),
        "tokens_per_s": generated / span,
        "generated_tokens": generated,
        "span_s": span,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_computed": engine["computed"],  # over all rows: CoLD prefills twice
        "prompt_tokens_computed_fraction": engine["computed"] / (engine["rows"] * prompt_tokens),
        "prefix_cache": cache,
        "prefix_hit_rate": cache["hit_tokens"] / cache["queried_tokens"]
        if cache and cache["queried_tokens"]
        else None,
        # every stream's tokens: each variant must produce the reference's (a hit is exact,
        # and a request's tokens do not depend on what shares its batch)
        "tokens_digest": hashlib.sha256(
            json.dumps([r["tokens"] for r in records]).encode()
        ).hexdigest()[:16],
    }


# compared row -> (the run's part, its key): medians over rounds
MEDIANS = {
    "ttft_p50_ms": ("ttft_ms", "p50"),
    "ttft_p95_ms": ("ttft_ms", "p95"),
    "itl_p50_ms": ("itl_ms", "p50"),
    "itl_p99_ms": ("itl_ms", "p99"),
    "itl_max_ms": ("itl_ms", "max"),
    "long_ttft_p50_ms": ("long_ttft_ms", "p50"),
}
SAME = ("prefix_hit_rate", "prompt_tokens_computed_fraction", "tokens_digest")


def compare(records: list[dict]) -> list[dict]:
    """Per (workload, decoding, variant): medians over rounds, the ratios to the reference
    variant's medians, and whether it made the reference's tokens."""
    out = []
    for key in dict.fromkeys((r["workload"], r["decoding"], r["variant"]) for r in records):
        rs = [r for r in records if (r["workload"], r["decoding"], r["variant"]) == key]
        row = {**dict(zip(("workload", "decoding", "variant"), key)), "rounds": len(rs)}
        for name, (part, q) in MEDIANS.items():
            if rs[0][part] and rs[0][part][q] is not None:
                row[name] = statistics.median(r[part][q] for r in rs)
        row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rs)
        out.append({**row, **{k: rs[0][k] for k in SAME}})
    variant = REFERENCE[records[0]["scenario"]]
    refs = {(r["workload"], r["decoding"]): r for r in out if r["variant"] == variant}
    for row in out:
        ref = refs.get((row["workload"], row["decoding"]))
        if ref is None or ref is row:
            continue
        for k in RATIOS:
            if k in row and k in ref:
                row[f"{k.removesuffix('_ms')}_over_reference"] = row[k] / ref[k]
        row["same_tokens_as_reference"] = row["tokens_digest"] == ref["tokens_digest"]
    return out


def plot(rows: list[dict], scenario: str, path: str) -> None:
    """Prefix: TTFT and tokens/s per variant; itl: the streams' ITL p50/p99 per budget."""
    labels = [f"{r['workload']} {r['decoding']}\n{r['variant']}" for r in rows]
    metrics = (
        ("ttft_p50_ms", "tokens_per_s") if scenario == "prefix" else ("itl_p50_ms", "itl_p99_ms")
    )
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4))
    for ax, key in zip(axes, metrics):
        grouped_bars(ax, labels, {key: [r.get(key, 0) for r in rows]})
        ax.tick_params(axis="x", labelsize=7)
    save(fig, path)


def parse_args(scenario: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"cold-ray bench serving --scenario {scenario}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sizes = ["rounds"]
    if scenario == "prefix":
        p.add_argument(
            "--workloads",
            type=choice_list(PREFIX_KINDS, "workloads"),
            default=list(PREFIX_KINDS),
        )
        p.add_argument(
            "--decodings",
            type=choice_list(DECODINGS, "decodings"),
            default=list(DECODINGS),
        )
        p.add_argument("--users", type=int, default=16)
        p.add_argument("--requests-per-user", type=int, default=1)
        p.add_argument("--interval-ms", type=float, default=500.0, help="between arrivals")
        p.add_argument("--new-tokens", type=int, default=64)
        p.add_argument("--shots", type=int, default=8, help="worked examples in the prefix")
        p.add_argument("--max-prefill-tokens", type=int, default=256)
        p.add_argument("--prefix-cache-mib", type=int, default=256, help="size when on")
        p.add_argument("--seed", type=int, default=0, help="which test questions are asked")
        sizes += [
            "users",
            "requests_per_user",
            "new_tokens",
            "max_prefill_tokens",
            "prefix_cache_mib",
        ]
    else:
        p.add_argument("--budgets", type=positive_ints, default=[64, 256, 1024])
        p.add_argument("--streams", type=int, default=8)
        p.add_argument("--stream-tokens", type=int, default=160)
        p.add_argument("--long-prompts", type=int, default=4)
        p.add_argument("--long-len", type=int, default=900)
        p.add_argument("--long-new-tokens", type=int, default=4)
        p.add_argument("--arrive-at", type=int, default=16, help="stream token of the first")
        p.add_argument("--arrive-every", type=int, default=24, help="stream tokens between")
        p.add_argument("--decoding", choices=DECODINGS, default="plain")
        sizes += [
            "streams",
            "stream_tokens",
            "long_prompts",
            "long_len",
            "long_new_tokens",
            "arrive_at",
            "arrive_every",
        ]
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--adapter", default=str(DEMO_ADAPTER), help="PEFT adapter (default: demo)")
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--plot", help="write a PNG here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a setting as JSON
    args = p.parse_args(argv)
    args.scenario = scenario
    if args.child:
        return args
    require_positive(p, args, *sizes)
    if scenario == "prefix":
        if args.interval_ms < 0 or args.shots < 0:
            p.error("--interval-ms and --shots must be >= 0")
        if args.users * args.requests_per_user > 1000:
            p.error("at most 1000 requests (users x requests per user): the question pool's size")
    else:
        last = args.arrive_at + (args.long_prompts - 1) * args.arrive_every
        if last >= args.stream_tokens:
            p.error(
                f"the last long prompt arrives at stream token {last}, but streams end at "
                f"--stream-tokens {args.stream_tokens}: raise it above {last}"
            )
    from pathlib import Path

    if not (Path(args.adapter) / "adapter_config.json").exists():
        p.error(f"--adapter {args.adapter!r} is not a PEFT adapter folder")
    return args


def settings(args: argparse.Namespace) -> list[dict]:
    """Every run in order: per round, workload and decoding, the variants adjacent, their order
    alternating over rounds."""
    skip = {"json", "plot", "child", "rounds", "workloads", "decodings", "budgets", "decoding"}
    common = {k: v for k, v in vars(args).items() if k not in skip}
    if args.scenario == "prefix":
        pairs = [(w, d) for w in args.workloads for d in args.decodings]
        variants = ["cache on", "cache off"]
        common.update(itl_from=1)
    else:
        pairs, variants = [("streams", args.decoding)], ["none", *args.budgets]
        common.update(
            itl_from=args.arrive_at,
            new_tokens=args.stream_tokens,
            max_prefill_tokens=256,
            prefix_cache_mib=0,
        )
    out = []
    for rnd in range(args.rounds):
        for workload, decoding in pairs:
            for v in variants if rnd % 2 == 0 else variants[::-1]:
                out.append(
                    {
                        **common,
                        "workload": workload,
                        "decoding": decoding,
                        "variant": v,
                        "round": rnd,
                    }
                )
    return out


def main(argv: list[str] | None = None, scenario: str = "prefix") -> int:
    args = parse_args(scenario, argv)
    if args.child:
        print(json.dumps(run_setting(json.loads(args.child))))
        return 0
    from cold_ray.benchmarks.common import machine_record

    host = machine_record()
    records = run_children(
        "cold_ray.benchmarks.serving.arrivals",
        settings(args),
        lambda s, rec: (
            f"# {s['workload']} {s['decoding']} {s['variant']}: p50 TTFT "
            f"{rec['ttft_ms']['p50']:.0f} ms, ITL p99 {rec['itl_ms']['p99'] or 0:.0f} "
            f"ms, {rec['tokens_per_s']:.1f} tok/s"
        ),
    )
    if records is None:
        return 1
    rows = compare(records)
    result = {"comparison": rows, "runs": records, **provenance(host, argv)}
    result["goals"] = goals.check_run(f"serving:{scenario}", result)
    return report(result, args.json, lambda path: plot(rows, scenario, path), args.plot)


def main_itl(argv: list[str] | None = None) -> int:
    return main(argv, "itl")


if __name__ == "__main__":
    sys.exit(main())  # a child: its setting names the scenario
