"""The engine: one base model, adapter slots, a KV cache, and iteration-level batching.

`step()` reads as the algorithm: admit waiting requests into rows → plan the step (every
prefilled request decodes one token; prompts are prefilled in chunks under a token budget,
reusing cached prefixes) → one forward pass over all of it → select each ready request's
token (CoLD pairs contrast their expert and amateur rows) → append, stop, free.

A CoLD request holds two rows — expert (its adapter) and amateur (adapter -1) — that share one
token stream. Rows are found by identity, never by slot arithmetic; slots move only between
steps. Whatever goes wrong for one request fails that request alone (docs/design.md §8).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from cold_ray import device as devices
from cold_ray.adapters.slots import AdapterSlots
from cold_ray.adapters.sources import AdapterResolver, AdapterSource
from cold_ray.config import EngineConfig
from cold_ray.decoding import ColdParams, SamplingParams, request_cold
from cold_ray.engine import batch as step_batch
from cold_ray.engine.adapter_loader import AdapterLoader
from cold_ray.engine.detok import IncrementalDetokenizer, byte_fallback_ids
from cold_ray.engine.graphs import DecodeGraphs
from cold_ray.engine.kv_cache import KVCache, Row
from cold_ray.engine.prefix_cache import BASE, PrefixCache
from cold_ray.engine.request import (
    EngineError,
    Request,
    RequestFailed,
    RequestOutput,
    RequestTimeout,
)
from cold_ray.engine.sampling import (
    FAILED,
    SamplingError,
    cold_select,
    new_sampler_state,
    sample_rows,
)
from cold_ray.engine.scheduler import Scheduler, StepPlan
from cold_ray.kernels import select_backend
from cold_ray.model.llama import ForwardBatch, LlamaModel, PrefillAttention
from cold_ray.model.loader import load_weights, read_model_args, resolve_model_path

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, resolver: AdapterResolver | None = None):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = devices.resolve(config.device)
        path = resolve_model_path(config.model)
        self.model_path = path
        self.args = read_model_args(path)
        if config.max_model_len > self.args.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.args.max_position_embeddings}"
            )
        if self.args.sliding_window and config.max_model_len > self.args.sliding_window:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the sliding window "
                f"{self.args.sliding_window}; sliding-window attention is not implemented"
            )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = LlamaModel(self.args, config.max_loras, config.max_lora_rank, config.max_model_len)
        load_weights(model, path)
        self.model = model.to(device=self.device, dtype=config.torch_dtype).eval()
        self.dtype = config.torch_dtype
        attention, small_gemm, rowwise = self._cpu_kernels(config)
        if config.packed_weights:
            self.model.pack_cpu_weights(small_batch=config.small_batch_weights,
                                        small_gemm=small_gemm)  # fmt: skip
        self.model.init_rope()
        self.backend = select_backend(config.lora_backend, self.device)
        self.model.set_backend(self.backend)
        if small_gemm is not None and self.backend.use_cpu_kernel(small_gemm):
            log.info("LoRA of up to %d rows of an adapter: C kernel", small_gemm.MAX_LORA_ROWS)
        self.model.set_decode_kernel(attention)
        self.model.set_rowwise_kernels(rowwise)
        self.cache = KVCache.allocate(
            self.args, config.max_rows, config.max_model_len, config.torch_dtype, self.device
        )
        self.graphs = self._decode_graphs(config)
        self.prefix_cache = (
            PrefixCache(self.cache, config.prefix_cache_bytes, config.prefix_block_size)
            if config.prefix_cache_bytes
            else None
        )
        self.slots = AdapterSlots(self.model, config.max_loras, config.host_cache_bytes)
        byte_fallback_ids(self.tokenizer)  # scanned once here, not on the first request
        self.eos_ids = set(self.args.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        self.scheduler = Scheduler(config.max_prefill_tokens, config.request_timeout_s)
        self.driven_by_thread = False  # set by AsyncEngine: only its thread may step()
        self.stats = {"generated_tokens": 0, "steps": 0, "cold_requests": 0, "plain_requests": 0,
                      "adapter_load_seconds": 0.0, "finished_requests": 0,
                      "failed_requests": 0, "prefill_tokens": 0}  # fmt: skip
        self.adapters = AdapterLoader(self.args, config, self.slots, resolver, self.stats)

    def _cpu_kernels(self, config: EngineConfig):
        """The compiled CPU kernels this engine uses: (decode attention, small GEMM, row-wise
        ops), each None where it is turned off or cannot be built. One thread, fp32."""
        if not (self.device.type == "cpu" and self.dtype == torch.float32
                and torch.get_num_threads() == 1):  # fmt: skip
            return None, None, None
        from cold_ray.kernels import cpu_attention, cpu_gemm, cpu_rowwise

        attention = cpu_attention.load() if config.cpu_attention_kernel else None
        small_gemm = cpu_gemm.load() if config.cpu_gemm_kernel else None
        rowwise = cpu_rowwise.load() if config.cpu_rowwise_kernels else None
        if config.cpu_attention_kernel:
            log.info("decode attention: %s", "C kernel" if attention else "torch SDPA")
        if config.cpu_gemm_kernel and config.small_batch_weights and config.packed_weights:
            log.info("decode-sized products: %s", "C kernel" if small_gemm else "BLAS")
        if config.cpu_rowwise_kernels:
            log.info("norms, rotary embedding, SiLU: %s", "C kernels" if rowwise else "torch")
        return attention, small_gemm, rowwise

    def _decode_graphs(self, config: EngineConfig) -> DecodeGraphs | None:
        """Decode steps captured as graphs where the device and the LoRA backend allow it."""
        if not config.graph_capture or devices.graph_api(self.device) is None:
            return None
        if not self.backend.graph_safe:
            log.info("decode steps run eagerly: the %s LoRA backend cannot be captured",
                     self.backend.name)  # fmt: skip
            return None
        try:
            return DecodeGraphs(self.model, self.cache, self.backend, config.max_rows,
                                config.max_model_len, config.max_loras)  # fmt: skip
        except Exception:  # a speed-up only: serve eagerly rather than not at all
            log.exception("decode graphs could not be captured; every step runs eagerly")
            return None

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def rows(self) -> list[Row]:
        """Rows holding a KV slot, in slot order."""
        return sorted(self.cache.rows, key=lambda r: r.slot)

    @property
    def free_rows(self) -> int:
        return self.cache.free_slots

    # ---- adapters -------------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | Path, cold: ColdParams | None = None):
        """Make an adapter known by name (a script's stand-in for the registry)."""
        self.adapters.register(name, path, cold)

    def adapter_source(self, name: str) -> AdapterSource:
        return self.adapters.source(name)

    def default_cold(self, adapter: str | None) -> ColdParams | None:
        """The CoLD knobs for a request on `adapter` that does not set them (the one rule in
        `cold_ray.decoding.request_cold`); None means plain decoding."""
        return request_cold(self.adapter_source(adapter) if adapter is not None else None)

    def load_adapter(self, name: str) -> int:
        """Load an adapter now (blocking) and return its slot; for scripts and tests."""
        return self.adapters.load_now(name)

    # ---- requests -------------------------------------------------------------------------

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        cold: ColdParams | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate and tokenize; raises EngineError / UnknownAdapterError naming the problem."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if not prompt.strip():
                raise EngineError("prompt is empty")
            ids = self.tokenizer.encode(prompt)  # with BOS where the model wants one (Llama)
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < self.args.vocab_size for t in ids):
                raise EngineError(
                    f"prompt token ids must be integers in [0, {self.args.vocab_size})"
                )
        if not ids:
            raise EngineError("prompt is empty")
        if len(ids) >= self.config.max_model_len:
            raise EngineError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.config.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        if adapter is not None:
            self.adapter_source(adapter)  # unknown adapter -> UnknownAdapterError now, not later
        if cold is not None and adapter is None:
            raise EngineError("CoLD needs an adapter: the base model cannot contrast with itself")
        req = Request(ids, params, adapter, cold)
        if request_id is not None:
            req.request_id = request_id
        req.detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        req.sampler = new_sampler_state(params)
        return req

    def add(self, req: Request) -> None:
        req.arrived = time.monotonic()
        self.scheduler.add(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        for req in list(self.waiting) + self.running:
            if req.request_id == request_id:
                return self._finish(req, "abort")
        return None

    def fail_running(self, error: Exception) -> list[RequestOutput]:
        """Fail every running request (their rows' state is unknown after an unexpected error
        in the step); waiting requests keep waiting."""
        return [self._finish(req, "error", error) for req in list(self.running)]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        self.cache.compact()  # between steps: rows move only here
        for req in self.scheduler.expired():
            error = RequestTimeout(
                f"request waited {time.monotonic() - req.arrived:.0f} s without being scheduled "
                f"(request_timeout_s is {self.config.request_timeout_s:g})"
            )
            outputs.append(self._finish(req, "error", error))
        self.scheduler.admit(self.free_rows, lambda r: self._place(r, outputs))
        plan = self.scheduler.plan(self._reuse_prefix)
        if plan:
            outputs += self._run(plan)
        self.stats["steps"] += 1
        return outputs

    def _place(self, req: Request, outputs: list[RequestOutput]) -> bool:
        """Give a request its rows — expert (or plain) first, then the amateur — once its
        adapter is resident; False while it is not (a load may have started)."""
        if req.adapter is not None:
            try:
                if not self.adapters.ensure(req.adapter):
                    return False
            except Exception as e:  # unknown by now, or its files do not load: its requests fail
                for other in [r for r in self.waiting if r.adapter == req.adapter]:
                    outputs.append(self._finish(other, "error", e))
                return False
        adapter_slot = -1
        if req.adapter is not None:
            adapter_slot = self.slots.acquire(req.adapter)
            req.adapter_pinned = True
        identity = BASE if adapter_slot < 0 else (req.adapter, self.slots.versions[req.adapter])
        for a, key in [(adapter_slot, identity)] + ([(-1, BASE)] if req.cold else []):
            row = Row(req, a, prefix_key=key)
            self.cache.add(row)
            req.rows.append(row)
        self.stats["cold_requests" if req.cold else "plain_requests"] += 1
        return True

    def _reuse_prefix(self, req: Request) -> None:
        """Copy each row's longest cached prompt prefix into its slot (at least the last prompt
        token is always computed: its hidden state gives the first token)."""
        if self.prefix_cache is None:
            return
        for row in req.rows:
            limit = len(req.prompt_ids) - 1
            row.length = self.prefix_cache.load(row.prefix_key, req.prompt_ids, row.slot, limit)

    def _run(self, plan: StepPlan) -> list[RequestOutput]:
        """Forward, select, append. A failure of the forward or of a batched selection fails
        the requests it involves, and only those."""
        try:
            if self.graphs is not None and self.graphs.fits(plan):
                hidden = self.graphs.run(plan)
                out_rows = {row: row.slot for row in plan.decode}
            else:
                tokens, fb, out_rows = step_batch.build(plan, self.backend, self.device,
                                                         self.dtype)  # fmt: skip
                hidden = self.model(tokens, self.cache, fb)
        except Exception as e:
            log.exception("forward pass failed; failing the %d requests in it", len(plan.requests))
            error = RequestFailed(f"the engine's forward pass failed: {type(e).__name__}: {e}")
            return [self._finish(req, "error", error) for req in plan.requests]
        for row in plan.decode:
            row.length += 1
        for chunk in plan.prefill:
            chunk.row.length += len(chunk.tokens)
            if self.prefix_cache is not None:  # after every chunk: a request starting while
                self._store_prefix(chunk.row)  # this one still prefills reuses its blocks
        self.stats["prefill_tokens"] += sum(len(c.tokens) for c in plan.prefill)
        return self._select(plan.ready, hidden, out_rows)

    def _store_prefix(self, row: Row) -> None:
        try:
            self.prefix_cache.store(row.prefix_key, row.request.prompt_ids, row.slot, row.length)
        except Exception:  # the cache is an optimisation: never fail a request over it
            log.exception("could not store a prompt prefix; clearing the prefix cache")
            self.prefix_cache.clear()

    def _select(self, ready: list[Request], hidden, out_rows: dict) -> list[RequestOutput]:
        """Each ready request's next token from its rows' final hidden states (by row)."""
        outputs: list[RequestOutput] = []
        plain = [q for q in ready if q.cold is None]
        cold = [q for q in ready if q.cold is not None]
        picks: dict[Request, int] = {}
        for group, pick in ((plain, self._pick_plain), (cold, self._pick_cold)):
            if not group:
                continue
            try:
                picks.update(zip(group, pick(group, hidden, out_rows)))
            except Exception as e:
                log.exception("token selection failed for %d requests", len(group))
                error = RequestFailed(f"token selection failed: {type(e).__name__}: {e}")
                outputs += [self._finish(q, "error", error) for q in group]
        for req, token in picks.items():
            if token == FAILED:
                outputs.append(self._finish(req, "error", SamplingError()))
                continue
            try:
                outputs.append(self._append(req, token))
            except Exception as e:  # e.g. its detokenisation or stop strings
                log.exception("request %s failed after its token", req.request_id)
                error = RequestFailed(f"could not finish the step: {type(e).__name__}: {e}")
                outputs.append(self._finish(req, "error", error))
        return outputs

    def _pick_plain(self, reqs: list[Request], hidden, out_rows: dict) -> list[int]:
        h = hidden[[out_rows[q.rows[0]] for q in reqs]]
        return sample_rows(self.model.logits(h), None, [q.params for q in reqs],
                           [q.sampler for q in reqs], [len(q.output_ids) for q in reqs])  # fmt: skip

    def _pick_cold(self, reqs: list[Request], hidden, out_rows: dict) -> list[int]:
        expert = hidden[[out_rows[q.rows[0]] for q in reqs]]
        amateur = hidden[[out_rows[q.rows[1]] for q in reqs]]
        return cold_select(self.backend, self.model.lm_weight, self.model.logits(expert),
                           amateur, [q.cold for q in reqs], [q.params for q in reqs],
                           [q.sampler for q in reqs], [len(q.output_ids) for q in reqs])  # fmt: skip

    def _append(self, req: Request, token: int) -> RequestOutput:
        p = req.params
        req.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        reason = None
        text = ""
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
        if reason is None:
            return RequestOutput(req.request_id, text, [token],
                                 prompt_tokens=len(req.prompt_ids),
                                 completion_tokens=len(req.output_ids))  # fmt: skip
        out = self._finish(req, reason)
        out.text = text + out.text
        out.token_ids = [token]
        return out

    def _finish(self, req: Request, reason: str, error: Exception | None = None) -> RequestOutput:
        """End a request (stop, length, abort, error): free its rows and slot pin at once."""
        if req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
        if req in self.scheduler.running:
            self.scheduler.running.remove(req)
        for row in req.rows:
            self.cache.remove(row)
        req.rows = []
        if req.adapter_pinned:
            self.slots.release(req.adapter)
            req.adapter_pinned = False
        req.finish_reason = reason
        self.stats["finished_requests"] += 1
        tail = ""
        if error is None and req.detok is not None:
            tail = req.detok.flush()
        else:
            self.stats["failed_requests"] += error is not None
        return RequestOutput(req.request_id, tail, [], finished=True, finish_reason=reason,
                             prompt_tokens=len(req.prompt_ids),
                             completion_tokens=len(req.output_ids), error=error)  # fmt: skip

    # ---- convenience ----------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        cold: ColdParams | None = None,
    ) -> list[dict]:
        """Run prompts to completion (blocking); one dict per prompt, in order."""
        if self.driven_by_thread:
            raise EngineError("this engine is driven by an AsyncEngine's thread; use submit()")
        reqs = [self.make_request(p, params, adapter, cold) for p in prompts]
        done: dict[str, RequestOutput] = {}
        texts = {r.request_id: [] for r in reqs}
        for r in reqs:
            self.add(r)
        while len(done) < len(reqs):
            for out in self.step():
                if out.request_id not in texts:
                    continue
                texts[out.request_id].append(out.text)
                if out.finished:
                    if out.error is not None:
                        raise out.error
                    done[out.request_id] = out
        return [self._result(r, "".join(texts[r.request_id]), done[r.request_id]) for r in reqs]

    @staticmethod
    def _result(req: Request, text: str, out: RequestOutput) -> dict:
        return {
            "text": text,
            "token_ids": list(req.output_ids),
            "finish_reason": out.finish_reason,
            "decoding": req.decoding,
            "alpha": req.cold.alpha if req.cold else None,
            "beta": req.cold.beta if req.cold else None,
            "adapter": req.adapter,
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.output_ids),
        }

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits at every position of a sequence, [T, V] (scoring, tests); uses a free slot's
        cache as scratch space between steps."""
        if self.free_rows < 1:
            raise EngineError("no free row to score a sequence")
        t = len(token_ids)
        slot = self.cache.peek_free()
        adapter_slot = self.load_adapter(adapter) if adapter is not None else -1
        positions = torch.arange(t, device=self.device)
        fb = ForwardBatch(
            positions=positions,
            slots=torch.full((t,), slot, device=self.device),
            lora=self.backend.prepare([adapter_slot] * t) if adapter_slot >= 0 else None,
            decode=None,
            prefill=PrefillAttention(0, None, None, None, None, fresh=True),
            out_index=positions,
        )
        tokens = torch.tensor(token_ids, device=self.device)
        return self.model.logits(self.model(tokens, self.cache, fb))

    def kv_usage(self) -> float:
        return self.cache.usage()

    def shutdown(self) -> None:
        self.adapters.shutdown()
