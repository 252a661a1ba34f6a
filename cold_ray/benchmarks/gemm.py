"""The decode step's GEMMs on this CPU: plain BLAS vs oneDNN's pre-packed weights.

    cold-ray bench gemm --json [--rows 1,4,16,64] [--threads 1]

Every run streams the weights of all layers of the default model's shapes (the weights do
not fit in the caches, as in a real step), so the figures are what a decode step gets, not
what one hot matrix gets. Reports GFLOP/s per row count for `F.linear`, `W @ x.T`, the
packed layout the engine uses on CPU (`cold_ray.model.lora.pack_weight`), up to `SMALL_ROWS`
rows the small-batch product on the row-major weight (`cold_ray.model.lora.linear`: one row is
padded to two), which 1–2-row steps use without the C kernels, and up to `PANEL_ROWS` rows the
small-GEMM kernel over panel-laid weights in huge-page memory (`cold_ray.kernels.cpu_gemm`),
which decode steps use with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cold_ray.benchmarks.common import best_seconds, machine_record, positive_ints

SMOLLM2 = {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64,
           "layers": 30}  # fmt: skip


def layer_shapes(m: dict) -> list[tuple[int, int]]:
    """(out, in) of the fused projections of one layer: qkv, o, gate_up, down."""
    q, kv = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    h, i = m["hidden"], m["intermediate"]
    return [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]


def measure(rows: list[int], repeats: int = 3, model: dict = SMOLLM2) -> list[dict]:
    import torch

    from cold_ray.kernels import cpu_gemm
    from cold_ray.model.lora import PANEL_ROWS, SMALL_ROWS, linear, pack_weight, packed_linear

    shapes = layer_shapes(model) * model["layers"]
    weights = [torch.randn(o, i) for o, i in shapes]
    packed = [pack_weight(w) for w in weights]
    kernel = cpu_gemm.load()
    panels = cpu_gemm.to_panels(weights) if kernel else []
    out = []
    for m in rows:
        xs = {i: torch.randn(m, i) for _, i in shapes}
        flops = sum(2 * m * o * i for o, i in shapes)
        ways = {
            "linear": lambda xs=xs: [torch.nn.functional.linear(xs[w.shape[1]], w)
                                     for w in weights],
            "w_xt": lambda xs=xs: [torch.mm(w, xs[w.shape[1]].t()) for w in weights],
        }  # fmt: skip
        if m <= SMALL_ROWS:
            ways["small_batch"] = lambda xs=xs: [linear(xs[w.shape[1]], w) for w in weights]
        if m <= PANEL_ROWS and panels and all(p is not None for p in panels):
            ways["panels"] = lambda xs=xs: [kernel(xs[p.shape[1]], p) for p in panels]
        if all(p is not None for p in packed):
            ways["packed"] = lambda xs=xs: [packed_linear(xs[w.shape[1]], p, None)
                                            for w, p in zip(weights, packed)]  # fmt: skip
        rec = {"rows": m}
        for name, fn in ways.items():
            rec[f"{name}_gflops"] = flops / best_seconds(fn, repeats) / 1e9
        out.append(rec)
    return out


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
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for name in ("threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    import torch

    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "peak_gflops": peak_gflops(), "shapes": "SmolLM2-135M",
              "results": measure(args.rows, args.repeats),
              "load_average": os.getloadavg(), "machine": machine_record()}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"peak {result['peak_gflops']:.1f} GFLOP/s ({args.threads} thread(s))")
        for r in result["results"]:
            print("  ".join([f"rows {r['rows']:4d}"] + [f"{k[:-7]} {v:6.1f}" for k, v in r.items()
                                                        if k.endswith("_gflops")]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
