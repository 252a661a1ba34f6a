"""Kernel benchmarks: LoRA shrink / expand / lora_delta per implementation, and the CoLD step
with a candidate-restricted vs a full amateur LM head.

    cold-ray bench kernels --json [--plot kernels.png]
    cold-ray bench kernels --json --rows 64 --ranks 64 --hidden 4096 --mix uniform

Prints a JSON list of records (`--json`) or a table: impl, op, rows, rank, hidden, ms (median
per call), extra_bytes, plus mix/dtype/device and, for the CoLD step, vocab/head/candidates.

extra_bytes = peak memory allocated during one call beyond its inputs and outputs (the
returned tensor, e.g. shrink's t, is subtracted; y updated in place is an input). On CPU it
is read from the torch profiler's allocator events (every c10 CPU allocation and free, in
order; the running sum's maximum is the peak); on CUDA/NPU from max_memory_allocated. It
counts the gathered weight copies of gather-BMM (rows x r x (in + out)), grouped's gathered
activations, workspaces and temporaries.

Run it with one intra-op thread (OMP_NUM_THREADS=1) on a quiet machine; figures are medians.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cold_ray.benchmarks.common import machine_record
from cold_ray.benchmarks.workloads import MIX_KINDS, adapter_mix
from cold_ray.device import synchronize
from cold_ray.kernels import select_backend
from cold_ray.kernels.dispatch import ascend_native_available, device_type

log = logging.getLogger(__name__)

LORA_OPS = ("shrink", "expand", "lora_delta")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _strs(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _vocab_pairs(text: str) -> list[tuple[int, int]]:
    """ "49152:576,128256:4096" -> [(49152, 576), (128256, 4096)] as (vocab, hidden)."""
    pairs = []
    for item in _strs(text):
        vocab, _, hidden = item.partition(":")
        pairs.append((int(vocab), int(hidden)))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cold-ray bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    p.add_argument("--plot", metavar="FILE.png", help="draw the figures into this PNG")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--impls", type=_strs, help="LoRA impls (default: all usable on the device)")
    p.add_argument("--ops", type=_strs, default=list(LORA_OPS), help="shrink,expand,lora_delta")
    p.add_argument("--rows", type=_ints, default=[1, 8, 32, 64])
    p.add_argument("--ranks", type=_ints, default=[8, 16, 64])
    p.add_argument("--hidden", type=_ints, default=[576, 4096], help="in = out features")
    p.add_argument("--mix", type=_strs, default=["uniform"], help=f"of {list(MIX_KINDS)}")
    p.add_argument("--adapters", type=int, default=8, help="adapter slots loaded")
    p.add_argument(
        "--cold-vocab",
        type=_vocab_pairs,
        default=[(49152, 576), (128256, 4096)],
        help="CoLD-step shapes as vocab:hidden,... (SmolLM2 and a Llama-3 128k head); '' skips",
    )
    p.add_argument("--cold-rows", type=_ints, default=[1, 8, 32], help="CoLD pairs per step")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per record")
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    return p


def default_impls(device: str) -> list[str]:
    kind = device_type(device)
    impls = ["reference", "gather_bmm", "grouped"]
    if kind in ("cuda", "npu"):
        impls.append("triton")
    if kind == "npu" and ascend_native_available():
        impls.append("ascend_native")
    return impls


# -- measurement --------------------------------------------------------------------------------
def time_ms(
    fn: Callable[[], object], device: torch.device, min_time: float, max_reps: int
) -> float:
    """Median wall time of one call, in ms (2 warm-up calls; at least 3 timed)."""
    for _ in range(2):
        fn()
    synchronize(device)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < min_time and len(samples) < max_reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _nbytes(out: object) -> int:
    if isinstance(out, torch.Tensor):
        return out.untyped_storage().nbytes()
    if isinstance(out, tuple | list):
        return sum(_nbytes(o) for o in out if o is not None)
    return 0


@contextlib.contextmanager
def _quiet_fd2():
    """Silence the profiler's native start/stop lines on stderr (fd 2) for one measurement."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated during one call of `fn`, minus what it returns (see module doc)."""
    if device.type in ("cuda", "npu"):
        mod = torch.cuda if device.type == "cuda" else torch.npu  # type: ignore[attr-defined]
        synchronize(device)
        mod.reset_peak_memory_stats(device)
        base = mod.memory_allocated(device)
        out = fn()
        synchronize(device)
        return max(0, mod.max_memory_allocated(device) - base - _nbytes(out))
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception as e:  # profiler internals differ across torch versions
        log.warning("extra_bytes unavailable: %s", e)
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # + on allocation, - on free
        peak = max(peak, live)
    return max(0, peak - _nbytes(out))


