"""PNG plots of a load-test run, a user sweep, and a soak (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from cold_ray.benchmarks.common import pyplot as _plt

COLORS = {"cold": "tab:blue", "plain": "tab:orange", "base": "tab:green"}


def _cdf(ax, values: list[float], label: str, color: str | None) -> None:
    if not values:
        return
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.plot(xs, ys, label=f"{label} (n={len(xs)})", color=color)


def plot_run(records: list[dict], summary: dict, out: Path, bin_s: float | None = None) -> Path:
    """latency / TTFT / ITL CDFs per decoding, and tokens/s + 503s over time."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ok = [r for r in records if r.get("ok")]
    decodings = sorted({r["decoding"] for r in ok})
    panels = [
        (axes[0][0], "request latency (ms)", lambda r: [r["latency_ms"]]),
        (
            axes[0][1],
            "time to first token (ms, streamed)",
            lambda r: [r["ttft_ms"]] if r.get("ttft_ms") is not None else [],
        ),
        (axes[1][0], "inter-token latency (ms, streamed)", lambda r: r.get("itl_ms") or []),
    ]
    for ax, title, values in panels:
        for d in decodings:
            _cdf(ax, [v for r in ok if r["decoding"] == d for v in values(r)], d, COLORS.get(d))
        ax.set_title(title)
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[1][1]
    if records:
        t0 = min(r["t_start"] for r in records)
        span = max(r["t_end"] for r in records) - t0
        bin_s = bin_s or max(1.0, round(span / 30))
        nbins = int(span // bin_s) + 1
        for d in decodings:
            tok = [0.0] * nbins
            for r in ok:
                if r["decoding"] == d:
                    tok[int((r["t_end"] - t0) // bin_s)] += r.get("completion_tokens", 0)
            ax.plot(
                [i * bin_s for i in range(nbins)],
                [t / bin_s for t in tok],
                label=f"{d} tokens/s",
                color=COLORS.get(d),
            )
        rejected = [0] * nbins
        for r in records:
            if r.get("status") == 503:
                rejected[int((r["t_end"] - t0) // bin_s)] += 1
        if any(rejected):
            ax.bar(
                [i * bin_s for i in range(nbins)],
                [x / bin_s for x in rejected],
                width=bin_s,
                alpha=0.3,
                color="red",
                label="503/s",
            )
    ax.set_title(f"throughput over time ({bin_s or 0:.0f} s bins, by completion time)")
    ax.set_xlabel("seconds since first request")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    run = summary.get("run", {})
    fig.suptitle(
        f"{run.get('users')} users · {summary['rps']} req/s · {summary['tokens_per_s']} tok/s · "
        f"p95 TTFT {summary['ttft_ms']['p95']} ms · failures {summary['failures']} · "
        f"503 {summary['rejected_503']}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_sweep(points: list[dict], out: Path) -> Path:
    """Throughput vs p95 latency (and p95 TTFT), one line per decoding, labelled by users."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, metric, title in (
        (axes[0], "latency_ms", "p95 request latency (ms)"),
        (axes[1], "ttft_ms", "p95 time to first token (ms)"),
    ):
        for d in sorted({p["decoding"] for p in points}):
            pts = sorted((p for p in points if p["decoding"] == d), key=lambda p: p["users"])
            xs = [p["tokens_per_s"] for p in pts]
            ys = [p[metric]["p95"] for p in pts]
            ax.plot(xs, ys, marker="o", label=d, color=COLORS.get(d))
            for p, x, y in zip(pts, xs, ys):
                if y is not None:
                    ax.annotate(
                        str(p["users"]),
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=8,
                    )
        ax.set_xlabel("throughput (generated tokens/s)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs throughput (labels: users)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_soak(samples: list[dict], out: Path) -> Path:
    """Replica RSS and engine gauges over the soak."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ts = [s["t"] for s in samples]
    axes[0].plot(ts, [s["rss_mib"] for s in samples], color="tab:purple")
    axes[0].set_title("engine replica RSS (MiB)")
    axes[0].set_xlabel("seconds")
    axes[0].grid(alpha=0.3)
    engine = [s.get("engine") or {} for s in samples]  # None: gauges not exported yet
    for key in sorted({k for e in engine for k in e}):
        axes[1].plot(ts, [e.get(key) for e in engine], label=key)
    axes[1].set_title("engine gauges")
    axes[1].set_xlabel("seconds")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
