"""Which requests run in the next step, and what their tokens do to them (docs/design.md §3, §8).

Iteration-level scheduling, vLLM style, in three parts the engine calls once per step:
- `schedule()`: between steps — compact the KV cache, expire requests that waited too long,
  admit waiting requests into rows, and plan the step: every running request that has its
  prompt in the cache decodes one token; prompt tokens are prefilled in chunks under a
  per-step budget (`max_prefill_tokens`), first come first served, reusing cached prefixes.
- `postprocess(plan, tokens)`: after the model runner — advance the rows, store new prefix
  blocks, append each ready request's token, apply stops, finish requests.
- every finish (stop, length, abort, timeout, error) frees the request's rows and adapter pin
  at once and puts its final output in the outbox, which `take_outputs()` empties: an output
  can never be lost between a finish and the caller, whatever fails later in the step.

Admission is fair in both resources. Rows: a request that does not fit stops admission, so a
CoLD pair is never starved by one-row requests behind it. Adapter slots: a waiting request
whose adapter is not resident holds its claim on a slot — no newer request may install an
adapter or take a pin that would leave fewer free-or-idle slots than the older requests still
need — so it gets a slot once the running requests of one pinned adapter finish (at most the
longest remaining `max_tokens` among them, plus its own load), however busy the others are.

A CoLD request's two rows may start from different cached prefixes (the amateur's is shared
by every adapter). Their chunks are aligned so both rows reach the end of the prompt in the
same step: the request's first token needs both rows' last hidden states.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from cold_ray.config import EngineConfig
from cold_ray.engine.adapter_loader import AdapterLoader
from cold_ray.engine.kv_cache import KVCache, Row
from cold_ray.engine.logprobs import TokenLogprobs
from cold_ray.engine.prefix_cache import BASE, PrefixCache
from cold_ray.engine.request import Request, RequestFailed, RequestOutput, RequestTimeout

log = logging.getLogger(__name__)


@dataclass(eq=False)  # found by identity (a key of the step's outputs)
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


@dataclass
class StepResult:
    """What the model runner made of a plan, per request."""

    tokens: dict[Request, int | Exception]  # each ready request's token, or what failed it
    logprobs: dict[Request, TokenLogprobs] = field(default_factory=dict)  # of those tokens
    prompt_logprobs: dict[Request, list[TokenLogprobs]] = field(default_factory=dict)


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
    def __init__(
        self,
        config: EngineConfig,
        cache: KVCache,
        adapters: AdapterLoader,
        prefix_cache: PrefixCache | None,
        tokenizer,
        stats: dict,
    ):
        self.config = config
        self.cache, self.adapters, self.prefix_cache = cache, adapters, prefix_cache
        self.tokenizer, self.stats = tokenizer, stats
        self.eos_ids = set(adapters.args.eos_token_ids) | {tokenizer.eos_token_id} - {None}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._outbox: list[RequestOutput] = []

    def add(self, req: Request) -> None:
        req.arrived = time.monotonic()
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_outputs(self) -> list[RequestOutput]:
        outputs, self._outbox = self._outbox, []
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now; its final output, taken out of the outbox (None: unknown)."""
        for req in [*self.waiting, *self.running]:
            if req.request_id == request_id:
                self.finish(req, "abort")
                return self._outbox.pop()
        return None

    def fail_running(self, error: Exception) -> None:
        """Fail every running request (their rows' state is unknown after an unexpected error
        in the step); waiting requests keep waiting."""
        for req in list(self.running):
            self.finish(req, "error", error)

    # ---- before the forward ---------------------------------------------------------------

    def schedule(self) -> StepPlan:
        self.cache.compact()  # between steps: rows move only here
        self._expire()
        self._admit()
        return self._plan()

    def _expire(self) -> None:
        limit = self.config.request_timeout_s
        if limit is None:
            return
        now = time.monotonic()
        for req in [r for r in self.waiting if now - r.arrived > limit]:
            error = RequestTimeout(
                f"request waited {now - req.arrived:.0f} s without being scheduled "
                f"(request_timeout_s is {limit:g})"
            )
            self.finish(req, "error", error)

    def _admit(self) -> None:
        """Move waiting requests to running in arrival order while rows last; see the module
        docstring for the adapter-slot rule (`claimed` counts the older requests' claims)."""
        free_rows = self.cache.free_slots
        claimed: set[str] = set()  # adapters older waiting requests wait for a slot for
        for req in list(self.waiting):
            if req.finish_reason is not None:
                continue  # failed during this pass (its adapter did not load)
            if req.num_rows > free_rows:
                break
            if req.adapter is not None and req.adapter not in claimed:
                try:
                    ready = self.adapters.ensure(req.adapter, keep_idle=len(claimed))
                except Exception as e:  # unknown by now, or its files do not load
                    self._fail_adapter(req.adapter, e)
                    continue
                if not ready:
                    claimed.add(req.adapter)
                    continue
            elif req.adapter is not None:
                continue  # an older request for the same adapter is still waiting for it
            self._place(req)
            self.waiting.remove(req)
            self.running.append(req)
            free_rows -= req.num_rows
        self.adapters.drop_loads_except({r.adapter for r in self.waiting if r.adapter})

    def _fail_adapter(self, name: str, error: Exception) -> None:
        for other in [r for r in self.waiting if r.adapter == name]:
            self.finish(other, "error", error)

    def _place(self, req: Request) -> None:
        """Rows for a request whose adapter is resident: expert (or plain) first, then the
        amateur; the adapter is pinned at once, so no later load can evict it."""
        adapter_slot, identity = -1, BASE
        if req.adapter is not None:
            adapter_slot, req.adapter_version = self.adapters.pin(req.adapter)
            req.adapter_pinned = True
            identity = (req.adapter, req.adapter_version)
        keys = [(adapter_slot, identity)] + ([(-1, BASE)] if req.cold else [])
        if req.cache_salt is not None:  # another tenant's blocks are never this row's
            keys = [(slot, (key, req.cache_salt)) for slot, key in keys]
        for slot, key in keys:
            row = Row(req, slot, prefix_key=key)
            self.cache.add(row)
            req.rows.append(row)
        self.stats["cold_requests" if req.cold else "plain_requests"] += 1

    def _plan(self) -> StepPlan:
        """Every prefilled request decodes; prompts take the budget in arrival order."""
        plan = StepPlan()
        budget = self.config.max_prefill_tokens
        for req in self.running:
            if req.prefilled:
                plan.decode.extend(req.rows)
                plan.ready.append(req)
                continue
            if budget <= 0:
                continue
            if not req.prefix_checked and req.params.prompt_logprobs is None:
                self._reuse_prefix(req)  # (a cached prefix has no logits to report)
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

    def _reuse_prefix(self, req: Request) -> None:
        """Copy each row's longest cached prompt prefix into its slot (at least the last prompt
        token is always computed: its hidden state gives the first token). The cache is an
        optimisation: if it fails, the rows compute their prompt instead."""
        if self.prefix_cache is None:
            return
        for row in req.rows:
            limit = len(req.prompt_ids) - 1
            try:
                row.length = self.prefix_cache.load(row.prefix_key, req.prompt_ids, row.slot, limit)
            except Exception:
                log.exception("could not load a prompt prefix; clearing the prefix cache")
                self.prefix_cache.clear()
                row.length = 0

    # ---- after the forward ----------------------------------------------------------------

    def postprocess(self, plan: StepPlan, result: StepResult) -> None:
        """Advance the plan's rows, then give each ready request its token (or its error).
        `result.tokens` has an entry for every ready request; a request of the plan that is not
        ready (mid-prefill) fails only if the forward failed (its entry is then an exception)."""
        tokens = result.tokens
        failed = {req for req, t in tokens.items() if isinstance(t, Exception)}
        for row in plan.decode:
            row.length += 1
        for chunk in plan.prefill:
            chunk.row.length += len(chunk.tokens)
            if self.prefix_cache is not None and chunk.row.request not in failed:
                self._store_prefix(chunk.row)  # after every chunk: a request starting while
        self.stats["prefill_tokens"] += sum(len(c.tokens) for c in plan.prefill)  # it prefills
        for req, found in result.prompt_logprobs.items():
            if req.prompt_logprobs is None:  # the first prompt token has no context to score
                req.prompt_logprobs = [TokenLogprobs(req.prompt_ids[0], None)]
            req.prompt_logprobs += found
        for req, token in tokens.items():
            if req.finish_reason is not None:
                continue  # ended earlier in this step
            if isinstance(token, Exception):
                self.finish(req, "error", token)
                continue
            try:
                self._append(req, token, result.logprobs.get(req))
            except Exception as e:  # e.g. its detokenisation or stop strings
                log.exception("request %s failed after its token", req.request_id)
                error = RequestFailed(f"could not finish the step: {type(e).__name__}: {e}")
                self.finish(req, "error", error)

    def _store_prefix(self, row: Row) -> None:
        try:
            self.prefix_cache.store(row.prefix_key, row.request.prompt_ids, row.slot, row.length)
        except Exception:  # the cache is an optimisation: never fail a request over it
            log.exception("could not store a prompt prefix; clearing the prefix cache")
            self.prefix_cache.clear()

    def _append(self, req: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        p = req.params
        req.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        reason, text = None, ""
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        else:
            text = req.detok.add(token)
            if req.detok.stopped:
                reason = "stop"
            elif len(req.output_ids) >= p.max_tokens:
                reason = "length"
            elif len(req.prompt_ids) + len(req.output_ids) >= self.config.max_model_len:
                reason = "length"
        first = len(req.output_ids) == 1
        out = RequestOutput(
            req.request_id,
            text,
            [token],
            logprobs=[logprobs] if p.logprobs is not None else None,
            prompt_logprobs=req.prompt_logprobs if first else None,
        )
        if first and req.echo:
            out.prompt_text = self.tokenizer.decode(req.prompt_ids)
        named = [*(out.logprobs or []), *(out.prompt_logprobs or [])]
        if any(named):
            ids = {i for lp in named if lp is not None for i in (lp.token, *(t for t, _ in lp.top))}
            out.token_text = {i: self.tokenizer.decode([i]) for i in ids}
        if reason is None:
            out.prompt_tokens, out.completion_tokens = len(req.prompt_ids), len(req.output_ids)
            self._outbox.append(out)
        else:
            self.finish(req, reason, last=out)

    def finish(
        self,
        req: Request,
        reason: str,
        error: Exception | None = None,
        last: RequestOutput | None = None,
    ) -> None:
        """End a request (stop, length, abort, error): free its rows and adapter pin at once and
        put its final output — `last`, the step's output, when the request ends with a token —
        in the outbox. Its rows are scrubbed (KVCache.scrub): whatever its forward left in them
        (NaN/inf K/V of an adapter that overflowed) must never reach the next occupant."""
        if req.finish_reason is not None:
            return  # ended already: a request ends exactly once
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        for row in req.rows:  # an error may leave writes past the row's length: all of it
            self.cache.scrub(row.slot, None if reason == "error" else row.length)
            self.cache.remove(row)
        req.rows = []
        if req.adapter_pinned:
            self.adapters.unpin(req.adapter)
            req.adapter_pinned = False
        req.finish_reason = reason
        self.stats["finished_requests"] += 1
        self.stats["failed_requests"] += error is not None
        out = last or RequestOutput(req.request_id, "", [])
        if error is None and req.detok is not None:
            out.text += req.detok.flush()
        out.finished, out.finish_reason, out.error = True, reason, error
        out.prompt_tokens, out.completion_tokens = len(req.prompt_ids), len(req.output_ids)
        self._outbox.append(out)
