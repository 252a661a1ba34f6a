"""Engine throughput and memory: CoLD vs plain greedy vs the baselines users would pick.

    cold-ray bench engine --json [--batches 1,4,8,16] [--threads 1,2] [--plot engine.png]

Every (mode, batch, threads) runs in its own child process, so each record's `peak_rss_bytes`
is that run's own peak. Modes run in alternating order over `--rounds`, each thread count right
after the other, so that ratios are measured side by side on the same (noisy) machine. Thread
settings are fixed and reported: `--threads` gives the engine's `num_threads` (its C kernels
and torch's intra-op pool) and torch's threads in the transformers modes, OpenMP waits
passively (`common.THREAD_ENV`).

Modes: cold (adapter, CoLD), greedy (adapter, plain LoRA greedy), base_greedy (no adapter),
naive_two_model_cold (transformers expert with the merged adapter + a separate transformers
base, each with its own KV cache, batched), hf_generate_greedy (transformers `generate`).
With cold in the modes, greedy also runs at 2B for every batch B (`--no-pair-greedy` skips it).

Per cold-ray run: `prefill_s` is the time until every request has its first token (chunked
prefill spreads the prompts over steps, mixed with early decodes), `step_ms` the median step
that decodes every request and prefills nothing, `gflop_s` that step's 2 x params touched x
rows per second (`micro/roofline.py` says what is counted; a CoLD amateur row's head is
the K candidate tokens the restricted step really computed, measured). Each round also
measures the machine in a child of its own: the best one-thread fp32 GEMM (packed oneDNN and
`torch.mm`) and the memory-read bandwidth. The JSON then has, besides one record per
(mode, batch): `ratios` (CoLD at B ÷ greedy at B and at 2B rows — step times, and the FLOPs
the two steps do, which is the step ratio's floor where both are arithmetic-bound — vs naive,
vs transformers),
`threads` (with several `--threads`: each run's tokens/s and step over the same mode and batch
on one thread), `machine` (peak, bandwidth, each mode's fraction of the peak, the batch-1
steps against the bandwidth floor) and `settings` (with the machine — CPU model and ISA flags —
and its load average at start and end, and the C kernels' blocking on it).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cold_ray.benchmarks import goals
from cold_ray.benchmarks.common import (
    DEMO_ADAPTER,
    THREAD_ENV,
    child_command,
    make_adapter,
    positive_ints,
    pyplot,
    require_positive,
    run_json,
    save,
    token_prompts,
)

MODES = ("cold", "greedy", "base_greedy", "naive_two_model_cold", "hf_generate_greedy")
ENGINE_MODES = ("cold", "greedy", "base_greedy")  # cold-ray's own engine
BENCH_SETS = {"model", "max_rows", "max_model_len", "max_loras"}  # set per run by the benchmark


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_cold_ray(
    mode: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    adapter: str,
    model: str | None = None,
    engine: dict | None = None,
    logprobs: int | None = None,
) -> dict:
    """Time to all first tokens (chunked prefill spreads it over steps, mixed with the first
    decodes) and the median pure-decode step after it, with the step's arithmetic."""
    import torch

    from cold_ray.benchmarks.micro import roofline
    from cold_ray.config import EngineConfig
    from cold_ray.engine import ColdParams, EngineCore, SamplingParams

    rows = 2 * batch if mode == "cold" else batch
    config = EngineConfig(
        model=model,
        max_rows=max(rows, 2),
        max_model_len=prompt_len + new_tokens + 1,
        max_loras=1,
        **(engine or {}),
    )
    core = EngineCore(config)
    name = None if mode == "base_greedy" else "adapter"
    if name:
        core.register_adapter(name, adapter)
        core.load_adapter(name)
    params = SamplingParams(
        temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=logprobs
    )
    cold = ColdParams(0.1, 0.5) if mode == "cold" else None
    prompts = token_prompts(core.tokenizer, batch, prompt_len)
    warm = list(reversed(prompts[0]))[:16]  # shares no prefix block with the measured prompts
    warm_params = SamplingParams(temperature=0.0, max_tokens=min(4, new_tokens), ignore_eos=True)
    core.generate([warm], warm_params, name, cold)  # fits the context the runs are sized for
    candidates = _count_candidates(core)
    hits_before = _prefix_hits(core)
    reqs = [core.make_request(p, params, name, cold) for p in prompts]
    start = time.perf_counter()
    for r in reqs:
        core.add(r)
    step_times, step_candidates = [], []
    with torch.inference_mode():
        while not all(r.output_ids for r in reqs):  # prefill chunks, mixed with early decodes
            core.step()
        prefill_s = time.perf_counter() - start
        while core.has_work():
            # Requests that got their first token late finish late, so the last steps run
            # fewer rows: only steps that decode every request and prefill nothing count.
            prefilled, calls = core.stats["prefill_tokens"], len(candidates)
            full = len(core.running) == batch
            t0 = time.perf_counter()
            core.step()
            elapsed = time.perf_counter() - t0
            if full and core.stats["prefill_tokens"] == prefilled:
                step_times.append(elapsed)
                step_candidates += candidates[calls:]
    wall = time.perf_counter() - start
    if not step_times:
        raise RuntimeError(
            f"no step decoded all {batch} requests at once: raise --new-tokens "
            f"above the steps prefill takes"
        )
    step_s = statistics.median(step_times)
    counts = roofline.model_params(core.args, config.max_lora_rank)
    k = statistics.mean(step_candidates) if step_candidates else None
    flops = roofline.decode_step_flops(counts, mode, batch, k)
    context = prompt_len + new_tokens / 2
    return {
        "wall_s": wall,
        "prefill_s": prefill_s,
        "step_ms": step_s * 1e3,
        "decode_steps": len(step_times),
        "rows": rows,
        "gflop_per_step": flops / 1e9,
        "gflop_s": flops / step_s / 1e9,
        "attention_gflop_per_step": roofline.attention_flops(core.args, rows, context) / 1e9,
        "amateur_candidates": k,
        "weight_bytes": roofline.weight_bytes(counts, lora=mode != "base_greedy"),
        "prefix_hit_tokens": _prefix_hits(core) - hits_before,
        "lora_backend": core.backend.name,
        # what `dtype` resolved to on this machine: storage, and the arithmetic on it
        "weight_dtype": str(core.runner.weight_dtype).removeprefix("torch."),
        "compute_dtype": str(core.runner.dtype).removeprefix("torch."),
    }


