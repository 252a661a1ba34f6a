"""The engine: one base model, adapter slots, a KV cache, and iteration-level batching.

Each `step()` admits waiting requests (prefill), then decodes one token for every running
request in a single forward pass over all rows. A CoLD request holds two rows — expert
(its adapter) and amateur (adapter -1) — that share one token stream. Rows always occupy
cache slots 0..n-1, so decode attention reads the cache through a view, with no gather.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from cold_ray import device as devices
from cold_ray.adapters.peft import load_peft_adapter
from cold_ray.adapters.slots import AdapterSlots, PackedAdapter, background_priority
from cold_ray.adapters.sources import AdapterResolver, AdapterSource
from cold_ray.config import EngineConfig
from cold_ray.decoding import ColdParams, SamplingParams, request_cold
from cold_ray.engine.detok import IncrementalDetokenizer
from cold_ray.engine.request import (
    EngineError,
    Request,
    RequestOutput,
    Row,
    UnknownAdapterError,
)
from cold_ray.engine.sampling import cold_select, sample_rows
from cold_ray.kernels import select_backend
from cold_ray.model.llama import ForwardBatch, KVCache, LlamaModel
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
        self.model.init_rope()
        self.backend = select_backend(config.lora_backend, self.device)
        self.model.set_backend(self.backend)
        self.cache = KVCache.allocate(
            self.args, config.max_rows, config.max_model_len, config.torch_dtype, self.device
        )
        self.slots = AdapterSlots(self.model, config.max_loras, config.host_cache_adapters)
        self.eos_ids = set(self.args.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        self._sources: dict[str, AdapterSource] = {}
        self.resolver = resolver or self._sources.__getitem__
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.rows: list[Row] = []
        self.driven_by_thread = False  # set by AsyncEngine: only its thread may step()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load",
                                          initializer=background_priority)  # fmt: skip
        self._loading: dict[str, tuple[Future, float]] = {}  # name -> (read, started)
        self.stats = {"generated_tokens": 0, "steps": 0, "cold_requests": 0, "plain_requests": 0,
                      "adapter_load_seconds": 0.0, "finished_requests": 0}  # fmt: skip

    # ---- adapters -------------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | Path, cold: ColdParams | None = None):
        """Make an adapter known by name (a script's stand-in for the registry)."""
        self._sources[name] = AdapterSource(str(path), cold=cold)
        self.slots.forget(name)

    def adapter_source(self, name: str) -> AdapterSource:
        try:
            return self.resolver(name)
        except KeyError as e:
            raise UnknownAdapterError(f"adapter {name!r} does not exist") from e

    def default_cold(self, adapter: str | None) -> ColdParams | None:
        """The CoLD knobs for a request on `adapter` that does not set them (the one rule in
        `cold_ray.decoding.request_cold`); None means plain decoding."""
        return request_cold(self.adapter_source(adapter) if adapter is not None else None)

    def _read_adapter(self, name: str, source: AdapterSource) -> PackedAdapter:
        """Fetch, validate and lay out an adapter; runs in the load thread, off the step loop."""
        if source.prepare is not None:
            source.prepare()
        adapter = load_peft_adapter(
            source.path,
            self.args,
            self.config.max_lora_rank,
            max_bytes=self.config.max_adapter_bytes,
            expected_sha256=source.sha256,
        )
        return self.slots.pack(adapter)

    def load_adapter(self, name: str) -> int:
        """Load an adapter now (blocking) and return its slot; for scripts and tests."""
        source = self.adapter_source(name)
        self.slots.current(name, source.sha256)
        slot = self.slots.lookup(name)
        if slot is None:
            t0 = time.perf_counter()
            adapter = self.slots.cached(name) or self._read_adapter(name, source)
            slot = self.slots.install(name, adapter)
            self.stats["adapter_load_seconds"] += time.perf_counter() - t0
        return slot

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
        if not params.greedy:
            req.generator = torch.Generator(device="cpu")
            req.generator.manual_seed(
                params.seed if params.seed is not None else torch.seed() & 0xFFFF_FFFF
            )
        return req

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return self._finish_output(req, "abort")
        for req in self.running:
            if req.request_id == request_id:
                self._free(req)
                return self._finish_output(req, "abort")
        return None

    def fail_all(self, error: Exception) -> list[RequestOutput]:
        """Finish every request with `error` and free all rows (after an unexpected failure)."""
        outputs = []
        for req in list(self.running) + list(self.waiting):
            if req in self.waiting:
                self.waiting.remove(req)
            self._free(req)
            out = self._finish_output(req, "error")
            out.error = error
            outputs.append(out)
        return outputs

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def free_rows(self) -> int:
        return self.config.max_rows - len(self.rows)

    # ---- the step -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for req in self._admit(outputs):
            outputs += self._prefill(req)
        if self.running:  # every row, the just-prefilled ones too, decodes one token
            outputs += self._decode(list(self.running))
        self.stats["steps"] += 1
        return outputs

    def _admit(self, outputs: list[RequestOutput]) -> list[Request]:
        """Move waiting requests into rows while rows and adapter slots allow (FIFO)."""
        admitted = []
        budget = self.config.max_prefill_tokens
        for req in list(self.waiting):
            if req.finish_reason is not None:
                continue  # failed earlier in this pass (its adapter did not load)
            if req.num_rows > self.free_rows:
                break  # head-of-line: later requests must not starve a CoLD pair
            cost = req.num_rows * len(req.prompt_ids)
            if admitted and cost > budget:
                break  # prefill budget spent: running rows decode now, the rest next step
            if req.adapter is not None and not self._ensure_adapter(req, outputs):
                continue
            self.waiting.remove(req)
            admitted.append(req)
            budget -= cost
            if req.adapter is not None:
                self.slots.acquire(req.adapter)
                req.adapter_pinned = True
            adapter_slot = self.slots.lookup(req.adapter) if req.adapter is not None else -1
            # expert row (or the plain row) first; the amateur row has no adapter
            slots = [adapter_slot] + ([-1] if req.cold is not None else [])
            for a in slots:
                row = Row(req, a, slot=len(self.rows))
                self.rows.append(row)
                req.rows.append(row)
            self.running.append(req)
            self.stats["cold_requests" if req.cold else "plain_requests"] += 1
        return admitted

    def _ensure_adapter(self, req: Request, outputs: list[RequestOutput]) -> bool:
        """True when req's adapter is resident; otherwise start or finish its load off-thread."""
        name = req.adapter
        try:
            source = self.adapter_source(name)
        except UnknownAdapterError as e:  # removed from the registry while the request waited
            self._fail(req, e, outputs)
            return False
        if not self.slots.current(name, source.sha256):
            return False  # replaced in the registry; rows still run the old version: wait
        if self.slots.lookup(name) is not None:
            return True
        cached = self.slots.cached(name)
        if cached is not None:  # in host memory: no file read, just wait for a free slot
            if not self.slots.has_room():
                return False
            self.slots.install(name, cached)
            return True
        fut = self._loading.get(name)
        if fut is None:
            fut = self._loader.submit(self._read_adapter, name, source)
            self._loading[name] = (fut, time.perf_counter())
            return False
        fut, started = fut
        if not fut.done() or not self.slots.has_room():
            return False  # every slot is pinned by running rows: wait, do not fail
        del self._loading[name]
        try:
            adapter = fut.result()
        except Exception as e:  # a bad adapter fails its own requests only
            for other in [r for r in self.waiting if r.adapter == name]:
                self._fail(other, e, outputs)
            return False
        self.slots.install(name, adapter)
        self.stats["adapter_load_seconds"] += time.perf_counter() - started
        return True

    def _fail(self, req: Request, error: Exception, outputs: list[RequestOutput]) -> None:
        self.waiting.remove(req)
        out = self._finish_output(req, "error")
        out.error = error
        outputs.append(out)

    def _prefill(self, req: Request) -> list[RequestOutput]:
        n, t = len(req.rows), len(req.prompt_ids)
        tokens = torch.tensor([req.prompt_ids] * n, device=self.device)
        idx = torch.tensor([r.adapter_slot for r in req.rows], device=self.device)
        fb = ForwardBatch(
            positions=torch.arange(t, device=self.device).expand(n, t),
            slots=torch.tensor([r.slot for r in req.rows], device=self.device),
            lora=self._lora_batch(idx.repeat_interleave(t)),
            prefill=True,
        )
        hidden = self.model(tokens, self.cache, fb)[:, -1]
        for row in req.rows:
            row.length = t
        return self._select([req], hidden, base=req.rows[0].slot)

    def _decode(self, reqs: list[Request]) -> list[RequestOutput]:
        rows = self.rows  # every running row, in slot order 0..n-1
        n = len(rows)
        lengths = [r.length for r in rows]
        pos = torch.tensor(lengths, device=self.device)
        span = max(lengths) + 1
        fb = ForwardBatch(
            positions=pos.unsqueeze(1),
            slots=torch.arange(n, device=self.device),
            lora=self._lora_batch(torch.tensor([r.adapter_slot for r in rows], device=self.device)),
            prefill=False,
            attn_mask=(torch.arange(span, device=self.device) <= pos.unsqueeze(1)).view(
                n, 1, 1, span
            ),
            contiguous_slots=True,
        )
        tokens = torch.tensor([[r.request.output_ids[-1]] for r in rows], device=self.device)
        hidden = self.model(tokens, self.cache, fb)[:, 0]
        for r in rows:
            r.length += 1
        return self._select(reqs, hidden, base=0)

    def _lora_batch(self, idx: torch.Tensor):
        return self.backend.prepare(idx) if bool((idx >= 0).any()) else None

    def _select(self, reqs: list[Request], hidden: torch.Tensor, base: int) -> list[RequestOutput]:
        """Pick each request's next token from its rows' final hidden states.

        hidden: [rows, hidden], where a row in cache slot s is hidden[s - base].
        """
        plain = [q for q in reqs if q.cold is None]
        cold = [q for q in reqs if q.cold is not None]
        chosen: dict[str, int] = {}
        if plain:
            h = hidden[[q.rows[0].slot - base for q in plain]]
            picks = sample_rows(self.model.logits(h), None, [q.params for q in plain],
                                [q.generator for q in plain])  # fmt: skip
            chosen.update(zip((q.request_id for q in plain), picks))
        if cold:
            expert = hidden[[q.rows[0].slot - base for q in cold]]
            amateur = hidden[[q.rows[1].slot - base for q in cold]]
            picks = cold_select(self.backend, self.model.lm_weight, self.model.logits(expert),
                                amateur, [q.cold for q in cold], [q.params for q in cold],
                                [q.generator for q in cold])  # fmt: skip
            chosen.update(zip((q.request_id for q in cold), picks))
        return [self._append(q, chosen[q.request_id]) for q in reqs]

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
        self._free(req)
        out = self._finish_output(req, reason)
        out.text = text + out.text
        out.token_ids = [token]
        return out

    def _finish_output(self, req: Request, reason: str) -> RequestOutput:
        req.finish_reason = reason
        self.stats["finished_requests"] += 1
        tail = req.detok.flush() if req.detok is not None and reason != "error" else ""
        return RequestOutput(req.request_id, tail, [], finished=True, finish_reason=reason,
                             prompt_tokens=len(req.prompt_ids),
                             completion_tokens=len(req.output_ids))  # fmt: skip

    def _free(self, req: Request) -> None:
        """Release a request's rows and cache at once, keeping rows contiguous."""
        if req in self.running:
            self.running.remove(req)
        for row in sorted(req.rows, key=lambda r: r.slot, reverse=True):
            last = self.rows.pop()
            if last is not row:  # move the last row into the hole
                self.cache.move_slot(last.slot, row.slot, last.length)
                last.slot = row.slot
                self.rows[row.slot] = last
        req.rows = []
        if req.adapter_pinned:
            self.slots.release(req.adapter)
            req.adapter_pinned = False

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
        done: dict[str, dict] = {}
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
        """Logits at every position of a sequence, [T, V] (scoring, tests); uses a free row."""
        if self.free_rows < 1:
            raise EngineError("no free row to score a sequence")
        t = len(token_ids)
        slot = self.load_adapter(adapter) if adapter is not None else -1
        fb = ForwardBatch(
            positions=torch.arange(t, device=self.device).unsqueeze(0),
            slots=torch.tensor([len(self.rows)], device=self.device),
            lora=self._lora_batch(torch.full((t,), slot, device=self.device)),
            prefill=True,
        )
        tokens = torch.tensor([token_ids], device=self.device)
        return self.model.logits(self.model(tokens, self.cache, fb)[0])

    def kv_usage(self) -> float:
        return len(self.rows) / self.config.max_rows

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
