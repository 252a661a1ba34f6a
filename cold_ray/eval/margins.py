"""Why CoLD helps an adapter or not, in log-probabilities: each validation item's gold answer,
teacher-forced after its prompt, scored by the expert (the adapter alone) and by CoLD at each
setting, through the engine's prompt log-probabilities (`SamplingParams.prompt_logprobs`).

At each gold-answer position:
- `logprob`: the gold token's log-probability — the expert's `log_softmax` of its logits, or
  CoLD's contrastive distribution over the plausible set (−inf where alpha cuts the gold
  token out);
- `margin`: `logprob` minus that of the likeliest other token (−inf/+inf at the edges of the
  plausible set). Greedy decoding keeps to the gold answer at a position exactly when the gold
  token ranks first there.

Against the expert, a setting *fixes* the positions where the gold token ranks first under
CoLD but not under the expert, and *breaks* the reverse (`masked` of those because alpha cut
the gold token out). An accuracy gain comes from positions fixed on the way to an answer; a
setting that breaks more than it fixes pulls decoding away from the answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cold_ray.decoding import ColdParams, SamplingParams

if TYPE_CHECKING:
    from cold_ray.engine import EngineCore
    from cold_ray.eval.harness import Task

EXPERT = "expert"


@dataclass(frozen=True)
class Position:
    logprob: float  # of the gold token; -inf: outside CoLD's plausible set
    margin: float  # logprob minus the likeliest other token's
    rank: int  # of the gold token (1: greedy picks it)

    @property
    def first(self) -> bool:
        return self.rank == 1


def _position(p) -> Position:
    """A Position from the engine's TokenLogprobs of a gold token (asked with 2 alternatives)."""
    others = [v for i, v in p.top if i != p.token]
    best_other = others[0] if others else -math.inf
    if math.isinf(p.logprob) and math.isinf(best_other):
        margin = -math.inf  # nothing plausible is the gold token
    else:
        margin = p.logprob - best_other
    return Position(p.logprob, margin, p.rank)


def gold_ids(core: EngineCore, task: Task, item: dict) -> tuple[list[int], int]:
    """(prompt + gold answer token ids, number of gold tokens): the prompt tokenized as the
    engine tokenizes it for decoding, the answer after the task's delimiter as one piece."""
    prompt = core.tokenizer.encode(task.prompt(item["question"]))
    answer = core.tokenizer.encode(task.target_delimiter + item["answer"], add_special_tokens=False)
    return prompt + answer, len(answer)