# -- LoRA ---------------------------------------------------------------------------------------
def _slots_bytes(idx: list[int], per_slot: int) -> int:
    return len({k for k in idx if k >= 0}) * per_slot


def lora_records(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    impls = args.impls or default_impls(args.device)
    backends = {name: select_backend(name, device) for name in impls}
    records = []
    g = torch.Generator().manual_seed(args.seed)
    for hidden in args.hidden:
        for rank in args.ranks:
            slots = args.adapters
            A = (torch.randn(slots, rank, hidden, generator=g) / hidden**0.5).to(device, dtype)
            B = (torch.randn(slots, hidden, rank, generator=g) / rank**0.5).to(device, dtype)
            scale = torch.full((slots,), 2.0, device=device)
            for rows in args.rows:
                x = torch.randn(rows, hidden, generator=g).to(device, dtype)
                y = torch.randn(rows, hidden, generator=g).to(device, dtype)
                for mix in args.mix:
                    ids = adapter_mix(mix, rows, slots, args.seed)
                    idx = torch.tensor(ids, dtype=torch.int64, device=device)
                    act = sum(k >= 0 for k in ids)
                    # Unique bytes each op must move at least (weights of the slots used once).
                    moved = {
                        "shrink": (rows * hidden) * esize
                        + _slots_bytes(ids, rank * hidden * esize)
                        + act * rank * 4,
                        "expand": act * rank * 4
                        + _slots_bytes(ids, hidden * rank * esize)
                        + 2 * act * hidden * esize,
                    }
                    moved["lora_delta"] = moved["shrink"] + moved["expand"] - 2 * act * rank * 4
                    for name, be in backends.items():
                        batch = be.prepare(idx)
                        t = be.shrink(x, A, batch)
                        calls = {
                            "shrink": functools.partial(be.shrink, x, A, batch),
                            "expand": functools.partial(be.expand, t, B, scale, batch, y),
                            "lora_delta": functools.partial(
                                be.lora_delta, x, A, B, scale, batch, y
                            ),
                        }
                        for op in args.ops:
                            ms = time_ms(calls[op], device, args.min_time, args.max_reps)
                            rec = {
                                "impl": name,
                                "op": op,
                                "rows": rows,
                                "rank": rank,
                                "hidden": hidden,
                                "ms": round(ms, 4),
                                "extra_bytes": extra_bytes(calls[op], device),
                                "mix": mix,
                                "adapters": slots,
                                "dtype": args.dtype,
                                "device": str(device),
                                "min_bytes_moved": moved[op],
                                "gbps": round(moved[op] / ms / 1e6, 2),
                            }
                            log.info("%s", rec)
                            records.append(rec)
    return records


# -- contrastive step ---------------------------------------------------------------------------
def _peaked_logits(rows: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """LM-like expert logits: noise plus a few hot tokens (a handful are plausible at 0.1)."""
    logits = torch.randn(rows, vocab, generator=g)
    hot = torch.randint(0, vocab, (rows, 16), generator=g)
    return logits.scatter_add_(1, hot, 8.0 + 4.0 * torch.rand(rows, 16, generator=g))


def cold_records(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    name = "triton" if device.type in ("cuda", "npu") else "grouped"
    be = select_backend(name, device)
    records = []
    g = torch.Generator().manual_seed(args.seed)
    for vocab, hidden in args.cold_vocab:
        lm_head = torch.empty(vocab, hidden, dtype=dtype, device=device)
        lm_head.normal_(0.0, 3.0 / math.sqrt(hidden))
        for rows in args.cold_rows:
            records += _cold_step(args, be, lm_head, rows, g)
        del lm_head  # up to 2 GiB (128k x 4096 fp32): free before the next shape
    return records


def _full_step(be, expert, h, lm_head, alpha, beta):
    return be.contrastive_full(expert, F.linear(h, lm_head), alpha, beta)


def _cold_step(args, be, lm_head: torch.Tensor, rows: int, g: torch.Generator) -> list[dict]:
    device = lm_head.device
    vocab, hidden = lm_head.shape
    expert = _peaked_logits(rows, vocab, g).to(device)
    h = torch.randn(rows, hidden, generator=g).to(device, lm_head.dtype)
    alpha = torch.full((rows,), 0.1, device=device)
    beta = torch.full((rows,), 0.5, device=device)
    calls = {
        "full": functools.partial(_full_step, be, expert, h, lm_head, alpha, beta),
        "restricted": functools.partial(be.contrastive_restricted, expert, h, lm_head, alpha, beta),
    }
    step = calls["restricted"]()
    if step.tokens.tolist() != calls["full"]().tokens.tolist():  # only on near-exact ties
        log.warning("restricted and full amateur heads picked different tokens (V=%d)", vocab)
    cands = torch.isfinite(step.scores).sum(1).float()
    records = []
    for head, fn in calls.items():
        ms = time_ms(fn, device, args.min_time, args.max_reps)
        rec = {
            "impl": be.name,
            "op": "contrastive_step",
            "rows": rows,
            "rank": None,
            "hidden": hidden,
            "ms": round(ms, 4),
            "extra_bytes": extra_bytes(fn, device),
            "vocab": vocab,
            "head": head,
            "candidates_mean": round(cands.mean().item(), 2),
            "candidates_max": int(cands.max()),
            "dtype": args.dtype,
            "device": str(device),
        }
        log.info("%s", rec)
        records.append(rec)
    return records


def run(argv: list[str] | None = None) -> list[dict]:
    """Parse `argv` and run the benchmark; returns the records (see module doc)."""
    return collect(build_parser().parse_args(argv))


def collect(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    records = lora_records(args) if args.ops and args.rows else []
    if args.cold_vocab and args.cold_rows:
        records += cold_records(args)
    if args.plot:
        plot(records, args.plot)
    return records


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lora = [r for r in records if r["op"] == "lora_delta"]
    cold = [r for r in records if r["op"] == "contrastive_step"]
    hiddens = sorted({r["hidden"] for r in lora})
    panels = len(hiddens) + (1 if lora else 0) + (1 if cold else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5.2 * max(panels, 1), 4.2), squeeze=False)
    axes = list(axes[0])
    styles = ["-", "--", ":", "-."]
    impls = sorted({r["impl"] for r in lora})
    color = {impl: f"C{i}" for i, impl in enumerate(impls)}  # colour = impl, line style = rank
    for ax, hidden in zip(axes, hiddens):
        ranks = sorted({r["rank"] for r in lora if r["hidden"] == hidden})
        for impl in impls:
            for k, rank in enumerate(ranks):
                pts = sorted(
                    (r["rows"], r["ms"])
                    for r in lora
                    if r["impl"] == impl and r["hidden"] == hidden and r["rank"] == rank
                )
                if pts:
                    ax.plot(
                        *zip(*pts),
                        styles[k % 4],
                        color=color[impl],
                        marker="o",
                        label=f"{impl} r={rank}",
                    )
        ax.set(title=f"lora_delta, hidden {hidden}", xlabel="rows", ylabel="ms / call")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if lora:
        ax = axes[len(hiddens)]
        top = max(r["rank"] for r in lora)
        for impl in impls:
            for k, hidden in enumerate(hiddens):
                pts = sorted(
                    (r["rows"], (r["extra_bytes"] or 0) / 2**20 + 1e-3)
                    for r in lora
                    if r["impl"] == impl and r["hidden"] == hidden and r["rank"] == top
                )
                ax.plot(
                    *zip(*pts),
                    styles[k % 4],
                    color=color[impl],
                    marker="o",
                    label=f"{impl} h={hidden}",
                )
        ax.set(
            title=f"extra memory, lora_delta, rank {top}",
            xlabel="rows",
            ylabel="MiB (+0.001 so that 0 shows)",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if cold:
        ax = axes[-1]
        labels = sorted({(r["vocab"], r["hidden"], r["rows"]) for r in cold})
        xs = range(len(labels))
        for off, head in ((-0.2, "full"), (0.2, "restricted")):
            ms = [
                next(
                    r["ms"]
                    for r in cold
                    if (r["vocab"], r["hidden"], r["rows"]) == lab and r["head"] == head
                )
                for lab in labels
            ]
            ax.bar([x + off for x in xs], ms, width=0.4, label=f"{head} amateur head")
        ax.set_xticks(
            list(xs), [f"V={v // 1000}k\nH={h}\nrows={n}" for v, h, n in labels], fontsize=7
        )
        ax.set(title="CoLD step", ylabel="ms / step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(records: list[dict]) -> str:
    head = f"{'impl':<12}{'op':<18}{'rows':>5}{'rank':>6}{'hidden':>7}{'ms':>11}{'extra MiB':>11}  more"
    lines = [head]
    for r in records:
        extra = "-" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 2**20:.3f}"
        more = f"V={r['vocab']} {r['head']} K~{r['candidates_mean']}" if "vocab" in r else r["mix"]
        lines.append(
            f"{r['impl']:<12}{r['op']:<18}{r['rows']:>5}{r['rank'] or '-':>6}{r['hidden']:>7}"
            f"{r['ms']:>11.4f}{extra:>11}  {more}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), stream=sys.stderr)
    args = build_parser().parse_args(argv)
    records = collect(args)
    machine = {"op": "machine", **machine_record()}
    print(json.dumps([*records, machine], indent=1) if args.json else _table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
