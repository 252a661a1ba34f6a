"""The model's GEMMs on this CPU: plain BLAS vs oneDNN's pre-packed weights vs the panel kernel.

    cold-ray bench gemm --json [--rows 1,4,16,64] [--threads 1] [--row-blocks 2,3,4,8]

Every run streams the weights of all layers of the default model's shapes (the weights do
not fit in the caches, as in a real step), so the figures are what a decode step gets, not
what one hot matrix gets. Reports GFLOP/s per row count for `F.linear`, `W @ x.T`, the
packed layout the engine uses on CPU (`cold_ray.model.lora.pack_weight`), up to `SMALL_ROWS`
rows the small-batch product on the row-major weight (`cold_ray.model.lora.linear`: one row is
padded to two), which 1–2-row steps use without the C kernels, and the panel GEMM kernel over
panel-laid weights in huge-page memory (`cold_ray.kernels.cpu_gemm`), which every step uses
with them, at the register block of rows chosen from this CPU (`panels`) and at each block in
`--row-blocks` (`panels_rb<n>`). The LM head ([vocab, hidden], tied to the embedding) is timed
apart (`head_*`): the kernel's row-major product over the embedding itself (`head_rows`, what
the engine runs: no second copy), panels of it (`head_panels`) and oneDNN's packed copy
(`head_packed`). Torch and the kernel both get `--threads` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cold_ray.benchmarks.common import best_seconds, machine_record, positive_ints, require_positive

SMOLLM2 = {
    "hidden": 576,
    "intermediate": 1536,
    "heads": 9,
    "kv_heads": 3,
    "head_dim": 64,
    "layers": 30,
    "vocab": 49152,
}


def layer_shapes(m: dict) -> list[tuple[int, int]]:
    """(out, in) of the fused projections of one layer: qkv, o, gate_up, down."""
    q, kv = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    h, i = m["hidden"], m["intermediate"]
    return [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]


def measure(
    rows: list[int],
    repeats: int = 3,
    model: dict = SMOLLM2,
    threads: int = 1,
    row_blocks: list[int] = (),
) -> list[dict]:
    import torch

    from cold_ray.kernels import cpu_gemm
    from cold_ray.model.lora import SMALL_ROWS, linear, pack_weight, packed_linear

    shapes = layer_shapes(model) * model["layers"]
    weights = [torch.randn(o, i) for o, i in shapes]
    packed = [pack_weight(w) for w in weights]
    kernel = cpu_gemm.load()
    kernels = {}
    if kernel is not None:
        kernels["panels"] = kernel.with_threads(threads)
        kernels.update(
            (f"panels_rb{b}", kernels["panels"].with_blocking(row_block=b)) for b in row_blocks
        )
    panels = cpu_gemm.to_panels(weights) if kernel else []
    out = []
    for m in rows:
        xs = {i: torch.randn(m, i) for _, i in shapes}
        flops = sum(2 * m * o * i for o, i in shapes)
        ways = {
            "linear": lambda xs=xs: [
                torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights
            ],
            "w_xt": lambda xs=xs: [torch.mm(w, xs[w.shape[1]].t()) for w in weights],
        }
        if m <= SMALL_ROWS:
            ways["small_batch"] = lambda xs=xs: [linear(xs[w.shape[1]], w) for w in weights]
        if panels and all(p is not None for p in panels):
            for name, k in kernels.items():
                ways[name] = lambda xs=xs, k=k: [k(xs[p.shape[1]], p) for p in panels]
        if all(p is not None for p in packed):
            ways["packed"] = lambda xs=xs: [
                packed_linear(xs[w.shape[1]], p, None) for w, p in zip(weights, packed)
            ]
        rec = {"rows": m}
        for name, fn in ways.items():
            rec[f"{name}_gflops"] = flops / best_seconds(fn, repeats) / 1e9
        if "vocab" in model:
            rec.update(_head(m, model, repeats, kernels.get("panels"), pack_weight, packed_linear))
        out.append(rec)
    return out


def _head(rows: int, model: dict, repeats: int, kernel, pack_weight, packed_linear) -> dict:
    """GFLOP/s of the LM head's product each way, over a fresh [vocab, hidden] weight."""
    import torch

    from cold_ray.kernels import cpu_gemm

    weight, x = torch.randn(model["vocab"], model["hidden"]), torch.randn(rows, model["hidden"])
    flops = 2 * rows * weight.numel()
    ways = {"head_linear": lambda: torch.nn.functional.linear(x, weight)}
    packed = pack_weight(weight)
    if packed is not None:
        ways["head_packed"] = lambda: packed_linear(x, packed, None)
    if kernel is not None:
        panels = cpu_gemm.to_panels([weight])[0]
        ways["head_rows"] = lambda: kernel.by_rows(x, weight)
        ways["head_panels"] = lambda: kernel(x, panels)
    return {f"{name}_gflops": flops / best_seconds(fn, repeats) / 1e9 for name, fn in ways.items()}


def peak_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of this thread count: a square product that fits the caches."""
    import torch

    from cold_ray.model.lora import pack_weight, packed_linear

    a, w = torch.randn(size, size), torch.randn(size, size)
    p = pack_weight(w)
    rates = [2 * size**3 / best_seconds(lambda: torch.mm(a, w), repeats) / 1e9]
    if p is not None:
        rates.append(2 * size**3 / best_seconds(lambda: packed_linear(a, p, None), repeats) / 1e9)
    return max(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cold-ray bench gemm", description=__doc__)
    p.add_argument("--rows", type=positive_ints, default=[1, 2, 4, 8, 16, 32, 64, 256])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--row-blocks",
        type=positive_ints,
        default=[],
        help="also time the panel kernel at these register blocks of rows (1-8)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if any(b > 8 for b in args.row_blocks):
        p.error(f"--row-blocks must lie in [1, 8], got {args.row_blocks}")
    require_positive(p, args, "threads", "repeats")
    import torch

    from cold_ray.kernels import cpu_kernels

    torch.set_num_threads(args.threads)
    result = {
        "threads": args.threads,
        "peak_gflops": peak_gflops(),
        "shapes": "SmolLM2-135M",
        "results": measure(
            args.rows, args.repeats, threads=args.threads, row_blocks=args.row_blocks
        ),
        "blocking": cpu_kernels.blocking().record(),
        "load_average": os.getloadavg(),
        "machine": machine_record(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"peak {result['peak_gflops']:.1f} GFLOP/s ({args.threads} thread(s))")
        for r in result["results"]:
            print(
                "  ".join(
                    [f"rows {r['rows']:4d}"]
                    + [f"{k[:-7]} {v:6.1f}" for k, v in r.items() if k.endswith("_gflops")]
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