def score(
    core: EngineCore,
    items: list[dict],
    task: Task,
    adapter: str,
    settings: Sequence[tuple[float, float]],
) -> dict[str | tuple[float, float], list[list[Position] | None]]:
    """{EXPERT or (alpha, beta): per item, the gold answer's Positions (None: the item does not
    fit the context)}. Every request is prefill only and they run as one batch."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2)
    keys: list = [EXPERT, *settings]
    sequences = [gold_ids(core, task, item) for item in items]
    fits = [len(ids) < core.config.max_model_len for ids, _ in sequences]
    reqs = {}
    for key in keys:
        cold = None if key == EXPERT else ColdParams(*key)
        for i, (ids, _) in enumerate(sequences):
            if fits[i]:
                reqs[(key, i)] = core.make_request(ids, params, adapter, cold)
    by_id = {r.request_id: k for k, r in reqs.items()}
    for r in reqs.values():
        core.add(r)
    found: dict = {}
    while len(found) < len(reqs):
        for out in core.step():
            key = by_id.get(out.request_id)
            if key is None or key in found:
                continue
            if out.error is not None:
                raise out.error
            if out.prompt_logprobs is not None:
                found[key] = out.prompt_logprobs
            elif out.finished:
                raise RuntimeError(f"request {out.request_id} finished without prompt logprobs")
    result: dict = {}
    for key in keys:
        result[key] = [
            [_position(p) for p in found[(key, i)][-n:]] if fits[i] else None
            for i, (_, n) in enumerate(sequences)
        ]
    return result


def _finite_mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def compare(expert: list[list[Position] | None], cold: list[list[Position] | None]) -> dict:
    """One setting against the expert, over every gold-answer position of the scored items."""
    pairs = [(e, c) for ei, ci in zip(expert, cold) if ei is not None for e, c in zip(ei, ci)]
    fixed = sum(c.first and not e.first for e, c in pairs)
    broken = [(e, c) for e, c in pairs if e.first and not c.first]
    return {
        "positions": len(pairs),
        "gold_first": sum(c.first for _, c in pairs),
        "fixed": fixed,
        "broken": len(broken),
        "masked": sum(math.isinf(c.logprob) for _, c in broken),
        # where both margins are finite (a masked or lone plausible token has none)
        "margin_change": _finite_mean([c.margin - e.margin for e, c in pairs]),
    }


def expert_summary(expert: list[list[Position] | None]) -> dict:
    scored = [e for e in expert if e is not None]
    flat = [p for e in scored for p in e]
    return {
        "items": len(scored),
        "skipped_items": len(expert) - len(scored),  # longer than the context
        "positions": len(flat),
        "gold_first": sum(p.first for p in flat),
        "mean_margin": _finite_mean([p.margin for p in flat]),
        "mean_logprob": _finite_mean([p.logprob for p in flat]),
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinities


def item_rows(
    expert: list[list[Position] | None],
    cold: list[list[Position] | None],
    greedy_correct: list[bool],
    cold_correct: list[bool],
) -> list[dict]:
    """Per item: the gold answer's log-likelihood and first-ranked positions under each."""
    rows = []
    for i, (e, c) in enumerate(zip(expert, cold)):
        row = {"item": i, "greedy_correct": greedy_correct[i], "cold_correct": cold_correct[i]}
        if e is not None:
            row.update(
                {
                    "tokens": len(e),
                    "logprob_expert": _finite(sum(p.logprob for p in e)),
                    "logprob_cold": _finite(sum(p.logprob for p in c)),
                    "masked_cold": sum(math.isinf(p.logprob) for p in c),
                    "first_expert": sum(p.first for p in e),
                    "first_cold": sum(p.first for p in c),
                    "min_margin_expert": _finite(min(p.margin for p in e)),
                    "min_margin_cold": _finite(min(p.margin for p in c)),
                }
            )
        rows.append(row)
    return rows


def focus(tried: list[dict], cold_enabled: bool) -> dict:
    """The setting the explanation is about: the chosen one, else the one that helps the gold
    tokens most (fixed minus broken), ties to more items right."""
    if cold_enabled:
        return tried[0]
    # a setting that changes nothing (alpha = 1 is expert greedy) explains nothing
    changed = [t for t in tried if _changes(t)] or tried
    return max(changed, key=lambda t: (_net(t), t["correct"]))


def _net(t: dict) -> int:
    return t["margins"]["fixed"] - t["margins"]["broken"]


def _changes(t: dict) -> bool:
    return bool(t["margins"]["fixed"] or t["margins"]["broken"] or t["gains"] or t["losses"])


def verdict(cold_enabled: bool, tried: list[dict], greedy_correct: int, level: float) -> str:
    """One sentence: the decision and the log-probability evidence behind it."""
    best = focus(tried, cold_enabled)
    m = best["margins"]
    setting = f"alpha={best['alpha']:g} beta={best['beta']:g}"
    change = m["margin_change"]
    tokens = (
        f"ranks the gold token first at {m['fixed']} positions where the expert does not and "
        f"loses it at {m['broken']} ({m['masked']} cut by alpha) of {m['positions']}"
        + (f", margin {change:+.2f} nats on average" if change is not None else "")
    )
    items = f"+{best['gains']}/-{best['losses']} items"
    if cold_enabled:
        return (
            f"why on: on the gold answers CoLD {setting} {tokens}; decoding moves toward the "
            f"answers and the items follow ({items}, significant at {level:g})"
        )
    if m["fixed"] <= m["broken"]:
        return (
            f"why off: no setting helps the gold tokens on balance; the closest, {setting}, "
            f"{tokens}: the contrast with the base model pulls decoding away from the gold "
            f"answers ({items})"
        )
    if best["correct"] <= greedy_correct:
        return (
            f"why off: CoLD {setting} {tokens}: it helps the gold tokens on balance but not "
            f"where answers are decided ({items})"
        )
    return (
        f"why off: CoLD {setting} {tokens}: the direction is right, but {items} (corrected "
        f"p={best['p_bonferroni']:.3g}) is within noise at this many validation items"
    )
