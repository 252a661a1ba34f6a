"""What the machine can do, measured in the same run as the engine: the fp32 GEMM peak on one
thread, the memory-read bandwidth (on 4 KiB and on huge pages), and the arithmetic a decode
step has to do.

    cold-ray bench roofline --json

`measure_gemm_peak` times large GEMMs and the default model's own prefill-sized shapes, both
through oneDNN's packed weights (`torch.ops.mkldnn._reorder_linear_weight` +
`_linear_pointwise`, what the engine uses) and plain `torch.mm`, best of several repeats; the
peak is the best of all of them. `decode_step_flops` counts 2 × parameters touched × rows:
every row runs every base linear; adapter rows also run their LoRA slot (the padded A and B
the kernels read); each row that needs logits runs the full LM head, while a CoLD amateur row
runs the head only at the expert's K candidate tokens (or the full head when rows × K ≥ V, as
`restricted_torch` does). Attention is reported apart: it reads the KV cache, not parameters.
"""

from __future__ import annotations

import argparse
import json
import sys

from cold_ray.benchmarks.common import best_seconds, machine_record

# (rows, in, out): square GEMMs big enough to leave the caches, and SmolLM2's prefill shapes
GEMM_SHAPES = (
    (1024, 1024, 1024),
    (512, 2048, 2048),
    (256, 576, 1536),
    (256, 576, 3072),
    (256, 1536, 576),
)


def _packed(x, packed):
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def measure_gemm_peak(shapes=GEMM_SHAPES, repeats: int = 5) -> dict:
    """Best fp32 GFLOP/s on one thread over `shapes`, packed oneDNN and plain `torch.mm`."""
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    per_shape = []
    for rows, k, n in shapes:
        x = torch.randn(rows, k, generator=gen)
        w = torch.randn(n, k, generator=gen)
        flops = 2 * rows * k * n
        rec = {"shape": [rows, k, n]}
        wt = w.t().contiguous()
        rec["mm_gflop_s"] = round(flops / best_seconds(torch.mm, repeats, x, wt) / 1e9, 2)
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
            rec["packed_gflop_s"] = round(
                flops / best_seconds(_packed, repeats, x, packed) / 1e9, 2
            )
        except (RuntimeError, AttributeError):  # a torch without oneDNN's packed linear
            rec["packed_gflop_s"] = None
        per_shape.append(rec)
    peak = max(v for r in per_shape for v in (r["mm_gflop_s"], r["packed_gflop_s"]) if v)
    return {"peak_gflop_s": peak, "threads": 1, "repeats": repeats, "shapes": per_shape}


def measure_bandwidths(mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """Memory read bandwidth in bytes/s: best time to sum a buffer far larger than the caches,
    in plain torch memory (4 KiB pages) and in huge-page memory (where the engine keeps the
    weights of decode steps; one core reads 4 KiB pages markedly slower)."""
    import torch

    from cold_ray.kernels.cpu_gemm import huge_page_empty

    torch.set_num_threads(1)
    numel = mib * 2**20 // 4
    rates = {}
    for name, make in (("4k_pages", torch.empty), ("huge_pages", huge_page_empty)):
        buf = make(numel).fill_(1.0)  # one buffer at a time
        rates[name] = buf.numel() * 4 / best_seconds(torch.sum, repeats, buf)
        del buf
    return rates


def measure_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """The better of `measure_bandwidths`: the floor a decode step is held to."""
    return max(measure_bandwidths(mib, repeats).values())


def model_params(args, max_lora_rank: int) -> dict:
    """Parameter counts a decode row touches: base linears (all layers), the LM head, and one
    adapter slot's padded A and B over the four fused LoRA sites (all layers)."""
    from cold_ray.model.args import FUSED_SITES

    shapes = args.module_shapes()
    linear = sum(i * o for i, o in shapes.values()) * args.num_layers
    lora = 0
    for parts in FUSED_SITES.values():
        fan_in = shapes[parts[0]][0]
        fan_out = sum(shapes[p][1] for p in parts)
        rank = len(parts) * max_lora_rank
        lora += rank * (fan_in + fan_out)
    return {
        "linear": linear,
        "lm_head": args.vocab_size * args.hidden_size,
        "lora_slot": lora * args.num_layers,
        "hidden": args.hidden_size,
        "vocab": args.vocab_size,
    }


def decode_step_flops(
    params: dict, mode: str, batch: int, candidates: float | None = None
) -> float:
    """FLOPs of one pure-decode step of `batch` requests (2 × params touched × rows).

    mode: base_greedy (no adapter), greedy (adapter on every row) or cold (expert + amateur
    row per request; the amateur's head at `candidates` tokens per row — the padded K the
    restricted step computed, measured in the run).
    """
    if mode == "base_greedy":
        touched = batch * (params["linear"] + params["lm_head"])
    elif mode == "greedy":
        touched = batch * (params["linear"] + params["lora_slot"] + params["lm_head"])
    elif mode == "cold":
        if candidates is None:
            raise ValueError("a CoLD step's FLOPs need the amateur's candidate count")
        k = candidates if batch * candidates < params["vocab"] else params["vocab"]
        touched = (
            2 * batch * params["linear"]
            + batch * params["lora_slot"]
            + batch * params["lm_head"]
            + batch * k * params["hidden"]
        )
    else:
        raise ValueError(f"no FLOP count for mode {mode!r}")
    return 2.0 * touched


def attention_flops(args, rows: int, context: float) -> float:
    """QK^T and PV of one decode token per row over `context` cached positions, all layers."""
    return 4.0 * rows * args.num_layers * args.num_heads * args.head_dim * context


def weight_bytes(params: dict, lora: bool = False, dtype_bytes: int = 4) -> int:
    """Bytes a batch-1 decode step must read at least: every linear and the LM head (and one
    adapter slot with `lora`)."""
    return (params["linear"] + params["lm_head"] + lora * params["lora_slot"]) * dtype_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cold-ray bench roofline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    out = measure_gemm_peak(repeats=args.repeats)
    rates = measure_bandwidths(repeats=args.repeats)
    out["bandwidth_gib_s"] = round(max(rates.values()) / 2**30, 2)
    out["bandwidth_gib_s_by_pages"] = {k: round(v / 2**30, 2) for k, v in rates.items()}
    out["machine"] = machine_record()
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
