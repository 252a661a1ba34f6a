"""Decode attention on CPU: torch SDPA over the cache view (what the engine falls back to) vs
the compiled kernel (`cold_ray/kernels/cpu_attention.py`), both on one thread.

    cold-ray bench attention --json [--rows 1,8,16,32] [--context 128,512]

Each measurement runs every layer of the default model's shapes over a KV cache laid out as
the engine's ([layers, slots, kv_heads, max_len, head_dim]), so the cache does not sit in the
CPU caches between layers, as in a real step. Rows have ragged lengths (context − 15 ..
context); SDPA gets the engine's additive mask over the longest row. Reports ms per step, the
GB/s of K/V each reads, and kernel ÷ SDPA time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cold_ray.benchmarks.common import best_seconds, machine_record, positive_ints
from cold_ray.benchmarks.micro.gemm import SMOLLM2


def measure(rows: int, context: int, repeats: int = 5, model: dict = SMOLLM2) -> dict:
    import torch
    from torch.nn import functional as F

    from cold_ray.kernels import cpu_attention

    layers, heads, kvh, dim = (model[k] for k in ("layers", "heads", "kv_heads", "head_dim"))
    gen = torch.Generator().manual_seed(rows * 7919 + context)
    shape = (layers, rows, kvh, context + 1, dim)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = torch.randn(rows, heads, dim, generator=gen)
    positions = torch.randint(max(context - 15, 0), context + 1, (rows,), generator=gen)
    slots = torch.arange(rows)
    span = int(positions.max()) + 1
    mask = torch.zeros(rows, 1, 1, span).masked_fill_(
        torch.arange(span) > positions.view(-1, 1, 1, 1), float("-inf")
    )
    groups = heads // kvh

    def sdpa():
        for i in range(layers):
            F.scaled_dot_product_attention(
                q.view(rows, kvh, groups, dim), k[i, :, :, :span], v[i, :, :, :span], attn_mask=mask
            )

    kv_bytes = 2 * layers * kvh * dim * 4 * int((positions + 1).sum())
    rec = {"rows": rows, "context": context, "sdpa_ms": 1e3 * best_seconds(sdpa, repeats)}
    rec["sdpa_gb_s"] = kv_bytes / rec["sdpa_ms"] / 1e6
    kernel = cpu_attention.load()
    if kernel is not None:
        rec["kernel_ms"] = 1e3 * best_seconds(
            lambda: [kernel(q, k[i], v[i], slots, positions) for i in range(layers)], repeats
        )
        rec["kernel_gb_s"] = kv_bytes / rec["kernel_ms"] / 1e6
        rec["kernel_over_sdpa"] = rec["kernel_ms"] / rec["sdpa_ms"]
    return rec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cold-ray bench attention", description=__doc__)
    p.add_argument("--rows", type=positive_ints, default=[1, 8, 16, 32])
    p.add_argument("--context", type=positive_ints, default=[128, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from cold_ray.kernels import cpu_attention

    torch.set_num_threads(1)
    result = {
        "threads": 1,
        "shapes": "SmolLM2-135M",
        "kernel": cpu_attention.load() is not None,
        "results": [measure(r, c, args.repeats) for c in args.context for r in args.rows],
        "load_average": os.getloadavg(),
        "machine": machine_record(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if not result["kernel"]:
        print("kernel unavailable (no C compiler?): SDPA only")
    for r in result["results"]:
        line = (
            f"rows {r['rows']:3d} context {r['context']:5d}  SDPA {r['sdpa_ms']:7.2f} ms "
            f"({r['sdpa_gb_s']:5.1f} GB/s)"
        )
        if "kernel_ms" in r:
            line += (
                f"  kernel {r['kernel_ms']:7.2f} ms ({r['kernel_gb_s']:5.1f} GB/s)  "
                f"{r['kernel_over_sdpa']:.2f}x the time"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
