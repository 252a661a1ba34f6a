"""One-command check of an accelerator: kernels, CoLD in low precision, step times, GB/s.

    cold-ray bench device [--device cuda|npu|cpu] [--json] [--quick]

Runs in a few minutes on one GPU/NPU with the default model and the demo adapter:
1. kernels — the device's LoRA backend (Triton on CUDA, triton-ascend/vllm-ascend on Ascend)
   against the fp32 reference for fp16/bf16/fp32 at decode and prefill sizes, with -1 rows
   bit-identical, timed, in GB/s of operand traffic; the CoLD step (restricted amateur head)
   gives exactly the reference's tokens;
2. attention — decode attention (additive mask, grouped queries as rows) reaches a fused SDPA
   kernel (flash or memory-efficient), not the math fallback;
3. CoLD in bf16 — teacher-forced logits of the engine in bf16 vs the same engine in fp32
   (max |diff| and top-1 agreement, with the tolerances below), and greedy CoLD tokens;
4. graphs — engines with and without captured decode steps (CUDA graphs / ACLGraph) decode a
   batch of plain, LoRA and CoLD requests to the same tokens (fp32: exactly);
5. steps — median decode step at 1/8/32 requests (base greedy and CoLD) and the batch-1
   step's weight-read rate in GB/s; on an accelerator once with graphs and once eagerly.
Exits 1 if a check fails; a section that raises is reported failed and the others still run.
On a CPU the same checks run (Triton only under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from cold_ray import device as devices
from cold_ray.benchmarks.common import machine_record

# (atol, rtol) of LoRA outputs vs the fp32 reference, per dtype (as in the kernel tests)
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (4e-3, 2e-3), "bfloat16": (3e-2, 1.5e-2)}
BF16_MAX_LOGIT_DIFF = 0.5  # bf16 engine vs fp32 engine, teacher-forced, SmolLM2 (|logit| ~ 20)
BF16_MIN_TOP1_AGREEMENT = 0.95


def _time(fn, device, repeats: int = 20) -> float:
    fn()
    devices.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    devices.synchronize(device)
    return (time.perf_counter() - t0) / repeats


def check_kernels(device, quick: bool) -> dict:
    import torch

    from cold_ray.kernels import reference, select_backend
    from cold_ray.kernels.contrastive import restricted_torch

    backend = select_backend("auto", device)
    dtypes = ["float32"] if device.type == "cpu" else ["float16", "bfloat16", "float32"]
    out = {"backend": backend.name, "cases": [], "ok": True}
    g = torch.Generator().manual_seed(0)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for rows in (1, 16) if quick else (1, 16, 64, 512):
            d_in, d_out, rank, slots = 576, 1536, 16, 4
            idx = torch.randint(-1, slots, (rows,), generator=g)
            x = torch.randn(rows, d_in, generator=g)
            a = torch.randn(slots, rank, d_in, generator=g) / d_in**0.5
            b = torch.randn(slots, d_out, rank, generator=g) / rank**0.5
            scale = torch.rand(slots, generator=g) + 0.5
            y = torch.randn(rows, d_out, generator=g)
            want = y.clone()
            reference.lora_delta(x, a, b, scale, idx, want)
            dev = [t.to(device, dtype) for t in (x, a, b)]
            got = y.to(device, dtype)
            batch = backend.prepare(idx.to(device))
            backend.lora_delta(*dev, scale.to(device), batch, got)
            atol, rtol = TOLERANCES[dtype_name]
            diff = (got.float().cpu() - want).abs()
            ok = bool((diff <= atol + rtol * want.abs()).all())
            base_rows = idx < 0
            ok &= torch.equal(got.cpu()[base_rows], y.to(dtype)[base_rows])
            args = (*dev, scale.to(device), batch, got.clone())
            seconds = _time(lambda args=args: backend.lora_delta(*args), device)
            nbytes = (x.numel() + a.numel() + b.numel() + 2 * y.numel()) * dev[0].element_size()
            out["cases"].append(
                {
                    "dtype": dtype_name,
                    "rows": rows,
                    "ok": ok,
                    "max_abs_diff": float(diff.max()),
                    "us": seconds * 1e6,
                    "gb_s": nbytes / seconds / 1e9,
                }
            )
            out["ok"] &= ok
    # the CoLD step: the backend's restricted head picks exactly the reference's tokens
    vocab, hidden, rows = 49152, 576, 32
    expert = torch.randn(rows, vocab, generator=g)
    expert.scatter_add_(
        1, torch.randint(0, vocab, (rows, 8), generator=g), torch.full((rows, 8), 9.0)
    )
    h = torch.randn(rows, hidden, generator=g)
    head = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    alpha, beta = torch.full((rows,), 0.1), torch.full((rows,), 0.5)
    want = reference.contrastive_greedy(expert, h @ head.T, alpha, beta)
    step = backend.contrastive_restricted(*(t.to(device) for t in (expert, h, head, alpha, beta)))
    same = torch.equal(step.tokens.cpu(), want)
    same &= torch.equal(restricted_torch(expert, h, head, alpha, beta).tokens, want)
    out["cold_step_tokens_equal"] = bool(same)
    out["ok"] &= bool(same)
    return out


def check_attention(device) -> dict:
    """Decode attention's shapes and mask, restricted to fused SDPA kernels."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return {"skipped": f"fused-kernel dispatch is checked on CUDA only ({device.type})"}
    rows, kv_heads, groups, head_dim, span = 32, 3, 3, 64, 300
    q = torch.randn(rows, kv_heads, groups, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(rows, kv_heads, span, head_dim, device=device, dtype=torch.bfloat16)
    mask = torch.zeros(rows, 1, 1, span, device=device, dtype=torch.bfloat16)
    mask[:, :, :, 200:] = float("-inf")
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
        return {"fused": True, "ok": True}
    except RuntimeError as e:
        return {"fused": False, "ok": False, "why": str(e)[:300]}


def _core(device, model: str | None, dtype: str, max_rows: int, **overrides):
    from cold_ray.config import EngineConfig
    from cold_ray.engine import EngineCore

    threads = 1 if device.type == "cpu" else None  # one CPU thread: no OpenMP spin-waiting
    core = EngineCore(
        EngineConfig(
            model=model,
            device=str(device),
            dtype=dtype,
            max_rows=max_rows,
            max_model_len=512,
            num_threads=threads,
            **overrides,
        )
    )
    core.register_adapter("demo", "deployments/adapters/arith-demo")
    return core


def check_bf16_cold(device, model: str | None, quick: bool) -> dict:
    import torch

    from cold_ray.engine import ColdParams, SamplingParams

    if device.type == "cpu":
        return {
            "skipped": "on CPU bf16 is checked by `cold-ray bench precision` (exact vs bf16 two-model CoLD)"
        }
    ref, low = _core(device, model, "float32", 8), _core(device, model, "bfloat16", 8)
    prompts = [
        "Question: Ann has 3 boxes of 4 pens. How many pens?\nAnswer:",
        "Question: A train goes 60 km in 1 hour. How far in 3 hours?\nAnswer:",
    ]
    diffs, agree, total = [], 0, 0
    for p in prompts[: 1 if quick else 2]:
        ids = ref.tokenizer.encode(p)
        a, b = ref.prompt_logits(ids, "demo").float(), low.prompt_logits(ids, "demo").float()
        diffs.append(float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    tokens = [c.generate(prompts, params, "demo", ColdParams())[0]["token_ids"] for c in (ref, low)]
    match = next((i for i, (x, y) in enumerate(zip(*tokens)) if x != y), len(tokens[0]))
    top1 = agree / total
    ok = max(diffs) <= BF16_MAX_LOGIT_DIFF and top1 >= BF16_MIN_TOP1_AGREEMENT
    del torch
    return {
        "max_logit_diff": max(diffs),
        "top1_agreement": top1,
        "ok": ok,
        "cold_tokens_equal_prefix": match,
        "cold_tokens": len(tokens[0]),
        "tolerance": {
            "max_logit_diff": BF16_MAX_LOGIT_DIFF,
            "top1_agreement": BF16_MIN_TOP1_AGREEMENT,
        },
    }


def _mixed_tokens(core) -> list[list[int]]:
    """Greedy tokens of plain, LoRA and CoLD requests decoded together in one batch."""
    from cold_ray.engine import ColdParams, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = [f"Question: {a} + {b} = ?\nAnswer:" for a, b in ((3, 4), (12, 9), (7, 30))]
    reqs = [
        core.make_request(p, params, adapter, cold)
        for p in prompts
        for adapter, cold in ((None, None), ("demo", None), ("demo", ColdParams()))
    ]
    for r in reqs:
        core.add(r)
    while core.has_work():
        core.step()
    return [list(r.output_ids) for r in reqs]


def check_graphs(device, model: str | None) -> dict:
    """Engines with and without captured decode steps decode the same tokens: exactly in
    fp32; in bf16 the padded batch may take other GEMM kernels, so agreement is reported."""
    if devices.graph_api(device) is None:
        return {"skipped": f"no graph capture on {device.type}"}
    out = {"ok": True}
    for dtype in ("float32", "bfloat16"):
        graphed = _core(device, model, dtype, 16)
        if graphed.graphs is None:
            return {"ok": False, "why": f"no graphs captured ({graphed.backend.name} backend)"}
        eager = _core(device, model, dtype, 16, graph_capture=False)
        got, want = _mixed_tokens(graphed), _mixed_tokens(eager)
        same = [g == w for g, w in zip(got, want)]
        prefix = [
            next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(g))
            for g, w in zip(got, want)
        ]
        out[dtype] = {
            "graphs": len(graphed.graphs.graphs),
            "capture_s": graphed.graphs.capture_seconds,
            "requests_equal": sum(same),
            "requests": len(same),
            "min_equal_prefix": min(prefix),
        }
        if dtype == "float32":
            out["ok"] &= all(same)
        del graphed, eager
    return out


def measure_steps(device, model: str | None, quick: bool, graph_capture: bool = True) -> dict:
    from cold_ray.engine import ColdParams, SamplingParams

    dtype = "float32" if device.type == "cpu" else "bfloat16"
    out = {"dtype": dtype, "steps": []}
    batches = (1, 8) if quick else (1, 8, 32)
    core = _core(device, model, dtype, 2 * max(batches), graph_capture=graph_capture)
    out["graphs"] = len(core.runner.graphs.graphs) if core.runner.graphs is not None else 0
    core.load_adapter("demo")
    weight_bytes = core.model.step_weight_bytes()
    prompt = core.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)
    for batch in batches:
        for mode, cold in (("base_greedy", None), ("cold", ColdParams())):
            adapter = "demo" if cold else None
            params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
            for _ in range(batch):
                core.add(core.make_request(prompt, params, adapter, cold))
            while any(not r.prefilled for r in core.running) or core.waiting:
                core.step()
            times = []
            while core.has_work():
                t0 = time.perf_counter()
                core.step()
                devices.synchronize(device)
                times.append(time.perf_counter() - t0)
            step = statistics.median(times)
            rec = {"mode": mode, "batch": batch, "step_ms": step * 1e3}
            if batch == 1 and mode == "base_greedy":
                rec["weight_gb_s"] = weight_bytes / step / 1e9
            out["steps"].append(rec)
    return out


