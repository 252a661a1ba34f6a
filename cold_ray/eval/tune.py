"""Per-adapter CoLD tuning: a grid over alpha × beta on a validation split.

Search: every (alpha, beta) in the grid runs greedy-CoLD on the same validation items as the
adapter's plain greedy (all in one continuous batch). The best setting — most items right;
ties go to the smaller beta (closer to greedy), then the larger alpha — is kept **only if**
it answers more items right than greedy *and* the exact McNemar test on the paired items
rejects "no difference" at `level` after a Bonferroni correction for the number of settings
tried (picking the best of k noisy settings would otherwise look significant by chance).
Otherwise the adapter is recorded as "CoLD off". Either way the registry entry is written in
one transaction (`Registry.set_tuned`), which replicas pick up through their resolver.

The report also says *why*, in log-probabilities (cold_ray.eval.margins): teacher-forced on
each item's gold answer, how often the expert and each setting rank the gold token first, the
positions a setting fixes and breaks, the change of the gold token's margin over the likeliest
other token, and a verdict line tying that evidence to the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from cold_ray.eval import margins
from cold_ray.eval.stats import paired_comparison

if TYPE_CHECKING:  # the engine (torch) loads only when tuning runs, not for `--help`
    from cold_ray.engine import EngineCore
    from cold_ray.eval.harness import Task

DEFAULT_ALPHAS = (0.05, 0.1, 0.3)
DEFAULT_BETAS = (0.1, 0.5, 1.0)


@dataclass
class TuneDecision:
    cold_enabled: bool
    alpha: float | None  # the stored setting (None when CoLD is off)
    beta: float | None
    reason: str
    n: int
    greedy_correct: int
    level: float
    min_gain: float
    tried: list[dict] = field(default_factory=list)  # one per setting, best first
    stored: bool = False  # False for a dry run
    # Log-probability evidence (cold_ray.eval.margins): the expert on the gold answers and, per
    # item, the setting the verdict is about; each `tried` entry carries its own `margins`.
    margins: dict | None = None
    why: str | None = None  # the verdict line

    def to_dict(self) -> dict:
        return asdict(self)


def decide(
    greedy: list[bool],
    candidates: dict[tuple[float, float], list[bool]],
    level: float = 0.05,
    min_gain: float = 0.0,
) -> TuneDecision:
    """Pick a setting or turn CoLD off, from per-item correctness on the same items."""
    if not candidates:
        raise ValueError("no CoLD settings to choose from")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    k, n = len(candidates), len(greedy)
    tried = []
    for (alpha, beta), correct in candidates.items():
        p = paired_comparison(greedy, correct)
        tried.append(
            {
                "alpha": alpha,
                "beta": beta,
                "correct": sum(correct),
                "n": n,
                "delta": p.delta,
                "delta_ci": list(p.delta_ci),
                "gains": p.only_b,
                "losses": p.only_a,
                "p_value": p.p_value,
                "p_bonferroni": min(1.0, p.p_value * k),
            }
        )
    tried.sort(key=lambda t: (-t["correct"], t["beta"], -t["alpha"]))
    best, g = tried[0], sum(greedy)
    setting = f"alpha={best['alpha']:g} beta={best['beta']:g}"
    head = (
        f"best of {k} settings: {setting} with {best['correct']}/{n} vs greedy {g}/{n} "
        f"(+{best['gains']}/-{best['losses']} items, exact McNemar p={best['p_value']:.3g}, "
        f"Bonferroni x{k} -> {best['p_bonferroni']:.3g})"
    )
    if best["correct"] <= g:
        why = "it is not better than expert greedy"
    elif best["delta"] < min_gain:
        why = f"its gain {best['delta']:+.3f} is below the required {min_gain:+.3f}"
    elif best["p_bonferroni"] >= level:
        why = f"the gain is not significant at level {level:g} after correction"
    else:
        return TuneDecision(
            True,
            best["alpha"],
            best["beta"],
            f"{head}; kept: significant at level {level:g}",
            n,
            g,
            level,
            min_gain,
            tried,
        )
    return TuneDecision(False, None, None, f"{head}; CoLD off: {why}", n, g, level, min_gain, tried)


def grid(alphas: Sequence[float], betas: Sequence[float]) -> list[tuple[float, float]]:
    return [(a, b) for a in alphas for b in betas]


def tune(
    core: EngineCore,
    registry,
    adapter: str,
    items: list[dict],
    task: Task,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
    level: float = 0.05,
    min_gain: float = 0.0,
    max_tokens: int | None = None,
    dry_run: bool = False,
    progress: bool = False,
    explain: bool = True,
) -> TuneDecision:
    """Evaluate greedy and the grid on `items`, decide, explain the decision with the gold
    answers' log-probabilities (`explain`), and store the result in `registry`.

    `core` must resolve `adapter` (normally through `registry.resolver()`); the registry
    entry is only written after every evaluation finished, in a single transaction.
    """
    from cold_ray.eval.harness import Mode, evaluate

    registry.get(adapter)  # fail before spending minutes of decoding on an unknown name
    settings = grid(alphas, betas)
    modes = [Mode("greedy")] + [Mode("cold", a, b) for a, b in settings]
    report = evaluate(
        core, items, adapter, modes, task, max_tokens=max_tokens, progress=progress, interleave=True
    )
    greedy = report.result(modes[0]).correct
    candidates = {(m.alpha, m.beta): report.result(m).correct for m in modes[1:]}
    decision = decide(greedy, candidates, level, min_gain)
    if explain:
        scores = margins.score(core, items, task, adapter, settings)
        _explain(decision, scores, greedy, candidates)
    if not dry_run:
        registry.set_tuned(adapter, decision.alpha, decision.beta, decision.cold_enabled)
        decision.stored = True
    return decision


def _explain(d: TuneDecision, scores: dict, greedy: list[bool], candidates: dict) -> None:
    """Attach the log-probability evidence and the verdict line to a decision."""
    expert = scores[margins.EXPERT]
    for t in d.tried:
        t["margins"] = margins.compare(expert, scores[(t["alpha"], t["beta"])])
    shown = margins.focus(d.tried, d.cold_enabled)
    key = (shown["alpha"], shown["beta"])
    d.margins = {
        "expert": margins.expert_summary(expert),
        "setting": {"alpha": shown["alpha"], "beta": shown["beta"]},
        "items": margins.item_rows(expert, scores[key], greedy, candidates[key]),
    }
    d.why = margins.verdict(d.cold_enabled, d.tried, d.greedy_correct, d.level)


def _margin_cells(m: dict | None) -> str:
    if m is None:
        return ""
    change = "-" if m["margin_change"] is None else f"{m['margin_change']:+.2f}"
    share = m["gold_first"] / m["positions"] if m["positions"] else 0.0
    return (
        f" {share:>7.1%} {'+{}/-{}'.format(m['fixed'], m['broken']):>9} {m['masked']:>6} "
        f"{change:>7}"
    )


_RIGHT = {True: "right", False: "wrong"}


def _ll(value: float | None) -> str:
    return "-inf" if value is None else f"{value:.2f}"  # None: a token CoLD cut out


def _evidence_lines(d: TuneDecision, shown: int = 10) -> list[str]:
    """The expert's view of the gold answers, then the items greedy and the best setting
    disagree on (they decide the paired test), with their gold log-likelihoods."""
    e = d.margins["expert"]
    share = e["gold_first"] / e["positions"] if e["positions"] else 0.0
    margin = "-" if e["mean_margin"] is None else f"{e['mean_margin']:+.2f}"
    lines = [
        f"gold answers, teacher-forced: {e['positions']} tokens of {e['items']} items "
        f"({e['skipped_items']} too long); the expert ranks the gold token first at "
        f"{share:.1%} (mean margin {margin} nats)"
    ]
    s = d.margins["setting"]
    split = [r for r in d.margins["items"] if r["greedy_correct"] != r["cold_correct"]]
    if split:
        lines.append(
            f"items greedy and alpha={s['alpha']:g} beta={s['beta']:g} disagree on "
            "(log-likelihood of the gold answer, gold tokens ranked first):"
        )
        lines.append(
            f"{'item':>6} {'greedy':>6} {'cold':>5} {'ll expert':>10} {'ll cold':>9} "
            f"{'first e/c':>11}"
        )
        for r in split[:shown]:
            if "tokens" in r:  # (an item longer than the context has no scores)
                first = f"{r['first_expert']}/{r['first_cold']} of {r['tokens']}"
                lines.append(
                    f"{r['item']:>6} {_RIGHT[r['greedy_correct']]:>6} "
                    f"{_RIGHT[r['cold_correct']]:>5} {_ll(r['logprob_expert']):>10} "
                    f"{_ll(r['logprob_cold']):>9} {first:>11}"
                )
        if len(split) > shown:
            lines.append(f"  ... {len(split) - shown} more in --json")
    return lines


def format_decision(adapter: str, d: TuneDecision) -> str:
    explained = d.margins is not None
    head = f"{'alpha':>6} {'beta':>5} {'correct':>9} {'delta':>7} {'+/-':>7} {'p':>7} {'p*k':>7}"
    if explained:
        head += f" {'gold@1':>7} {'fix/brk':>9} {'masked':>6} {'dmargin':>7}"
    lines = [
        f"tune {adapter}: grid of {len(d.tried)} settings on n={d.n} validation items; "
        f"expert greedy {d.greedy_correct}/{d.n}",
        head,
    ]
    for t in d.tried:
        lines.append(
            f"{t['alpha']:>6g} {t['beta']:>5g} {t['correct']:>4}/{t['n']:<4} "
            f"{t['delta']:>+7.3f} {'+{}/-{}'.format(t['gains'], t['losses']):>7} "
            f"{t['p_value']:>7.3g} {t['p_bonferroni']:>7.3g}"
            f"{_margin_cells(t.get('margins'))}"
        )
    if explained:
        lines += _evidence_lines(d)
    lines.append(d.reason)
    if d.why:
        lines.append(d.why)
    if d.cold_enabled:
        result = f"default CoLD alpha={d.alpha:g} beta={d.beta:g}"
    else:
        result = "CoLD off (plain greedy with the adapter by default)"
    lines.append(("stored in the registry: " if d.stored else "dry run, not stored: ") + result)
    return "\n".join(lines)


def plot_decision(adapter: str, d: TuneDecision | dict, path: str) -> None:
    """A heatmap of the grid: validation items right per (alpha, beta), and the gain/loss
    against expert greedy; `d` may be the `--json` output of an earlier run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = d if isinstance(d, dict) else d.to_dict()
    alphas = sorted({t["alpha"] for t in d["tried"]})
    betas = sorted({t["beta"] for t in d["tried"]})
    cell = {(t["alpha"], t["beta"]): t for t in d["tried"]}
    delta = [
        [cell[(a, b)]["delta"] if (a, b) in cell else float("nan") for b in betas] for a in alphas
    ]
    lim = max(0.01, max(abs(x) for row in delta for x in row if x == x))
    fig, ax = plt.subplots(figsize=(1.6 * len(betas) + 2.5, 1.0 * len(alphas) + 1.8))
    im = ax.imshow(delta, cmap="RdBu", vmin=-lim, vmax=lim)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            if (a, b) in cell:
                t = cell[(a, b)]
                color = "white" if abs(t["delta"]) > 0.6 * lim else "black"
                ax.text(
                    j,
                    i,
                    f"{t['correct']}/{t['n']}\n+{t['gains']}/-{t['losses']}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color=color,
                )
    ax.set_xticks(range(len(betas)), [f"β={b:g}" for b in betas])
    ax.set_yticks(range(len(alphas)), [f"α={a:g}" for a in alphas])
    fig.colorbar(im, ax=ax, label="accuracy − greedy")
    chosen = f"α={d['alpha']:g} β={d['beta']:g}" if d["cold_enabled"] else "CoLD off"
    ax.set_title(f"tune {adapter}: greedy {d['greedy_correct']}/{d['n']} → {chosen}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
