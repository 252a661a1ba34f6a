"""Load-test arithmetic with no heavy imports: length distributions, prompts, the summary of a
run's per-request records, and the threshold check.

Plain Python (no locust, torch or numpy) so that both the Locust process and the runner — and
the tests, which import torch first — can use it.

A *record* is one finished request as the locustfile writes it (one JSON object per line):

    {"t_start": 1700000000.1, "t_end": 1700000001.9,   # epoch seconds
     "endpoint": "completions" | "chat", "stream": bool,
     "decoding": "cold" | "plain" | "base",             # what was asked for
     "model": str, "status": int,                       # HTTP status; 0 = no response
     "ok": bool, "error": str | None,
     "latency_ms": float, "ttft_ms": float | None,      # TTFT only for streams
     "itl_ms": [float, ...],                            # gaps between streamed chunks
     "prompt_tokens": int, "completion_tokens": int}
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable

PERCENTILES = (50, 95, 99)


# ---- length distributions -------------------------------------------------------------------


class LengthDist:
    """A positive integer length drawn from a spec string.

    `fixed:N` · `uniform:LO:HI` (inclusive) · `normal:MEAN:STD` · `lognormal:MEDIAN:SIGMA` ·
    `choice:A,B,C`. Draws are clipped to [1, `cap`] when a cap is given.
    """

    KINDS = ("fixed", "uniform", "normal", "lognormal", "choice")

    def __init__(self, spec: str, cap: int | None = None):
        self.spec = spec
        self.cap = cap
        kind, _, rest = spec.partition(":")
        if kind not in self.KINDS:
            raise ValueError(f"length distribution {spec!r}: kind must be one of {self.KINDS}")
        try:
            if kind == "choice":
                self.params = [int(x) for x in rest.split(",")]
            else:
                self.params = [float(x) for x in rest.split(":")]
        except ValueError as e:
            raise ValueError(f"length distribution {spec!r}: parameters must be numbers") from e
        expected = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}.get(kind)
        if expected is not None and len(self.params) != expected:
            raise ValueError(
                f"length distribution {spec!r}: {kind} takes {expected} parameter(s), "
                f"got {len(self.params)}"
            )
        if not self.params or any(not math.isfinite(p) or p < 0 for p in self.params):
            raise ValueError(f"length distribution {spec!r}: parameters must be >= 0")
        if kind == "uniform" and self.params[0] > self.params[1]:
            raise ValueError(f"length distribution {spec!r}: LO {self.params[0]} > HI")
        self.kind = kind

    def sample(self, rng: random.Random) -> int:
        p = self.params
        if self.kind == "fixed":
            value = p[0]
        elif self.kind == "uniform":
            value = rng.randint(int(p[0]), int(p[1]))
        elif self.kind == "normal":
            value = rng.gauss(p[0], p[1])
        elif self.kind == "lognormal":
            value = p[0] * math.exp(rng.gauss(0.0, p[1]))
        else:
            value = rng.choice(p)
        value = max(1, int(round(value)))
        return min(value, self.cap) if self.cap is not None else value

    def __repr__(self) -> str:
        return f"LengthDist({self.spec!r})"


# ---- prompts --------------------------------------------------------------------------------

_CHARS_PER_TOKEN = 4.0  # SmolLM2 / Llama BPE on English prose: ~4 characters a token


def make_prompt(rng: random.Random, target_tokens: int) -> str:
    """An arithmetic word problem (the demo adapter's task) about `target_tokens` long.

    Longer targets prepend worked examples; the server's `usage.prompt_tokens` gives the exact
    count, which is what the summary reports.
    """
    from cold_ray.adapters.demo_task import format_prompt, make_split

    items = make_split("test", 8, seed=rng.randrange(1 << 30))
    question = format_prompt(items[0]["question"])
    examples: list[str] = []
    budget = target_tokens * _CHARS_PER_TOKEN - len(question)
    for item in items[1:]:
        example = f"Example: {item['question']}\n{item['answer']}\n"
        if budget < len(example):
            break
        examples.append(example)
        budget -= len(example)
    return "".join(examples) + question


PROMPT_MODES = ("random", "fewshot", "system")


def request_prompt(
    mode: str, rng: random.Random, target_tokens: int, chat: bool, shots: int = 8
) -> dict:
    """The prompt part of a request body: `{"prompt": str}` or `{"messages": [...]}`.

    `random`: `make_prompt` of about `target_tokens`; `fewshot`: one shared prefix of `shots`
    worked examples + a question drawn from the demo task's test split; a chat request carries
    either as its user turn. `system`: always chat — one shared long system prompt and a drawn
    question as the user turn. The shared modes build what `cold-ray bench serving --scenario prefix` measures
    (`cold_ray.benchmarks.workloads`), so a prefix cache sees the same reuse in both.
    """
    from cold_ray.benchmarks import workloads

    if mode == "random":
        text = make_prompt(rng, target_tokens)
    elif mode == "fewshot":
        prefix, question = workloads.fewshot_prefix(shots), rng.choice(workloads.question_pool())
        text = workloads.shared_prefix_request("fewshot", question, prefix)["prompt"]
    elif mode == "system":
        question = rng.choice(workloads.question_pool())
        return workloads.shared_prefix_request("chat", question, workloads.SYSTEM_PROMPT)
    else:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {PROMPT_MODES}")
    return {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}


# ---- summary --------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict:
    """`{"p50", "p95", "p99", "mean", "max", "count"}` in the values' unit (None when empty)."""
    out = {f"p{q}": _round(percentile(values, q)) for q in PERCENTILES}
    out["mean"] = _round(sum(values) / len(values)) if values else None
    out["max"] = _round(max(values)) if values else None
    out["count"] = len(values)
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def is_rejection(record: dict) -> bool:
    """A deliberate 503 (backpressure): reported apart from failures."""
    return record.get("status") == 503


def summarize(records: Iterable[dict], window_s: float | None = None) -> dict:
    """The numbers `summary.json` reports for a set of finished requests.

    `requests` counts every finished request; `failures` those that failed for any reason but
    a 503 (counted in `rejected_503`); rates are over the window from the first request's start
    to the last one's end (or `window_s`). `tokens_per_s` counts completion tokens of successful
    requests. TTFT and inter-token latency come from streamed requests only.
    """
    records = list(records)
    ok = [r for r in records if r.get("ok")]
    rejected = [r for r in records if not r.get("ok") and is_rejection(r)]
    failed = [r for r in records if not r.get("ok") and not is_rejection(r)]
    if window_s is None:
        window_s = (
            max(r["t_end"] for r in records) - min(r["t_start"] for r in records)
            if records
            else 0.0
        )
    tokens = sum(int(r.get("completion_tokens") or 0) for r in ok)
    itl = [g for r in ok for g in (r.get("itl_ms") or [])]
    errors = Counter(f"{r.get('status')}: {r.get('error')}"[:200] for r in failed)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failures": len(failed),
        "rejected_503": len(rejected),
        "failure_rate": round(len(failed) / len(records), 4) if records else 0.0,
        "window_s": round(window_s, 3),
        "rps": round(len(ok) / window_s, 3) if window_s > 0 else 0.0,
        "tokens_per_s": round(tokens / window_s, 2) if window_s > 0 else 0.0,
        "completion_tokens": tokens,
        "prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in ok),
        "latency_ms": distribution([r["latency_ms"] for r in ok]),
        "ttft_ms": distribution([r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]),
        "itl_ms": distribution(itl),
        "errors": dict(errors.most_common(10)),
    }


