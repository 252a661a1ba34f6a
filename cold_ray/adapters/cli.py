"""`cold-ray adapters ...`: add, list, show, tune and remove registry entries.

    cold-ray adapters add math /data/adapters/math --alpha 0.1 --beta 0.5
    cold-ray adapters list
    cold-ray adapters show math
    cold-ray adapters rm math

Every command takes `--registry PATH_OR_URL`: a SQLite file or a postgresql:// URL (default:
$COLD_RAY_REGISTRY, else registry.sqlite in the cold-ray cache folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cold_ray.adapters.peft import AdapterError


def _registry(args: argparse.Namespace):
    from cold_ray.adapters.registry import open_registry

    # The CLI runs with its user's own rights, so any path or fsspec scheme may be read.
    return open_registry(args.registry, allowed_schemes=None)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _show(record, as_json: bool) -> None:
    d = record.to_dict()
    if as_json:
        print(json.dumps(d))
        return
    d["created_at"] = _when(record.created_at)
    d["target_modules"] = ",".join(record.target_modules)
    d["warnings"] = "\n".join(record.warnings) or None
    width = max(map(len, d))
    for k, v in d.items():
        v = "-" if v is None else str(v).replace("\n", "\n" + " " * (width + 2))
        print(f"{k:<{width}}  {v}")


def _add(args: argparse.Namespace) -> int:
    from cold_ray.model.loader import read_model_args, resolve_model_path

    # A declared base model that differs from --model's name is served with a recorded warning
    # (names differ: hub id, folder, GGUF stem); shapes, layers and vocabulary are the guard.
    model_args = read_model_args(resolve_model_path(args.model))
    record = _registry(args).add(
        args.name,
        args.source,
        args=model_args,
        max_rank=args.max_lora_rank,
        alpha=args.alpha,
        beta=args.beta,
        cold_enabled=not args.no_cold,
        replace=args.replace,
    )
    _show(record, args.json)
    return 0


def _list(args: argparse.Namespace) -> int:
    records = _registry(args).list()
    if args.json:
        print(json.dumps([r.to_dict() for r in records]))
        return 0
    if not records:
        print("no adapters registered", file=sys.stderr)
        return 0
    fmt = lambda x: "-" if x is None else f"{x:g}"
    rows = [("NAME", "RANK", "MB", "SHA256", "ALPHA", "BETA", "COLD", "CREATED", "SOURCE")]
    rows += [
        (
            r.name,
            str(r.rank),
            f"{r.nbytes / 1e6:.1f}",
            r.sha256[:12],
            fmt(r.alpha),
            fmt(r.beta),
            "on" if r.cold_enabled else "off",
            _when(r.created_at),
            r.source,
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def _get(args: argparse.Namespace) -> int:
    _show(_registry(args).get(args.name), args.json)
    return 0


def _tune(args: argparse.Namespace) -> int:
    record = _registry(args).set_tuned(args.name, args.alpha, args.beta, not args.no_cold)
    _show(record, args.json)
    return 0


def _rm(args: argparse.Namespace) -> int:
    record = _registry(args).remove(args.name)
    print(f"removed {record.name}", file=sys.stderr)
    return 0


def _run(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (AdapterError, ValueError, KeyError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def add_parser(subparsers) -> None:
    """Register the `adapters` command tree on the top-level CLI's sub-parsers."""
    p = subparsers.add_parser("adapters", help="manage the adapter registry")
    p.set_defaults(func=lambda _: (p.print_help(), 2)[1])
    sub = p.add_subparsers(dest="adapters_command")

    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument(
            "--registry",
            help="registry file or postgresql:// URL (default: $COLD_RAY_REGISTRY or cache)",
        )
        c.add_argument("--json", action="store_true", help="print JSON")
        c.set_defaults(func=_run(func))
        return c

    a = cmd("add", _add, "validate an adapter and register it")
    a.add_argument("name", help="adapter name: 1-64 of A-Z a-z 0-9 . _ -")
    a.add_argument("source", help="PEFT adapter folder or fsspec URI (s3://..., file://...)")
    a.add_argument("--model", help="base model to validate against (default: SmolLM2)")
    a.add_argument("--max-lora-rank", type=int, default=64)
    a.add_argument("--replace", action="store_true", help="replace an existing entry")
    for c in (a, cmd("tune", _tune, "set an adapter's tuned CoLD defaults")):
        c.add_argument("--alpha", type=float, help="tuned CoLD alpha (default: global 0.1)")
        c.add_argument("--beta", type=float, help="tuned CoLD beta (default: global 0.5)")
        c.add_argument("--no-cold", action="store_true", help="record that CoLD is off for it")
    sub.choices["tune"].add_argument("name")
    cmd("list", _list, "list registered adapters")
    cmd("show", _get, "show one adapter").add_argument("name")
    cmd("rm", _rm, "unregister an adapter (its files are left alone)").add_argument("name")