def _count_candidates(core) -> list[int]:
    """Record K (candidate columns per amateur row) of every restricted CoLD step: the amateur
    head's real size. Wraps the backend's method on this one engine object."""
    seen: list[int] = []
    inner = core.backend.contrastive_restricted

    def counted(*args, **kwargs):
        step = inner(*args, **kwargs)
        seen.append(int(step.ids.shape[1]) if step.ids is not None else 0)
        return step

    core.backend.contrastive_restricted = counted
    return seen


def _prefix_hits(core) -> int:
    return core.prefix_cache.stats["hit_tokens"] if core.prefix_cache is not None else 0


def run_transformers(
    mode: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    adapter: str,
    model: str | None = None,
    threads: int = 1,
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cold_ray.kernels import reference
    from cold_ray.model.loader import resolve_model_path

    torch.set_num_threads(threads)
    path = str(resolve_model_path(model))
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor(token_prompts(tok, batch, prompt_len))
    if mode == "hf_generate_greedy":
        base.generate(x[:1, :8], max_new_tokens=4, do_sample=False)  # warm
        start = time.perf_counter()
        base.generate(
            x,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        wall = time.perf_counter() - start
        return {"wall_s": wall, "step_ms": wall / new_tokens * 1e3}
    from peft import PeftModel

    expert_base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expert = PeftModel.from_pretrained(expert_base, adapter).merge_and_unload().eval()
    alpha, beta = torch.full((batch,), 0.1), torch.full((batch,), 0.5)
    start = time.perf_counter()
    step_times = []
    with torch.inference_mode():
        oe, oa = expert(x, use_cache=True), base(x, use_cache=True)
        for i in range(new_tokens):
            nxt = reference.contrastive_greedy(oe.logits[:, -1], oa.logits[:, -1], alpha, beta)
            if i == new_tokens - 1:
                break
            t0 = time.perf_counter()
            ids = nxt.unsqueeze(1)
            oe = expert(ids, past_key_values=oe.past_key_values, use_cache=True)
            oa = base(ids, past_key_values=oa.past_key_values, use_cache=True)
            step_times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "step_ms": statistics.median(step_times) * 1e3}


def measure_machine() -> dict:
    """The GEMM peak and memory bandwidth, measured in a child like every mode."""
    from cold_ray.benchmarks.micro import roofline

    gemm = roofline.measure_gemm_peak()
    return {
        "peak_gflop_s": gemm["peak_gflop_s"],
        "gemm": gemm["shapes"],
        "bandwidth_gib_s": roofline.measure_bandwidth() / 2**30,
    }


def child(args: argparse.Namespace) -> None:
    if args.mode == "machine":
        print(json.dumps({"mode": "machine", **measure_machine()}))
        return
    engine = json.loads(args.engine_json)
    if args.mode in ENGINE_MODES:
        rec = run_cold_ray(
            args.mode,
            args.batch,
            args.prompt_len,
            args.new_tokens,
            args.adapter,
            args.model,
            engine,
            args.logprobs,
        )
    else:
        rec = run_transformers(
            args.mode,
            args.batch,
            args.prompt_len,
            args.new_tokens,
            args.adapter,
            args.model,
            engine.get("num_threads") or 1,
        )
    rec.update(
        mode=args.mode,
        batch=args.batch,
        threads=engine.get("num_threads"),
        peak_rss_bytes=peak_rss(),
        tokens_per_s=args.batch * args.new_tokens / rec["wall_s"],
    )
    print(json.dumps(rec))


def default_adapter(tmp: str) -> str:
    """The demo adapter if present, else a random rank-16 all-linear PEFT adapter."""
    if (DEMO_ADAPTER / "adapter_config.json").exists():
        return str(DEMO_ADAPTER)
    from cold_ray.model.loader import default_model_path, read_model_args

    return str(make_adapter(read_model_args(default_model_path()), Path(tmp), rank=16))


SUMMED = ("tokens_per_s", "step_ms", "peak_rss_bytes", "wall_s", "prefill_s", "gflop_s")


def _threads(record: dict) -> int:
    return record.get("threads") or 1


def summarize(records: list[dict]) -> list[dict]:
    """Median over rounds per (mode, batch, threads)."""
    out = []
    keys = sorted(
        {(r["mode"], r["batch"], _threads(r)) for r in records}, key=lambda k: (k[1], k[0], k[2])
    )
    for mode, batch, threads in keys:
        rs = [r for r in records if (r["mode"], r["batch"], _threads(r)) == (mode, batch, threads)]
        med = {k: statistics.median(r[k] for r in rs) for k in SUMMED if k in rs[0]}
        same = {
            k: rs[0][k]
            for k in (
                "lora_backend",
                "rows",
                "gflop_per_step",
                "attention_gflop_per_step",
                "weight_bytes",
                "weight_dtype",
                "compute_dtype",
            )
            if k in rs[0]
        }
        if rs[0].get("amateur_candidates") is not None:
            same["amateur_candidates"] = statistics.median(r["amateur_candidates"] for r in rs)
        out.append(
            {"mode": mode, "batch": batch, "threads": threads, "rounds": len(rs), **med, **same}
        )
    return out


def machine_summary(machines: list[dict], summary: list[dict]) -> dict:
    """Peak and bandwidth (median over rounds), each cold-ray mode's GFLOP/s against the
    peak, and the batch-1 decode steps against the memory-bandwidth floor."""
    peak = statistics.median(m["peak_gflop_s"] for m in machines)
    bandwidth = statistics.median(m["bandwidth_gib_s"] for m in machines) * 2**30
    out = {
        "peak_gflop_s": peak,
        "bandwidth_gib_s": bandwidth / 2**30,
        "gemm_shapes_by_round": [m["gemm"] for m in machines],
    }
    out["efficiency"] = [
        {
            "mode": r["mode"],
            "batch": r["batch"],
            "threads": _threads(r),
            "gflop_s": r["gflop_s"],
            "fraction_of_peak": r["gflop_s"] / peak,
        }
        for r in summary
        if "gflop_s" in r
    ]
    floor = []
    for r in summary:  # the peak and the bandwidth are one thread's
        if (
            r["batch"] == 1
            and "weight_bytes" in r
            and r["mode"] in ("base_greedy", "greedy")
            and _threads(r) == 1
        ):
            floor_ms = r["weight_bytes"] / bandwidth * 1e3
            floor.append(
                {
                    "mode": r["mode"],
                    "step_ms": r["step_ms"],
                    "floor_step_ms": floor_ms,
                    "fraction_of_floor_speed": floor_ms / r["step_ms"],
                    "goal": goals.threshold("batch1_floor"),
                }
            )
    out["bandwidth_floor"] = floor
    return out


def _step_gflop(record: dict) -> float:
    return record["gflop_per_step"] + record.get("attention_gflop_per_step", 0.0)


def ratios(summary: list[dict]) -> list[dict]:
    """Per thread count and batch: CoLD against greedy, naive and transformers."""
    out = []
    for threads in sorted({_threads(r) for r in summary}):
        out += _ratios([r for r in summary if _threads(r) == threads], threads)
    return out


def _ratios(summary: list[dict], threads: int) -> list[dict]:
    by = {(r["mode"], r["batch"]): r for r in summary}
    out = []
    for batch in sorted({r["batch"] for r in summary}):
        get = lambda m, b=batch: by.get((m, b))
        row = {"batch": batch, "threads": threads}
        if get("cold") and get("greedy"):
            row["cold_step_over_greedy"] = get("cold")["step_ms"] / get("greedy")["step_ms"]
        if get("cold") and get("greedy", 2 * batch):  # the same rows: B pairs vs 2B plain rows
            cold, greedy = get("cold"), get("greedy", 2 * batch)
            row["cold_step_over_greedy_2b_rows"] = cold["step_ms"] / greedy["step_ms"]
            row["cold_step_over_greedy_2b_rows_goal"] = goals.threshold(
                "cold_step_over_greedy_2b_rows"
            )
            if "gflop_per_step" in cold and "gflop_per_step" in greedy:
                # the ratio if both steps ran at one FLOP rate (arithmetic-bound): its floor
                row["cold_flop_over_greedy_2b_rows"] = _step_gflop(cold) / _step_gflop(greedy)
        if get("cold") and get("naive_two_model_cold"):
            naive = get("naive_two_model_cold")
            row["cold_speedup_over_naive"] = get("cold")["tokens_per_s"] / naive["tokens_per_s"]
            row["cold_rss_over_naive"] = get("cold")["peak_rss_bytes"] / naive["peak_rss_bytes"]
        if get("base_greedy") and get("hf_generate_greedy"):
            hf = get("hf_generate_greedy")
            row["greedy_speedup_over_hf"] = get("base_greedy")["tokens_per_s"] / hf["tokens_per_s"]
        if len(row) > 2:
            out.append(row)
    return out


THREAD_GOAL_AT = (2, 16)  # (threads, requests) where goals.py's `two_threads` applies


def thread_scaling(summary: list[dict]) -> list[dict]:
    """Each run on more than one thread against the same mode and batch on one: tokens/s
    (prefill included) and the decode step, with the goal where it applies."""
    one = {(r["mode"], r["batch"]): r for r in summary if _threads(r) == 1}
    out = []
    for r in summary:
        base = one.get((r["mode"], r["batch"]))
        if _threads(r) == 1 or base is None:
            continue
        row = {
            "mode": r["mode"],
            "batch": r["batch"],
            "threads": _threads(r),
            "tokens_per_s_over_1_thread": r["tokens_per_s"] / base["tokens_per_s"],
            "peak_rss_over_1_thread": r["peak_rss_bytes"] / base["peak_rss_bytes"],
        }
        if "step_ms" in r and "step_ms" in base:
            row["step_speedup_over_1_thread"] = base["step_ms"] / r["step_ms"]
        if (row["threads"], row["batch"]) == THREAD_GOAL_AT:
            row["goal"] = goals.threshold("two_threads")
        out.append(row)
    return out


def runs(modes: list[str], batches: list[int], pair_greedy: bool) -> list[tuple[str, int]]:
    """(mode, batch) runs of one round; CoLD at B brings greedy at 2B rows for its ratio."""
    out = [(m, b) for b in batches for m in modes]
    if pair_greedy and "cold" in modes:
        out += [("greedy", 2 * b) for b in batches if ("greedy", 2 * b) not in out]
    return out


def plot(summary: list[dict], machine: dict | None, path: str) -> None:
    """tokens/s against requests per mode (and thread count); GFLOP/s against rows where the
    runs measured it (cold-ray's, not the baselines')."""
    flops = any("gflop_s" in r for r in summary)
    fig, axes = pyplot().subplots(
        1, 2 if flops else 1, figsize=(12 if flops else 7, 4), squeeze=False
    )
    ax, ax2 = axes[0][0], axes[0][-1]
    counts = sorted({_threads(r) for r in summary})
    for mode in dict.fromkeys(r["mode"] for r in summary):
        for threads in counts:
            runs_ = [r for r in summary if r["mode"] == mode and _threads(r) == threads]
            label = mode if len(counts) == 1 else f"{mode}, {threads} thread(s)"
            pts = sorted((r["batch"], r["tokens_per_s"]) for r in runs_)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
            pts = sorted((r["rows"], r["gflop_s"]) for r in runs_ if "gflop_s" in r)
            if pts:
                ax2.plot(*zip(*pts), marker="o", label=label)
    ax.set(xlabel="concurrent requests", ylabel="generated tokens / s (prefill included)")
    if flops:
        ax2.set(xlabel="rows in the decode step", ylabel="effective GFLOP/s (2 x params x rows)")
    if machine and flops:
        ax2.axhline(
            machine["peak_gflop_s"],
            color="black",
            lw=1,
            ls="--",
            label=f"measured GEMM peak {machine['peak_gflop_s']:.0f}",
        )
    for a in {ax, ax2}:
        a.set_xscale("log", base=2)
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    save(fig, path)


def _run_child(kind: str, batch: int, args, adapter: str, threads: int | None = None) -> dict:
    engine = args.engine if threads is None else {**args.engine, "num_threads": threads}
    cmd = child_command(
        "cold_ray.benchmarks.engine.throughput",
        mode=kind,
        batch=batch,
        adapter=adapter,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        engine_json=json.dumps(engine),
        model=args.model or None,
        logprobs=args.logprobs,
    )
    return run_json(cmd, f"{kind} B={batch}")


def engine_setting(text: str) -> tuple[str, object]:
    """`NAME=VALUE` for an EngineConfig field the benchmark does not set itself; VALUE as JSON
    (true, 64, null), else a string."""
    from dataclasses import fields

    from cold_ray.config import EngineConfig

    name, sep, value = text.partition("=")
    allowed = {f.name for f in fields(EngineConfig)} - BENCH_SETS
    if not sep or name not in allowed:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE with NAME one of {sorted(allowed)}, got {text!r}"
        )
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if isinstance(getattr(EngineConfig, name), bool) and not isinstance(parsed, bool):
        raise argparse.ArgumentTypeError(f"{name} takes true or false, got {value!r}")
    return name, parsed