def summarize_by(records: list[dict], key: str) -> dict:
    """`summarize` per value of `key` (e.g. decoding), each over the whole run's window."""
    if not records:
        return {}
    window = max(r["t_end"] for r in records) - min(r["t_start"] for r in records)
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r.get(key)), []).append(r)
    return {k: summarize(v, window_s=window) for k, v in sorted(groups.items())}


# ---- thresholds -----------------------------------------------------------------------------

# option name -> (path into the summary, "max" | "min", what it means)
THRESHOLDS = {
    "max_p95_ttft_ms": (("ttft_ms", "p95"), "max", "p95 time to first token (ms)"),
    "max_p95_latency_ms": (("latency_ms", "p95"), "max", "p95 request latency (ms)"),
    "max_p95_itl_ms": (("itl_ms", "p95"), "max", "p95 inter-token latency (ms)"),
    "max_failure_rate": (("failure_rate",), "max", "failure rate (503 excluded)"),
    "min_tokens_per_s": (("tokens_per_s",), "min", "tokens/s"),
    "min_rps": (("rps",), "min", "requests/s"),
}


def check_thresholds(summary: dict, limits: dict[str, float | None]) -> list[str]:
    """Violations of the given limits (None = not checked), as messages naming both numbers.

    A limit on a metric the run did not measure (e.g. TTFT with no streamed request, or a run
    with no successful request) is a violation too: a gate must not pass on missing data.
    """
    violations = []
    for name, limit in limits.items():
        if limit is None:
            continue
        if name not in THRESHOLDS:
            raise ValueError(f"unknown threshold {name!r}; expected one of {sorted(THRESHOLDS)}")
        path, kind, what = THRESHOLDS[name]
        value = summary
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            violations.append(f"{what}: not measured in this run (limit {limit})")
        elif kind == "max" and value > limit:
            violations.append(f"{what} {value} exceeds the limit {limit}")
        elif kind == "min" and value < limit:
            violations.append(f"{what} {value} is below the limit {limit}")
    return violations
