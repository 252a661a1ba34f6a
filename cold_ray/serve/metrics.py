"""Prometheus metrics through Ray's metrics API (`ray.serve.metrics`, which is
`ray.util.metrics` plus the deployment/replica/application tags).

Engine replicas export what the engine counts (a sampler thread turns `AsyncEngine.stats()`
into gauges and counter increments); the ingress exports what a client sees (time to first
token, inter-token latency, requests by outcome).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# seconds; TTFT spans a queued CPU prefill (seconds) down to a GPU decode step (ms)
LATENCY_BOUNDARIES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
LOAD_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


def _metrics():
    from ray.serve import metrics

    return metrics


class EngineMetrics:
    """Replica-side metrics; `sample(stats)` is called by a background thread."""

    def __init__(self):
        m = _metrics()
        self.tokens = m.Counter("cold_generated_tokens", description="Tokens generated.")
        self.requests = m.Counter(
            "cold_engine_requests",
            description="Requests admitted to the engine, by decoding mode and adapter.",
            tag_keys=("decoding", "adapter"),
        )
        self.rows = m.Gauge("cold_running_rows", description="Batch rows in use.")
        self.running = m.Gauge("cold_running_requests", description="Requests decoding.")
        self.waiting = m.Gauge("cold_waiting_requests", description="Requests queued in engine.")
        self.kv = m.Gauge("cold_kv_cache_usage", description="Fraction of KV-cache rows in use.")
        self.resident = m.Gauge("cold_resident_adapters", description="Adapters in device slots.")
        self.loads = m.Counter("cold_adapter_loads", description="Adapters installed in a slot.")
        self.evictions = m.Counter("cold_adapter_evictions", description="Adapters evicted.")
        self.load_seconds = m.Histogram(
            "cold_adapter_load_seconds",
            description="Time to read, validate and install an adapter (per load).",
            boundaries=LOAD_BOUNDARIES,
        )
        self._last: dict[str, float] = {}

    def _delta(self, stats: dict, key: str) -> float:
        value = float(stats.get(key, 0) or 0)
        delta = value - self._last.get(key, 0.0)
        self._last[key] = value
        return max(delta, 0.0)

    def sample(self, stats: dict) -> None:
        tokens = self._delta(stats, "generated_tokens")
        if tokens:
            self.tokens.inc(tokens)
        loads = self._delta(stats, "adapter_loads")
        seconds = self._delta(stats, "adapter_load_seconds")
        if loads:
            self.loads.inc(loads)
            for _ in range(int(loads)):  # the engine sums load time; spread it over the loads
                self.load_seconds.observe(seconds / loads)
        evictions = self._delta(stats, "adapter_evictions")
        if evictions:
            self.evictions.inc(evictions)
        self.rows.set(stats.get("running_rows", 0))
        self.running.set(stats.get("running_requests", 0))
        self.waiting.set(stats.get("waiting_requests", 0))
        self.kv.set(stats.get("kv_cache_usage", 0.0))
        self.resident.set(len(stats.get("resident_adapters", ())))

    def request(self, decoding: str, adapter: str | None) -> None:
        self.requests.inc(tags={"decoding": decoding, "adapter": adapter or "base"})


class Sampler(threading.Thread):
    """Calls `fn` every `period` seconds until stopped; a failure is logged, never raised."""

    def __init__(self, fn: Callable[[], None], period: float = 1.0):
        super().__init__(name="cold-metrics", daemon=True)
        self.fn, self.period = fn, period
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.fn()
            except Exception:  # a metrics hiccup must never take the replica down
                log.debug("metrics sample failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()


class IngressMetrics:
    def __init__(self):
        m = _metrics()
        self.ttft = m.Histogram(
            "cold_time_to_first_token_seconds",
            description="From request arrival at the ingress to the first token.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("decoding",),
        )
        self.itl = m.Histogram(
            "cold_inter_token_latency_seconds",
            description="Between consecutive streamed outputs of one request.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("decoding",),
        )
        self.requests = m.Counter(
            "cold_http_requests",
            description="HTTP API requests by route and status.",
            tag_keys=("route", "status"),
        )
        self.decoded = m.Counter(
            "cold_requests",
            description="Generation requests by decoding mode and model.",
            tag_keys=("decoding", "model"),
        )