def config_problems(error: Exception) -> str:
    """What a failed EngineConfig says, one clause per setting: "num_threads must be greater
    than or equal to 1, got 0" (pydantic's own text names the rule, not the field)."""
    found = getattr(error, "errors", None)
    if found is None:  # a plain TypeError / ValueError already says it
        return str(error)
    clauses = []
    for err in found():
        field = ".".join(str(part) for part in err["loc"]) or "settings"
        rule = err["msg"].removeprefix("Value error, ")
        if rule.startswith("Input should be"):
            rule = "must be" + rule.removeprefix("Input should be")
        clauses.append(f"{field} {rule}, got {err['input']!r}")
    return "; ".join(clauses)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cold-ray bench engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batches", type=positive_ints, default=[1, 4, 8, 16])
    p.add_argument(
        "--threads",
        type=positive_ints,
        help="thread counts to run each mode at, side by side (the engine's "
        "num_threads; default: its setting, 1)",
    )
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--adapter", help="PEFT adapter (default: demo adapter, else random r16)")
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--no-pair-greedy",
        action="store_true",
        help="skip the greedy runs at 2B rows that CoLD at B is compared with",
    )
    p.add_argument(
        "--engine",
        type=engine_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an engine setting for cold-ray's runs, e.g. cpu_rowwise_kernels=false (repeatable)",
    )
    p.add_argument(
        "--logprobs",
        type=int,
        metavar="N",
        help="cold-ray's runs ask N top log-probabilities per token (what asking costs: "
        "CoLD rows then compute the amateur's full LM head, not only the plausible tokens')",
    )
    p.add_argument("--json", action="store_true", help="print the records as one JSON list")
    p.add_argument("--plot", help="write a PNG of tokens/s and GFLOP/s vs batch")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine-json", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.engine = dict(args.engine)
    from cold_ray.config import EngineConfig

    try:  # a bad value fails here, not in every child
        EngineConfig(**args.engine)
    except (TypeError, ValueError) as e:
        p.error(f"--engine: {config_problems(e)}")
    if args.threads and "num_threads" in args.engine:
        p.error("give the thread counts with --threads or --engine num_threads=N, not both")
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        p.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    require_positive(p, args, "prompt_len", "new_tokens", "rounds")
    if args.logprobs is not None and args.logprobs < 0:
        p.error(f"--logprobs must be >= 0, got {args.logprobs}")
    from cold_ray.benchmarks.common import machine_record
    from cold_ray.kernels import cpu_kernels

    counts = args.threads or [None]  # None: the engine's own num_threads
    plan = [
        (m, b, t) for m, b in runs(modes, args.batches, not args.no_pair_greedy) for t in counts
    ]
    records, machines, host = [], [], machine_record()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or default_adapter(tmp)
        for rnd in range(args.rounds):
            order = [("machine", 0, None)] + plan
            for kind, batch, threads in order if rnd % 2 == 0 else order[::-1]:
                try:
                    rec = _run_child(kind, batch, args, adapter, threads)
                except RuntimeError as e:
                    print(e, file=sys.stderr)
                    return 1
                rec["round"] = rnd
                if kind == "machine":
                    machines.append(rec)
                    print(
                        f"# machine: GEMM peak {rec['peak_gflop_s']:.1f} GFLOP/s, "
                        f"{rec['bandwidth_gib_s']:.1f} GiB/s",
                        file=sys.stderr,
                    )
                    continue
                records.append(rec)
                print(
                    f"# {kind} B={batch} threads={_threads(rec)}: "
                    f"{rec['tokens_per_s']:.1f} tok/s, {rec['step_ms']:.1f} ms/step",
                    file=sys.stderr,
                )
    summary = summarize(records)
    mach = machine_summary(machines, summary)
    result = summary + [
        {"mode": "ratios", "rows": ratios(summary)},
        {"mode": "threads", "rows": thread_scaling(summary)},
        {"mode": "machine", **mach},
        {
            "mode": "settings",
            "threads": THREAD_ENV,
            "thread_counts": args.threads,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "logprobs": args.logprobs,
            "adapter": adapter,
            "model": args.model,
            "engine": args.engine,
            "kernel_blocking": cpu_kernels.blocking().record(),
            "host_at_start": host,
            "host_at_end": machine_record(),
        },
    ]
    result.append({"mode": "goals", "rows": goals.check_run("engine", result)})
    if args.plot:
        plot(summary, mach, args.plot)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
