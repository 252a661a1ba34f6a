"""The evaluation harness: accuracy of expert greedy, CoLD greedy and base greedy on a task.

Every mode sees the same prompts, the same `SamplingParams` (stop strings, EOS, max_tokens)
and the same extractor; only the adapter and the CoLD knobs differ. Each mode's requests are
submitted to the engine all at once (continuous batching does the rest), so a mode's wall
time and tokens/s are what the engine delivers for that decoding at the configured row budget.

    core = EngineCore(EngineConfig(max_rows=32))
    core.register_adapter("arith", "deployments/adapters/arith-demo")
    items = load_items("test.jsonl", n=200)
    report = evaluate(core, items, "arith", default_modes([(0.1, 0.5)]), TASKS["gsm8k"])
    print(report.to_dict()["results"])
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cold_ray.adapters.demo_task import format_prompt
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from cold_ray.eval import extract
from cold_ray.eval.stats import paired_comparison, wilson_ci

CHOICE_INSTRUCTION = "Answer the multiple-choice question with the letter of the correct choice."


def choice_prompt(question: str) -> str:
    return f"{CHOICE_INSTRUCTION}\nQuestion: {question}\nAnswer:"


@dataclass(frozen=True)
class Task:
    """How items become prompts and how answers are read back: one per task family."""

    name: str
    prompt: Callable[[str], str]  # question -> the exact prompt text
    extract: extract.Extractor  # model text (or gold answer) -> canonical answer | None
    stop: tuple[str, ...] = ("\nQuestion:",)
    max_tokens: int = 256
    # Between the prompt and a gold answer scored as its continuation (tune's log-probability
    # margins): the demo adapter trains on prompt + " " + answer.
    target_delimiter: str = " "


TASKS = {
    # GSM8K style and the demo task share the demo adapter's training prompt.
    "gsm8k": Task("gsm8k", format_prompt, extract.gsm8k, max_tokens=256),
    "choice": Task("choice", choice_prompt, extract.choice, max_tokens=32),
}


def make_task(name: str, extractor: str | None = None, max_tokens: int | None = None) -> Task:
    """A built-in task, optionally with another extractor (`module:function`) or budget."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    task = TASKS[name]
    if extractor is not None:
        task = replace(task, extract=extract.get_extractor(extractor))
    if max_tokens is not None:
        task = replace(task, max_tokens=max_tokens)
    return task


@dataclass(frozen=True)
class Mode:
    kind: str  # greedy (adapter alone) | cold (adapter vs base) | base_greedy (no adapter)
    alpha: float | None = None
    beta: float | None = None

    def __post_init__(self):
        if self.kind not in ("greedy", "cold", "base_greedy"):
            raise ValueError(f"mode must be greedy, cold or base_greedy, got {self.kind!r}")
        if (self.kind == "cold") != (self.alpha is not None and self.beta is not None):
            raise ValueError("a cold mode needs alpha and beta; other modes take neither")
        if self.kind == "cold":
            ColdParams(self.alpha, self.beta)  # validates the range

    @property
    def label(self) -> str:
        return f"cold a={self.alpha:g} b={self.beta:g}" if self.kind == "cold" else self.kind

    @property
    def cold(self) -> ColdParams | None:
        return ColdParams(self.alpha, self.beta) if self.kind == "cold" else None


def default_modes(settings: Sequence[tuple[float, float]], base: bool = True) -> list[Mode]:
    """Expert greedy, CoLD at each (alpha, beta), and (optionally) base-model greedy."""
    modes = [Mode("greedy")] + list(dict.fromkeys(Mode("cold", a, b) for a, b in settings))
    return modes + [Mode("base_greedy")] if base else modes


