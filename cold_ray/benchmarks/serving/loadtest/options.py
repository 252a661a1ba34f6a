"""The workload options, declared once for `cold-ray loadtest` / `soak` and for the Locust
users themselves (which read them from Locust's own parser). No torch or ray here: the
locustfile imports this module after gevent has patched the standard library."""

from __future__ import annotations

import argparse

from cold_ray.benchmarks.serving.loadtest.stats import PROMPT_MODES
from cold_ray.benchmarks.workloads import MIX_KINDS


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from e
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_workload_args(parser, locust: bool = False) -> None:
    """The workload a simulated user sends. `locust`: also the options only the Locust users
    take (`cold-ray loadtest` sets the records file itself and paces users closed-loop)."""
    g = parser.add_argument_group("cold-ray workload")
    g.add_argument(
        "--mix",
        choices=MIX_KINDS,
        default="zipf",
        help="adapter mix from cold_ray.benchmarks.workloads: identical = one hot adapter",
    )
    g.add_argument(
        "--adapters",
        default="",
        help="comma-separated adapter names (default: every adapter in /v1/models)",
    )
    g.add_argument(
        "--cold-fraction",
        type=float,
        default=0.5,
        help="share of adapter requests decoded with CoLD (the rest plain)",
    )
    g.add_argument("--alpha", type=float, default=0.1)
    g.add_argument("--beta", type=float, default=0.5)
    g.add_argument("--chat-fraction", type=float, default=0.5)
    g.add_argument("--stream-fraction", type=float, default=0.5)
    g.add_argument(
        "--prompt-tokens",
        default="uniform:48:160",
        help="prompt length distribution (--prompt-mode random only)",
    )
    g.add_argument(
        "--prompt-mode",
        choices=PROMPT_MODES,
        default="random",
        help="random: prompts of --prompt-tokens; fewshot: one shared few-shot prefix + a "
        "different question; system: chat with one shared system prompt (the prefix cache's "
        "workloads)",
    )
    g.add_argument(
        "--shots", type=non_negative, default=8, help="worked examples in the fewshot prefix"
    )
    g.add_argument("--max-tokens", default="fixed:64")
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos (vLLM extension) so every request generates max_tokens",
    )
    g.add_argument("--think-time", type=float, default=0.0, help="seconds between requests")
    g.add_argument("--request-timeout", type=float, default=600.0)
    g.add_argument("--workload-seed", type=int, default=0)
    if locust:
        g.add_argument(
            "--rps-per-user",
            type=float,
            default=0.0,
            help="open-loop pacing: each user starts this many requests/s at most",
        )
        g.add_argument("--records", default="", help="append one JSON line per finished request")
