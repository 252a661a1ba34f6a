"""Captured decode steps: CUDA graphs (ACLGraph on Ascend), one per (rows, span) bucket.

On an accelerator a decode step of a small model is ~400 small kernels whose launches cost
more than their work; replaying a captured graph launches them as one. A step is replayed
when it is decode only and its D rows hold cache slots 0..D-1 (the compacted cache's usual
state); row i of the graph is slot i. It is padded to the next row bucket: pad row i works in
the free slot i at position 0 with adapter -1 (a free slot's contents are never read; its
next owner overwrites them). Attention reads each slot up to the span bucket (the next power
of two above the longest row, at most max_model_len) under a mask made inside the graph from
the positions, so one graph serves every length in its bucket. Every other step (prefill
chunks, rows beyond slot D-1) runs eagerly, as does every step with `graph_capture: false`.

Inputs live in one static buffer (tokens, positions, adapter slots), written once per step;
the LoRA backend derives its metadata from the adapter row on the device (`graph_batch`), so
adapters loaded into slots after capture are seen by every replay.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from cold_ray import device as devices
from cold_ray.engine.scheduler import StepPlan
from cold_ray.kernels import LoraBackend
from cold_ray.model.llama import DecodeAttention, ForwardBatch, LlamaModel

log = logging.getLogger(__name__)

MIN_SPAN = 128  # smallest attention span bucket (tokens)


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, and max_rows itself (vLLM's capture sizes)."""
    small = [b for b in (1, 2, 4) if b < max_rows]
    return small + [b for b in range(8, max_rows, 8)] + [max_rows]


def span_buckets(max_len: int) -> list[int]:
    """Powers of two from MIN_SPAN below max_len, then max_len itself."""
    spans, s = [], MIN_SPAN
    while s < max_len:
        spans.append(s)
        s *= 2
    return spans + [max_len]


def _bucket(buckets: list[int], n: int) -> int:
    return buckets[bisect.bisect_left(buckets, n)]


class DecodeGraphs:
    """Decode steps replayed from captured graphs (or, with `capture=False`, run eagerly over
    the same padded static inputs: the CPU tests' stand-in for replay)."""

    def __init__(
        self,
        model: LlamaModel,
        cache,
        backend: LoraBackend,
        max_rows: int,
        max_len: int,
        max_loras: int,
        capture: bool = True,
    ):
        if not backend.graph_safe:
            raise ValueError(
                f"the {backend.name!r} LoRA backend reads its plan on the host; "
                "decode steps with it cannot be captured"
            )
        self.model, self.cache, self.backend = model, cache, backend
        self.max_loras = max_loras
        self.rows = row_buckets(min(max_rows, cache.num_slots))
        self.spans = span_buckets(max_len)
        device = model.norm.device
        n = self.rows[-1]
        self.inputs = torch.zeros(3, n, dtype=torch.int64, device=device)
        self.inputs[2].fill_(-1)
        self.order = torch.arange(max(n, max_len), device=device)
        self.graphs: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        if capture:
            self._capture_all(device)

    # ---- per step --------------------------------------------------------------------------

    def fits(self, plan: StepPlan) -> bool:
        """A decode-only step whose D rows hold slots 0..D-1, D within the buckets."""
        rows = plan.decode
        return (
            not plan.prefill
            and 0 < len(rows) <= self.rows[-1]
            and max(r.slot for r in rows) < len(rows)
        )

    def run(self, plan: StepPlan) -> torch.Tensor:
        """The final hidden states of the plan's decode rows by slot, [D, hidden] (a view
        of the graph's output: read it before the next step)."""
        rows = plan.decode
        d = len(rows)
        key = (_bucket(self.rows, d), _bucket(self.spans, max(r.length for r in rows) + 1))
        n = self.inputs.shape[1]
        tokens, positions, adapters = [0] * n, [0] * n, [-1] * n  # pad rows
        for r in rows:
            tokens[r.slot], positions[r.slot] = r.request.output_ids[-1], r.length
            adapters[r.slot] = r.adapter_slot
        self.inputs.copy_(torch.tensor([tokens, positions, adapters]))
        if key not in self.graphs:  # eager over the same static inputs (capture=False)
            return self.forward(*key)[:d]
        graph, out = self.graphs[key]
        graph.replay()
        return out[:d]

    def forward(self, rows: int, span: int) -> torch.Tensor:
        """The padded decode step over the static inputs: what is captured and replayed."""
        tokens, positions, adapters = self.inputs[:, :rows]
        masked = self.order[:span] > positions.view(rows, 1, 1, 1)  # [rows, 1, 1, span]
        mask = torch.zeros(
            masked.shape, dtype=self.model.norm.dtype, device=positions.device
        ).masked_fill_(masked, float("-inf"))
        slots = self.order[:rows]
        fb = ForwardBatch(
            positions=positions,
            slots=slots,
            lora=self.backend.graph_batch(adapters, self.max_loras),
            decode=DecodeAttention(num=rows, span_rows=rows, slots=None, mask=mask),
            prefill=None,
            out_index=slots,
        )
        return self.model(tokens, self.cache, fb)

    # ---- capture ---------------------------------------------------------------------------

    def _capture_all(self, device: torch.device) -> None:
        """Capture every (rows, span) bucket, largest first so smaller graphs reuse the pool,
        and check each replay against the same step run eagerly. Runs at start, before any
        row holds a slot: these runs write K/V only into free slots."""
        graph_cls, graph_ctx = devices.graph_api(device)
        t0 = time.perf_counter()
        pool = None
        with torch.inference_mode(), devices.current(device):
            for span in reversed(self.spans):
                for rows in reversed(self.rows):
                    self.forward(rows, span)  # warm-up: kernels compiled/tuned outside capture
                    devices.synchronize(device)
                    graph = graph_cls()
                    with graph_ctx(graph, pool=pool):
                        out = self.forward(rows, span)
                    pool = graph.pool()
                    self.check_replay(graph, out, rows, span)
                    self.graphs[(rows, span)] = (graph, out)
        devices.synchronize(device)
        self.capture_seconds = time.perf_counter() - t0
        log.info(
            "captured %d decode graphs (rows %s x span %s) in %.1f s",
            len(self.graphs),
            self.rows,
            self.spans,
            self.capture_seconds,
        )

    def check_replay(self, graph, out: torch.Tensor, rows: int, span: int) -> None:
        """Replay once on inputs unlike the capture's (every token, position and adapter slot
        differs per row) and compare with the eager step: a graph that baked in a value read
        at capture, or reads memory it does not own, fails here rather than in a request."""
        i = self.order[:rows]
        self.inputs[0, :rows] = (i * 7919 + 11) % self.model.embed_tokens.shape[0]
        self.inputs[1, :rows] = (i * 37 + span - 1) % span
        self.inputs[2, :rows] = i % (self.max_loras + 1) - 1
        graph.replay()
        want = self.forward(rows, span)
        diff = (out.float() - want.float()).abs().max().item()
        if not diff <= 1e-2 * (1.0 + want.float().abs().max().item()):  # NaN fails too
            raise RuntimeError(
                f"the decode graph for {rows} rows x span {span} replays "
                f"differently from the eager step (max |diff| {diff:.3g})"
            )
        self.inputs[:2].zero_()
        self.inputs[2].fill_(-1)