def _section(fn, *args) -> dict:
    """A section's result; an exception fails the section, not the whole check."""
    try:
        return fn(*args)
    except Exception as e:  # report every section's outcome in one run
        import traceback

        return {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-3000:],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cold-ray bench device",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", help="cuda, npu or cpu (default: the accelerator present)")
    p.add_argument("--quick", action="store_true", help="fewer sizes (a smoke check)")
    p.add_argument(
        "--model",
        help="model folder or .gguf file (default: SmolLM2-135M-Instruct; "
        "the demo adapter fits only SmolLM2)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = devices.resolve(name)
    if device.type == "cpu":
        torch.set_num_threads(1)
    result = {"device": str(device), "torch": torch.__version__, "machine": machine_record()}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    result["kernels"] = _section(check_kernels, device, args.quick)
    result["attention"] = _section(check_attention, device)
    result["bf16_cold"] = _section(check_bf16_cold, device, args.model, args.quick)
    result["graphs"] = _section(check_graphs, device, args.model)
    result["steps"] = _section(measure_steps, device, args.model, args.quick)
    if devices.graph_api(device) is not None:
        result["eager_steps"] = _section(measure_steps, device, args.model, args.quick, False)
        result["graph_speedup"] = _speedups(result["steps"], result["eager_steps"])
    ok = all(section.get("ok", True) for section in result.values() if isinstance(section, dict))
    result["ok"] = ok
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0 if ok else 1


def _speedups(graphed: dict, eager: dict) -> dict:
    """Eager step time ÷ graphed step time, per mode and batch."""
    if "steps" not in graphed or "steps" not in eager:
        return {"skipped": "a step measurement failed"}
    times = {(s["mode"], s["batch"]): s["step_ms"] for s in eager["steps"]}
    return {
        f"{s['mode']}@{s['batch']}": round(times[(s["mode"], s["batch"])] / s["step_ms"], 2)
        for s in graphed["steps"]
    }


def _table(r: dict) -> str:
    lines = [f"device {r['device']} (torch {r['torch']}) — {'OK' if r['ok'] else 'FAILED'}"]
    for name, section in r.items():
        if isinstance(section, dict) and "error" in section:
            lines.append(f"{name}: FAILED {section['error']}")
    k = r["kernels"]
    if "cases" in k:
        lines.append(
            f"kernels [{k['backend']}]: CoLD step tokens equal: {k['cold_step_tokens_equal']}"
        )
        for c in k["cases"]:
            lines.append(
                f"  {c['dtype']:>8} rows {c['rows']:4d}  {'ok ' if c['ok'] else 'BAD'} "
                f"max|diff| {c['max_abs_diff']:.2e}  {c['us']:8.1f} us  "
                f"{c['gb_s']:6.1f} GB/s"
            )
    for name in ("attention", "bf16_cold", "graphs", "graph_speedup"):
        if name in r and "error" not in r[name]:
            lines.append(f"{name}: {r[name]}")
    for name in ("steps", "eager_steps"):
        for s in r.get(name, {}).get("steps", []):
            extra = f"  {s['weight_gb_s']:.1f} GB/s of weights" if "weight_gb_s" in s else ""
            lines.append(
                f"  {name} {s['mode']:>11} @{s['batch']:3d}: {s['step_ms']:7.2f} ms{extra}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
