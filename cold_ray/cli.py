"""`cold-ray` command line: generate, bench, and the sub-commands other modules register."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _generate(args: argparse.Namespace) -> int:
    from cold_ray.config import EngineConfig
    from cold_ray.engine import ColdParams, EngineCore, EngineError, SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop or ()),
        )
        cold = None if args.no_cold or args.adapter is None else ColdParams(args.alpha, args.beta)
        config = EngineConfig(
            model=args.model,
            device=args.device,
            max_lora_rank=args.max_lora_rank,
            max_rows=2,
            max_model_len=args.max_model_len,
        )
        core = EngineCore(config)
        adapter = None
        if args.adapter is not None:
            adapter = "adapter"
            core.register_adapter(adapter, args.adapter)
        prompt = args.prompt
        if args.chat:
            prompt = core.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        result = core.generate([prompt], params, adapter=adapter, cold=cold)[0]
    except (ValueError, EngineError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["adapter"] = args.adapter
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
    return 0


def _bench(args: argparse.Namespace) -> int:
    from cold_ray.benchmarks import module_of

    return importlib.import_module(module_of(args.what)).main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    from cold_ray import decoding as d

    parser = argparse.ArgumentParser(prog="cold-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode one prompt (CoLD when an adapter is given)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--adapter", help="PEFT adapter folder")
    g.add_argument("--model", help="HF safetensors folder or .gguf file (default: SmolLM2)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--alpha", type=float, default=d.DEFAULT_ALPHA)
    g.add_argument("--beta", type=float, default=d.DEFAULT_BETA)
    g.add_argument("--no-cold", action="store_true", help="plain decoding with the adapter")
    g.add_argument("--max-tokens", type=_positive_int, default=d.DEFAULT_MAX_TOKENS)
    g.add_argument("--max-model-len", type=_positive_int, default=2048)
    g.add_argument("--max-lora-rank", type=_positive_int, default=64)
    g.add_argument("--temperature", type=float, default=d.DEFAULT_TEMPERATURE, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=d.DEFAULT_TOP_P)
    g.add_argument("--top-k", type=int, default=d.DEFAULT_TOP_K)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_generate)

    from cold_ray.benchmarks import BENCHMARKS

    width = max(map(len, BENCHMARKS))
    b = sub.add_parser(
        "bench",
        help="benchmarks (map: benchmarks/README.md)",
        description="Run one benchmark; `cold-ray bench NAME --help` for its arguments.",
        epilog="benchmarks:\n"
        + "\n".join(f"  {n:<{width}}  {q}" for n, (_, q) in BENCHMARKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("what", choices=BENCHMARKS, metavar="NAME", help="one of the benchmarks below")
    b.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    b.set_defaults(func=_bench)

    # Sub-command trees that live beside the code they drive.
    for name in (
        "cold_ray.adapters.cli",
        "cold_ray.eval.cli",
        "cold_ray.serve.cli",
        "cold_ray.benchmarks.serving.loadtest.cli",
    ):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
