"""Engine throughput and memory: CoLD vs plain greedy vs the baselines users would pick.

    cold-ray bench engine --json [--batches 1,4,8,16] [--plot engine.png]

Every (mode, batch) runs in its own child process, so each record's `peak_rss_bytes` is that
run's own peak. Modes run in alternating order over `--rounds` so that ratios are measured
side by side on the same (noisy) machine. Thread settings are fixed and reported.

Modes: cold (adapter, CoLD), greedy (adapter, plain LoRA greedy), base_greedy (no adapter),
naive_two_model_cold (transformers expert with the merged adapter + a separate transformers
base, each with its own KV cache, batched), hf_generate_greedy (transformers `generate`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("cold", "greedy", "base_greedy", "naive_two_model_cold", "hf_generate_greedy")
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1"}


def _prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """Distinct deterministic prompts of exactly `length` tokens."""
    text = " ".join(f"item {i} costs {i * 7 % 13} coins and weighs {i % 5} kg." for i in range(400))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [ids[b * 3 : b * 3 + length] for b in range(batch)]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_cold_ray(mode: str, batch: int, prompt_len: int, new_tokens: int, adapter: str) -> dict:
    import torch

    from cold_ray.config import EngineConfig
    from cold_ray.engine import ColdParams, EngineCore, SamplingParams

    rows = 2 * batch if mode == "cold" else batch
    core = EngineCore(
        EngineConfig(max_rows=max(rows, 2), max_model_len=prompt_len + new_tokens + 1, max_loras=1)
    )
    name = None if mode == "base_greedy" else "adapter"
    if name:
        core.register_adapter(name, adapter)
        core.load_adapter(name)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    cold = ColdParams(0.1, 0.5) if mode == "cold" else None
    prompts = _prompts(core.tokenizer, batch, prompt_len)
    core.generate(
        prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), name, cold
    )  # warm
    reqs = [core.make_request(p, params, name, cold) for p in prompts]
    start = time.perf_counter()
    for r in reqs:
        core.add(r)
    step_times = []
    with torch.inference_mode():
        core.step()  # prefills + first decode
        prefill_s = time.perf_counter() - start
        while core.has_work():
            t0 = time.perf_counter()
            core.step()
            step_times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "prefill_s": prefill_s,
        "step_ms": statistics.median(step_times) * 1e3,
        "lora_backend": core.backend.name,
    }


def run_transformers(mode: str, batch: int, prompt_len: int, new_tokens: int, adapter: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cold_ray.kernels import reference
    from cold_ray.model.loader import default_model_path

    torch.set_num_threads(1)
    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor(_prompts(tok, batch, prompt_len))
    if mode == "hf_generate_greedy":
        base.generate(x[:1, :8], max_new_tokens=4, do_sample=False)  # warm
        start = time.perf_counter()
        base.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=tok.eos_token_id)  # fmt: skip
        wall = time.perf_counter() - start
        return {"wall_s": wall, "step_ms": wall / new_tokens * 1e3}
    from peft import PeftModel

    expert_base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expert = PeftModel.from_pretrained(expert_base, adapter).merge_and_unload().eval()
    alpha, beta = torch.full((batch,), 0.1), torch.full((batch,), 0.5)
    start = time.perf_counter()
    step_times = []
    with torch.inference_mode():
        oe, oa = expert(x, use_cache=True), base(x, use_cache=True)
        for i in range(new_tokens):
            nxt = reference.contrastive_greedy(oe.logits[:, -1], oa.logits[:, -1], alpha, beta)
            if i == new_tokens - 1:
                break
            t0 = time.perf_counter()
            ids = nxt.unsqueeze(1)
            oe = expert(ids, past_key_values=oe.past_key_values, use_cache=True)
            oa = base(ids, past_key_values=oa.past_key_values, use_cache=True)
            step_times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "step_ms": statistics.median(step_times) * 1e3}


def measure_bandwidth_floor() -> dict:
    """Weight bytes of the default model ÷ measured memory read bandwidth."""
    import torch

    from cold_ray.model.loader import default_model_path

    torch.set_num_threads(1)
    buf = torch.ones(256 * 1024 * 1024 // 4)  # 256 MiB, far larger than the caches
    best = min(_timed(lambda: buf.sum()) for _ in range(5))
    bandwidth = buf.numel() * 4 / best
    weight_bytes = (default_model_path() / "model.safetensors").stat().st_size
    return {"bandwidth_gib_s": bandwidth / 2**30, "weight_bytes": weight_bytes,
            "floor_step_ms": weight_bytes / bandwidth * 1e3}  # fmt: skip


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    runner = run_cold_ray if args.mode in ("cold", "greedy", "base_greedy") else run_transformers
    rec = runner(args.mode, args.batch, args.prompt_len, args.new_tokens, args.adapter)
    rec.update(mode=args.mode, batch=args.batch, peak_rss_bytes=_peak_rss(),
               tokens_per_s=args.batch * args.new_tokens / rec["wall_s"])  # fmt: skip
    print(json.dumps(rec))


def default_adapter(tmp: str) -> str:
    """The demo adapter if present, else a random rank-16 all-linear PEFT adapter."""
    demo = Path(__file__).resolve().parents[1] / "deployments" / "adapters" / "arith-demo"
    if (demo / "adapter_config.json").exists():
        return str(demo)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cold_ray.model.loader import default_model_path

    base = AutoModelForCausalLM.from_pretrained(str(default_model_path()), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(tmp)
    return tmp


def summarize(records: list[dict]) -> list[dict]:
    """Median over rounds per (mode, batch), plus side-by-side ratios per round."""
    out = []
    keys = sorted({(r["mode"], r["batch"]) for r in records}, key=lambda k: (k[1], k[0]))
    for mode, batch in keys:
        rs = [r for r in records if (r["mode"], r["batch"]) == (mode, batch)]
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("tokens_per_s", "step_ms", "peak_rss_bytes", "wall_s")}  # fmt: skip
        out.append({"mode": mode, "batch": batch, "rounds": len(rs), **med,
                    **({"lora_backend": rs[0]["lora_backend"]} if "lora_backend" in rs[0] else {})})  # fmt: skip
    return out


def ratios(summary: list[dict]) -> list[dict]:
    by = {(r["mode"], r["batch"]): r for r in summary}
    out = []
    for batch in sorted({r["batch"] for r in summary}):
        get = lambda m, b=batch: by.get((m, b))
        row = {"batch": batch}
        if get("cold") and get("greedy"):
            row["cold_step_over_greedy"] = get("cold")["step_ms"] / get("greedy")["step_ms"]
        if get("cold") and get("naive_two_model_cold"):
            naive = get("naive_two_model_cold")
            row["cold_speedup_over_naive"] = get("cold")["tokens_per_s"] / naive["tokens_per_s"]
            row["cold_rss_over_naive"] = get("cold")["peak_rss_bytes"] / naive["peak_rss_bytes"]
        if get("base_greedy") and get("hf_generate_greedy"):
            hf = get("hf_generate_greedy")
            row["greedy_speedup_over_hf"] = get("base_greedy")["tokens_per_s"] / hf["tokens_per_s"]
        out.append(row)
    return out


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in summary if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens / s")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cold-ray bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--adapter", help="PEFT adapter (default: demo adapter, else random r16)")
    p.add_argument("--json", action="store_true", help="print the records as one JSON list")
    p.add_argument("--plot", help="write a PNG of tokens/s vs batch")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    batches = [int(b) for b in args.batches.split(",")]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or default_adapter(tmp)
        env = {**os.environ, **THREAD_ENV}
        for rnd in range(args.rounds):
            for batch in batches:
                order = modes if rnd % 2 == 0 else modes[::-1]
                for mode in order:
                    cmd = [sys.executable, "-m", "cold_ray.benchmarks.engine", "--child",
                           "--mode", mode, "--batch", str(batch), "--adapter", adapter,
                           "--prompt-len", str(args.prompt_len),
                           "--new-tokens", str(args.new_tokens)]  # fmt: skip
                    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if res.returncode != 0:
                        print(res.stderr[-2000:], file=sys.stderr)
                        return 1
                    rec = json.loads(res.stdout.strip().splitlines()[-1])
                    rec["round"] = rnd
                    records.append(rec)
                    print(f"# {mode} B={batch}: {rec['tokens_per_s']:.1f} tok/s, "
                          f"{rec['step_ms']:.1f} ms/step", file=sys.stderr)  # fmt: skip
    summary = summarize(records)
    floor = measure_bandwidth_floor()
    b1 = next((r for r in summary if r["mode"] == "base_greedy" and r["batch"] == 1), None)
    if b1:
        floor["base_greedy_b1_step_ms"] = b1["step_ms"]
        floor["fraction_of_floor_speed"] = floor["floor_step_ms"] / b1["step_ms"]
    result = summary + [{"mode": "ratios", "rows": ratios(summary)},
                        {"mode": "bandwidth_floor", **floor},
                        {"mode": "settings", "threads": THREAD_ENV,
                         "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                         "adapter": adapter}]  # fmt: skip
    if args.plot:
        plot(summary, args.plot)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