def load_items(path: str | Path, n: int | None = None) -> list[dict]:
    """The first n `{question, answer}` objects of a JSONL file (blank lines skipped)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("question"), str)
                or (not isinstance(obj.get("answer"), (str, int, float)))
            ):
                raise ValueError(
                    f"{path}:{lineno}: expected an object with 'question' and 'answer' strings"
                )
            obj["answer"] = str(obj["answer"])
            items.append(obj)
            if n is not None and len(items) >= n:
                break
    if not items:
        raise ValueError(f"{path}: no items")
    return items


@dataclass
class ModeResult:
    mode: Mode
    correct: list[bool]  # per item, in item order
    preds: list[str | None]
    texts: list[str]
    completion_tokens: int
    wall_s: float  # time spent on this mode alone; 0.0 when modes ran interleaved
    finish_reasons: Counter = field(default_factory=Counter)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def num_correct(self) -> int:
        return sum(self.correct)

    def to_dict(self) -> dict:
        lo, hi = wilson_ci(self.num_correct, self.n)
        return {
            "mode": self.mode.kind,
            "alpha": self.mode.alpha,
            "beta": self.mode.beta,
            "label": self.mode.label,
            "correct": self.num_correct,
            "n": self.n,
            "accuracy": self.num_correct / self.n if self.n else 0.0,
            "ci95": [lo, hi],
            "no_answer": sum(p is None for p in self.preds),
            "completion_tokens": self.completion_tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.completion_tokens / self.wall_s, 2) if self.wall_s else None,
            "finish_reasons": dict(self.finish_reasons),
        }


@dataclass
class EvalReport:
    task: str
    adapter: str | None
    golds: list[str]
    results: list[ModeResult]
    sampling: SamplingParams

    def result(self, mode: Mode) -> ModeResult:
        return next(r for r in self.results if r.mode == mode)

    def paired(self) -> list[dict]:
        """CoLD at each setting against expert greedy (and greedy against base), same items."""
        by_kind = {r.mode.kind: r for r in self.results if r.mode.kind != "cold"}
        out = []
        if "greedy" in by_kind:
            g = by_kind["greedy"]
            for r in self.results:
                if r.mode.kind == "cold":
                    out.append(
                        {
                            "a": "greedy",
                            "b": r.mode.label,
                            "alpha": r.mode.alpha,
                            "beta": r.mode.beta,
                            "test": "exact McNemar (two-sided)",
                            **paired_comparison(g.correct, r.correct).to_dict(),
                        }
                    )
            if "base_greedy" in by_kind:
                out.append(
                    {
                        "a": "base_greedy",
                        "b": "greedy",
                        "alpha": None,
                        "beta": None,
                        "test": "exact McNemar (two-sided)",
                        **paired_comparison(by_kind["base_greedy"].correct, g.correct).to_dict(),
                    }
                )
        return out

    def to_dict(self) -> dict:
        p = self.sampling
        return {
            "task": self.task,
            "adapter": self.adapter,
            "n": len(self.golds),
            "sampling": {"max_tokens": p.max_tokens, "stop": list(p.stop), "greedy": p.greedy},
            "results": [r.to_dict() for r in self.results],
            "paired": self.paired(),
        }


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="req", dynamic_ncols=True, leave=False)


def _submit(
    core: EngineCore, prompts: list[str], params: SamplingParams, mode: Mode, adapter: str | None
) -> list:
    use = None if mode.kind == "base_greedy" else adapter
    reqs = [core.make_request(p, params, use, mode.cold) for p in prompts]
    for r in reqs:
        core.add(r)
    return reqs


def _drain(core: EngineCore, reqs: list, bar) -> dict[str, tuple[str, str]]:
    """Step the engine until every request in `reqs` finished; id -> (text, finish_reason)."""
    texts: dict[str, list[str]] = {r.request_id: [] for r in reqs}
    done: dict[str, tuple[str, str]] = {}
    while len(done) < len(reqs):
        for out in core.step():
            if out.request_id not in texts:
                continue
            texts[out.request_id].append(out.text)
            if out.finished:
                if out.error is not None:
                    raise out.error
                done[out.request_id] = ("".join(texts[out.request_id]), out.finish_reason)
                bar.update(1)
    return done


def warm_up(
    core: EngineCore, items: list[dict], adapter: str | None, modes: Sequence[Mode], task: Task
) -> None:
    """Load the adapter and run a few short requests per mode, so that no mode's timing
    pays for the adapter load or first-call allocations. Not part of any result."""
    if adapter is not None:
        core.load_adapter(adapter)
    prompts = [task.prompt(item["question"]) for item in items[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=4, stop=task.stop)
    for m in modes:
        _drain(core, _submit(core, prompts, params, m, adapter), _progress(0, False))


def evaluate(
    core: EngineCore,
    items: list[dict],
    adapter: str | None,
    modes: Sequence[Mode],
    task: Task,
    *,
    max_tokens: int | None = None,
    progress: bool = False,
    interleave: bool = False,
    rounds: int = 1,
) -> EvalReport:
    """Run every mode on every item.

    The prompts, the SamplingParams and the extractor are built once and shared by all modes.
    `interleave` submits all modes at once (best throughput, no per-mode time). `rounds > 1`
    splits the items into that many slices and runs every mode on each slice in turn, the
    order of modes reversed every other round: on a machine whose load drifts, each mode's
    time then samples the same stretches of it.
    """
    if adapter is None and any(m.kind != "base_greedy" for m in modes):
        raise ValueError("greedy and cold modes need an adapter")
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct, got {[m.label for m in modes]}")
    if not isinstance(rounds, int) or not 1 <= rounds <= max(1, len(items)):
        raise ValueError(f"rounds must be between 1 and the number of items, got {rounds}")
    golds = []
    for i, item in enumerate(items):
        gold = task.extract(item["answer"])
        if gold is None:
            raise ValueError(f"item {i}: no answer can be extracted from {item['answer']!r}")
        golds.append(gold)
    prompts = [task.prompt(item["question"]) for item in items]
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens or task.max_tokens, stop=task.stop
    )
    bar = _progress(len(items) * len(modes), progress)
    reqs: dict[Mode, list] = {m: [] for m in modes}
    wall: dict[Mode, float] = dict.fromkeys(modes, 0.0)
    done: dict[str, tuple[str, str]] = {}
    try:
        if interleave:
            for m in modes:
                reqs[m] = _submit(core, prompts, params, m, adapter)
            done = _drain(core, [r for m in modes for r in reqs[m]], bar)
        else:
            size = -(-len(prompts) // rounds)
            for k in range(rounds):
                chunk = prompts[k * size : (k + 1) * size]
                for m in modes if k % 2 == 0 else list(reversed(modes)):
                    bar.set_description(m.label)
                    t0 = time.perf_counter()
                    sent = _submit(core, chunk, params, m, adapter)
                    done.update(_drain(core, sent, bar))
                    wall[m] += time.perf_counter() - t0
                    reqs[m] += sent
    finally:
        bar.close()
    results = [_score(m, reqs[m], done, golds, task, wall[m]) for m in modes]
    return EvalReport(task.name, adapter, golds, results, params)


def _score(
    mode: Mode, reqs: list, done: dict, golds: list[str], task: Task, wall_s: float
) -> ModeResult:
    texts = [done[r.request_id][0] for r in reqs]
    preds = [task.extract(t) for t in texts]
    return ModeResult(
        mode=mode,
        correct=[p is not None and p == g for p, g in zip(preds, golds)],
        preds=preds,
        texts=texts,
        completion_tokens=sum(len(r.output_ids) for r in reqs),
        wall_s=wall_s,
        finish_reasons=Counter(done[r.request_id][1] for r in reqs),
    )


def format_table(report: EvalReport) -> str:
    """A plain-text summary: one line per mode, then the paired tests."""
    lines = [
        f"task {report.task}, adapter {report.adapter}, n={len(report.golds)}",
        f"{'mode':<22} {'correct':>9} {'acc':>6} {'95% CI':>15} {'no ans':>6} "
        f"{'tokens':>7} {'wall s':>7} {'tok/s':>7}",
    ]
    for r in report.results:
        d = r.to_dict()
        ci = f"[{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"
        tps = f"{d['tokens_per_s']:.1f}" if d["tokens_per_s"] else "-"
        lines.append(
            f"{d['label']:<22} {d['correct']:>4}/{d['n']:<4} {d['accuracy']:>6.3f} "
            f"{ci:>15} {d['no_answer']:>6} {d['completion_tokens']:>7} "
            f"{d['wall_s']:>7.1f} {tps:>7}"
        )
    for p in report.paired():
        lines.append(
            f"{p['b']} vs {p['a']}: delta {p['delta']:+.3f} "
            f"[{p['delta_ci'][0]:+.3f}, {p['delta_ci'][1]:+.3f}], discordant "
            f"{p['only_b']} (b right) / {p['only_a']} (a right), McNemar p={p['p_value']:.3g}"
        )
    return "\n".join(lines)


def plot(report: EvalReport | dict, path: str | Path, title: str | None = None) -> None:
    """Accuracy with Wilson 95% intervals, and tokens/s, per mode (PNG); `report` may also be
    the `--json` output of an earlier run, so a figure can be redrawn without decoding again."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = report if isinstance(report, dict) else report.to_dict()
    rows = rep["results"]
    labels = [d["label"].replace(" a=", "\nα=").replace(" b=", " β=") for d in rows]
    acc = [d["accuracy"] for d in rows]
    err = [
        [a - d["ci95"][0] for a, d in zip(acc, rows)],
        [d["ci95"][1] - a for a, d in zip(acc, rows)],
    ]
    colors = {"greedy": "tab:blue", "cold": "tab:orange", "base_greedy": "tab:gray"}
    col = [colors[d["mode"]] for d in rows]
    timed = any(d["tokens_per_s"] for d in rows)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(rows)), acc, yerr=err, color=col, capsize=4)
    for i, d in enumerate(rows):
        ax.text(i, d["ci95"][1] + 0.01, f"{d['correct']}/{d['n']}", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("accuracy (Wilson 95% CI)")
    ax.set_ylim(0, min(1.05, max(d["ci95"][1] for d in rows) + 0.1))
    if timed:
        ax2 = axes[0][1]
        ax2.bar(range(len(rows)), [d["tokens_per_s"] or 0 for d in rows], color=col)
        ax2.set_xticks(range(len(rows)), labels, fontsize=8)
        ax2.set_ylabel("generated tokens / s")
    fig.suptitle(title or f"{rep['task']}: adapter {rep['adapter']}, n={rep['n']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
