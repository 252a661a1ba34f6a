"""What sampling and detokenisation add to a decode step, measured beside the step itself.

    cold-ray bench sampling --json [--rows 32] [--repeats 30]

- sampler: `sample_rows` over real SmolLM2 logits ([rows, 49152], the next-token logits at
  `rows` positions of a text), for several knob mixes, against the median decode step of
  `EngineCore(EngineConfig(max_rows=rows))` on SmolLM2 with `rows` plain greedy requests,
  both in this process with the engine's thread setting. Goal: the sampler adds <= 5% to a
  step. The per-row loop it replaced (softmax + `torch.multinomial` per row) is timed too.
- detok: time of one `IncrementalDetokenizer.add` when a request already has n tokens
  (n = 16, 64, 256, 1024; a stop string set, so the hold-back path runs), against a full
  re-decode of the output each step. Goal: flat in n.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

from cold_ray.benchmarks import goals
from cold_ray.benchmarks.common import machine_record

TEXT = (
    "The engine decodes every running request in one batch. Each step gathers the rows, runs "
    "the model, picks one token per request and streams the text out. Ça marche très bien — "
    "même avec des accents, 中文字符 and emoji 😀 in the output.\n"
)
LENGTHS = (16, 64, 256, 1024)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def engine_step_ms(core, rows: int, prompt: list[int], steps: int) -> float:
    """Median decode step with `rows` plain greedy requests (prefill excluded)."""
    import torch

    from cold_ray.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(rows):
        core.add(core.make_request(prompt[i : i + 32], params))
    times = []
    with torch.inference_mode():
        core.step()  # prefills + first decode
        while core.has_work():
            t0 = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def loop_sampler(scores, params, generators) -> list[int]:
    """The per-row sampler this one replaced (for comparison only)."""
    import torch

    picks = scores.argmax(dim=-1)
    for i, p in enumerate(params):
        row = scores[i] / p.temperature
        if p.top_k:
            kth = row.topk(min(p.top_k, row.shape[0])).values[-1]
            row = row.masked_fill(row < kth, -math.inf)
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        picks[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return picks.tolist()


def bench_sampler(core, rows: int, ids: list[int], repeats: int) -> list[dict]:
    import torch

    from cold_ray.engine import SamplingParams
    from cold_ray.engine.sampling import SeedState, sample_rows

    with torch.inference_mode():
        logits = core.prompt_logits(ids[:rows]).float()  # [rows, V], real distributions
    mixes = {
        "temperature_1": [SamplingParams()],
        "top_p_0.9": [SamplingParams(top_p=0.9)],
        "top_k_50": [SamplingParams(top_k=50, temperature=0.8)],
        "mixed": [
            SamplingParams(temperature=0.7, top_p=0.95, top_k=40),
            SamplingParams(),
            SamplingParams(top_p=0.8),
            SamplingParams(temperature=0.0),
        ],
    }
    out = []
    for name, cycle in mixes.items():
        params = [cycle[i % len(cycle)] for i in range(rows)]
        rngs = [SeedState(i) for i in range(rows)]
        step = [0]

        def run(params=params, rngs=rngs, step=step):
            step[0] += 1
            sample_rows(logits, None, params, rngs, [step[0]] * rows)

        rec = {"mix": name, "sampler_ms": _median_ms(run, repeats)}
        sampled = [p for p in params if not p.greedy]
        if name != "mixed":
            gens = [torch.Generator().manual_seed(i) for i in range(rows)]
            rec["per_row_loop_ms"] = _median_ms(
                lambda p=sampled, g=gens: loop_sampler(logits, p, g), max(3, repeats // 5)
            )
        rec["greedy_argmax_ms"] = _median_ms(lambda: logits.argmax(-1).tolist(), repeats)
        out.append(rec)
    return out


class FullRedecode:
    """The detokeniser this one replaced: re-decodes all output tokens every step."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop, self.ids, self.text, self.sent = tokenizer, stop, [], "", 0
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        start = max(0, self.sent - self.holdback - 1)
        if any(text.find(s, start) >= 0 for s in self.stop):
            return ""
        safe = len(text) - self.holdback
        delta, self.sent = text[self.sent : safe], max(self.sent, safe)
        return delta


def bench_detok(tokenizer, repeats: int) -> list[dict]:
    from cold_ray.engine.detok import IncrementalDetokenizer

    ids = tokenizer.encode(TEXT * 40, add_special_tokens=False)
    stop = ("\n\nUser:",)
    per = 16  # add() calls timed per sample
    out = []
    for n in LENGTHS:
        rec = {"tokens": n}
        for name, cls in (("incremental", IncrementalDetokenizer), ("full_redecode", FullRedecode)):
            samples = []
            for _ in range(repeats if name == "incremental" else max(3, repeats // 5)):
                d = cls(tokenizer, stop)
                for t in ids[: n - per // 2]:
                    d.add(t)
                t0 = time.perf_counter()
                for t in ids[n - per // 2 : n + per // 2]:
                    d.add(t)
                samples.append((time.perf_counter() - t0) / per)
            rec[f"{name}_us_per_step"] = statistics.median(samples) * 1e6
        out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cold-ray bench sampling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--steps", type=int, default=24, help="decode steps timed for the engine")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    args = p.parse_args(argv)

    from cold_ray.config import EngineConfig
    from cold_ray.engine import EngineCore

    core = EngineCore(EngineConfig(max_rows=args.rows, max_model_len=256))
    ids = core.tokenizer.encode(TEXT * 20, add_special_tokens=False)
    step_ms = engine_step_ms(core, args.rows, ids, args.steps)
    sampler = bench_sampler(core, args.rows, ids, args.repeats)
    for rec in sampler:
        rec["fraction_of_step"] = rec["sampler_ms"] / step_ms
    detok = bench_detok(core.tokenizer, args.repeats)
    flat = detok[-1]["incremental_us_per_step"] / detok[0]["incremental_us_per_step"]
    result = {
        "rows": args.rows,
        "vocab": core.args.vocab_size,
        "threads": core.config.num_threads,
        "load_avg_1min": os.getloadavg()[0],
        "machine": machine_record(),
        "engine_step_ms": step_ms,
        "sampler": sampler,
        "detok": detok,
        "detok_1024_over_16": flat,
    }
    result["goals"] = goals.check_run("sampling", result)
    core.shutdown()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
