"""Which requests run in the next step, and which of their tokens (docs/design.md §3, §8).

Iteration-level scheduling, vLLM style: every running request that has its prompt in the
cache decodes one token per step; prompt tokens are prefilled in chunks under a per-step
budget (`max_prefill_tokens`), first come first served, so a long prompt never stalls the
decoding streams for longer than one budget's worth of compute.

A CoLD request's two rows may start from different cached prefixes (the amateur's is shared
by every adapter). Their chunks are aligned so both rows reach the end of the prompt in the
same step: the request's first token needs both rows' last hidden states.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cold_ray.engine.kv_cache import Row
from cold_ray.engine.request import Request


@dataclass
class Chunk:
    row: Row
    start: int  # position of the first token
    tokens: list[int]

    @property
    def ends_prompt(self) -> bool:
        return self.start + len(self.tokens) == len(self.row.request.prompt_ids)


@dataclass
class StepPlan:
    decode: list[Row] = field(default_factory=list)  # one token each: the last one generated
    prefill: list[Chunk] = field(default_factory=list)
    ready: list[Request] = field(default_factory=list)  # get their next token from this step

    @property
    def requests(self) -> list[Request]:
        """Every request with a row in this step's forward pass."""
        seen = {id(r.request): r.request for r in self.decode}
        seen.update((id(c.row.request), c.row.request) for c in self.prefill)
        return list(seen.values())

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


def aligned_chunks(rows: list[Row], budget: int) -> list[int]:
    """Tokens each row prefills this step: as many as `budget` allows in total, such that the
    rows end their prompt together. With `lead` the most tokens any row has left and `c`
    the lead row's chunk, a row with `left` tokens takes max(0, left - (lead - c))."""
    left = [r.prompt_left for r in rows]
    lead = max(left)

    def sizes(c: int) -> list[int]:
        return [max(0, n - (lead - c)) for n in left]

    lo, hi = 0, lead  # largest c with sum(sizes(c)) <= budget (the sum grows with c)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(sizes(mid)) <= budget else (lo, mid - 1)
    return sizes(lo)


class Scheduler:
    def __init__(self, max_prefill_tokens: int, request_timeout_s: float | None):
        self.max_prefill_tokens = max_prefill_tokens
        self.request_timeout_s = request_timeout_s
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, free_rows: int, place: Callable[[Request], bool]) -> None:
        """Move waiting requests to running, first come first served, while rows last.

        `place(req)` gives the request its rows and pins its adapter, or says it cannot yet
        (its adapter is loading); pinning at once keeps a later request's adapter load from
        evicting it. A request that does not fit stops admission, so a CoLD pair is never
        starved by one-row requests behind it.
        """
        for req in list(self.waiting):
            if req.finish_reason is not None:
                continue  # failed while this pass ran (e.g. its adapter did not load)
            if req.num_rows > free_rows:
                break
            if not place(req):
                continue
            self.waiting.remove(req)
            self.running.append(req)
            free_rows -= req.num_rows

    def expired(self, now: float | None = None) -> list[Request]:
        """Waiting requests older than `request_timeout_s` (they never got a row)."""
        if self.request_timeout_s is None:
            return []
        now = time.monotonic() if now is None else now
        return [r for r in self.waiting if now - r.arrived > self.request_timeout_s]

    def plan(self, reuse_prefix: Callable[[Request], None]) -> StepPlan:
        """The next step: every prefilled request decodes; prompts take the budget in order.

        `reuse_prefix(req)` runs once per request before its first chunk is cut, so a prefix
        cached by an earlier request (even one that finished a step ago) is copied, not
        recomputed.
        """
        plan = StepPlan()
        budget = self.max_prefill_tokens
        for req in self.running:
            if req.prefilled:
                plan.decode.extend(req.rows)
                plan.ready.append(req)
                continue
            if budget <= 0:
                continue
            if not req.prefix_checked:
                reuse_prefix(req)
                req.prefix_checked = True
            sizes = aligned_chunks(req.rows, budget)
            if not any(sizes) and not plan.prefill:  # always make progress
                sizes = aligned_chunks(req.rows, sum(min(1, r.prompt_left) for r in req.rows))
            for row, n in zip(req.rows, sizes):
                if n:
                    start = row.length
                    plan.prefill.append(Chunk(row, start, req.prompt_ids[start : start + n]))
            budget -= sum(sizes)
            if all(n == r.prompt_left for r, n in zip(req.rows, sizes)):
                plan.ready.append(req)
        # Rows of one adapter side by side: each adapter's LoRA delta is one GEMM pair over a
        # contiguous run, with no gather (base rows, the amateurs among them, go last).
        plan.decode.sort(key=lambda r: (r.adapter_slot < 0, r.adapter_slot, r.slot))
        return plan
