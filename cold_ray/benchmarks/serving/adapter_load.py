"""Adapter load latency and decode throughput while adapters load.

    cold-ray bench serving --scenario adapter_load [--repeats 10] [--rows 8] [--out FILE]

Measures, on the default model (SmolLM2-135M) with rank-16 adapters on all seven linears
(random fp16 weights, the demo adapter's shape and size):
- cold load into a free slot: read + validate the files (the load thread's part) and the
  slot write (the engine thread's part, between steps). Files are fresh but sit in the OS
  page cache, as on a replica that just fetched them; goal <= 100 ms;
- reload from the host cache (slot write only); goal <= 10 ms;
- decode throughput of a running batch while other adapters load back to back (each
  installed between steps), against the same batch with no loads, in short alternating
  phases compared by median step time; goal >= 90 %.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cold_ray.benchmarks import goals
from cold_ray.benchmarks.common import machine_record, make_adapter


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {
        "median": statistics.median(xs),
        "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))],
        "min": xs[0],
        "max": xs[-1],
        "n": len(xs),
    }


def load_latency(core, names: list[str], repeats: int) -> dict:
    """Cold (files -> free slot) and host-cache (memory -> free slot) load times, in ms."""
    read, install, total, host = [], [], [], []
    for i in range(repeats):
        name = names[i % len(names)]
        core.slots.forget(name)  # not resident, not in the host cache: a cold load
        source = core.adapter_source(name)
        t0 = time.perf_counter()
        adapter = core.adapters.read(name, source)
        t1 = time.perf_counter()
        core.slots.install(name, adapter)
        t2 = time.perf_counter()
        read.append((t1 - t0) * 1e3)
        install.append((t2 - t1) * 1e3)
        total.append((t2 - t0) * 1e3)
        core.slots._evict(name)  # its slot is free again; the host copy stays
        t0 = time.perf_counter()
        core.slots.install(name, core.slots.cached(name))
        host.append((time.perf_counter() - t0) * 1e3)
    return {
        "cold_load_ms": _stats(total),
        "cold_read_validate_ms": _stats(read),
        "cold_slot_write_ms": _stats(install),
        "host_cache_load_ms": _stats(host),
    }


def throughput_under_load(core, names: list[str], rows: int, steps: int, rounds: int) -> dict:
    """Tokens/s of a running batch with and without adapters loading meanwhile."""
    from cold_ray.engine import SamplingParams

    prompt = core.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 2)[:16]
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps * rounds + 8, ignore_eos=True)
    serving, loading = names[0], names[1:]
    core.load_adapter(serving)
    reqs = [core.make_request(prompt, params, serving if i % 2 == 0 else None) for i in range(rows)]
    for r in reqs:
        core.add(r)
    for _ in range(3):  # prefill + warm-up
        core.step()

    def phase(with_loads: bool) -> tuple[list[float], int]:
        """Per-step seconds (an install between steps counts against its step)."""
        times, loads, pending, k = [], 0, None, 0
        for _ in range(steps):
            t0 = time.perf_counter()
            if with_loads and (pending is None or pending[1].done()):
                if pending is not None:  # install between steps, as the engine does
                    core.slots.install(pending[0], pending[1].result())
                    loads += 1
                name = loading[k % len(loading)]
                k += 1
                core.slots.forget(name)
                pending = (
                    name,
                    core.adapters._pool.submit(core.adapters.read, name, core.adapter_source(name)),
                )
            core.step()
            times.append(time.perf_counter() - t0)
        if pending is not None:
            pending[1].result()
        return times, loads

    # Short alternating phases and medians of per-step times: other processes on a shared
    # machine add outliers to both sides rather than bias one.
    base, loaded, n_loads = [], [], 0
    for _ in range(rounds):
        base += phase(False)[0]
        times, n = phase(True)
        loaded += times
        n_loads += n
    for r in reqs:
        core.abort(r.request_id)
    tps = lambda ts: rows / statistics.median(ts)
    return {
        "rows": rows,
        "steps_per_phase": steps,
        "rounds": rounds,
        "tokens_per_s_no_load": tps(base),
        "tokens_per_s_while_loading": tps(loaded),
        "throughput_ratio": tps(loaded) / tps(base),
        "throughput_ratio_mean_based": statistics.mean(base) / statistics.mean(loaded),
        "loads_completed_while_decoding": n_loads,
    }


def run(opts: argparse.Namespace) -> dict:
    import torch

    from cold_ray.config import EngineConfig
    from cold_ray.engine import EngineCore

    core = EngineCore(
        EngineConfig(
            model=opts.model,
            max_loras=opts.max_loras,
            max_lora_rank=16,
            max_rows=opts.rows,
            max_model_len=2 * opts.steps * opts.rounds + 64,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i in range(opts.adapters):
            names.append(f"bench{i}")
            core.register_adapter(names[-1], make_adapter(core.args, Path(tmp) / names[-1], seed=i))
        nbytes = (Path(tmp) / names[0] / "adapter_model.safetensors").stat().st_size
        with torch.inference_mode():
            latency = load_latency(core, names, opts.repeats)
            tput = throughput_under_load(core, names, opts.rows, opts.steps, opts.rounds)
    core.shutdown()
    result = {
        "benchmark": "adapter_load",
        "model": core.args.name,
        "adapter": {
            "rank": 16,
            "targets": "all linear (q,k,v,o,gate,up,down)",
            "dtype_on_disk": "float16",
            "bytes": nbytes,
        },
        "threads": {"torch_intra_op": torch.get_num_threads(), "loader_threads": 1},
        "lora_backend": core.backend.name,
        **latency,
        **tput,
    }
    result["goals"] = goals.check_run("serving:adapter_load", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cold-ray bench serving --scenario adapter_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--repeats", type=int, default=10, help="load-latency samples")
    p.add_argument("--adapters", type=int, default=4, help="distinct adapter files")
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--rows", type=int, default=8, help="decode batch rows")
    p.add_argument("--steps", type=int, default=6, help="decode steps per phase")
    p.add_argument("--rounds", type=int, default=12, help="alternating phase pairs")
    p.add_argument("--out", help="also write the JSON here")
    opts = p.parse_args(argv)
    if opts.adapters < 2 or opts.max_loras < 2:
        p.error("--adapters and --max-loras must be >= 2 (one serves, the others load)")
    threading.current_thread().name = "bench"
    result = {**run(opts), "machine": machine_record()}
    text = json.dumps(result, indent=2)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
