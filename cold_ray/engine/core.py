"""The engine: a scheduler and a model runner over one base model, stepped one batch at a time.

    plan = scheduler.schedule()          # admit, expire, plan prefill chunks and decode rows
    tokens = runner.execute(plan)        # one forward pass, then each ready request's token
    scheduler.postprocess(plan, tokens)  # append, stop, finish, free
    return scheduler.take_outputs()

A CoLD request holds two rows — expert (its adapter) and amateur (adapter -1) — that share one
token stream. Rows are found by identity, never by slot arithmetic; slots move only between
steps. Whatever goes wrong for one request fails that request alone, and every output a step
produced is returned, whatever failed after it (docs/design.md §8, §9).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from cold_ray.adapters.slots import AdapterSlots
from cold_ray.adapters.sources import AdapterResolver, AdapterSource
from cold_ray.config import EngineConfig
from cold_ray.decoding import ColdParams, GenerationRequest, SamplingParams, request_cold
from cold_ray.engine.adapter_loader import AdapterLoader
from cold_ray.engine.detok import IncrementalDetokenizer, byte_fallback_ids
from cold_ray.engine.prefix_cache import PrefixCache
from cold_ray.engine.request import ContextLengthError, EngineError, Request, RequestOutput
from cold_ray.engine.runner import ModelRunner
from cold_ray.engine.sampling import new_sampler_state
from cold_ray.engine.scheduler import Scheduler
from cold_ray.model.loader import read_model_args, resolve_model_path

log = logging.getLogger(__name__)


def load_chat_template(value: str | None) -> str | None:
    """A Jinja template given inline, or the contents of the file it names."""
    if value is None or "{" in value:
        return value
    return Path(value).expanduser().read_text()


class EngineCore:
    def __init__(self, config: EngineConfig, resolver: AdapterResolver | None = None):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.model_path = resolve_model_path(config.model)
        self.args = read_model_args(self.model_path)
        config.check_model(self.args)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.chat_template = load_chat_template(config.chat_template)
        byte_fallback_ids(self.tokenizer)  # scanned once here, not on the first request
        self.runner = ModelRunner(config, self.args, self.model_path)
        self.stats = {
            "generated_tokens": 0,
            "steps": 0,
            "cold_requests": 0,
            "plain_requests": 0,
            "adapter_load_seconds": 0.0,
            "finished_requests": 0,
            "failed_requests": 0,
            "prefill_tokens": 0,
        }
        self.slots = AdapterSlots(self.runner.model, config.max_loras, config.host_cache_bytes)
        self.adapters = AdapterLoader(self.args, config, self.slots, resolver, self.stats)
        self.prefix_cache = (
            PrefixCache(self.runner.cache, config.prefix_cache_bytes, config.prefix_block_size)
            if config.prefix_cache_bytes
            else None
        )
        self.scheduler = Scheduler(
            config, self.runner.cache, self.adapters, self.prefix_cache, self.tokenizer, self.stats
        )
        self.driven_by_thread = False  # set by AsyncEngine: only its thread may step()

    # ---- the step -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        try:
            plan = self.scheduler.schedule()
            if plan:
                self.scheduler.postprocess(plan, self.runner.execute(plan))
        except Exception as e:  # a bug outside any one request: those in flight end
            log.exception("engine step failed; failing the running requests")
            self.scheduler.fail_running(e)
        self.stats["steps"] += 1
        return self.scheduler.take_outputs()

    # ---- requests -------------------------------------------------------------------------

    def make_request(
        self,
        request: GenerationRequest | str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        cold: ColdParams | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Tokenize a request and check what only the model knows — its vocabulary, its
        context, the adapters it serves; raises EngineError (ContextLengthError) or
        UnknownAdapterError naming the problem. Scripts may pass a prompt and the knobs
        instead of a GenerationRequest."""
        if not isinstance(request, GenerationRequest):
            extra = {"request_id": request_id} if request_id is not None else {}
            request = GenerationRequest(
                request if isinstance(request, str) else tuple(request),
                params or SamplingParams(),
                adapter,
                cold,
                **extra,
            )
        ids = self._tokenize(request)
        room = self.config.max_model_len - len(ids)
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; this model's context is "
                f"{self.config.max_model_len} tokens (prompt plus at least one generated token)"
            )
        params = request.params
        if params.max_tokens is None:
            params = replace(params, max_tokens=min(self.config.default_max_tokens, room))
        elif params.max_tokens > room:
            raise ContextLengthError(
                f"this model's context is {self.config.max_model_len} tokens; the prompt has "
                f"{len(ids)} and max_tokens asks for {params.max_tokens} more: shorten the "
                "prompt or lower max_tokens"
            )
        if request.adapter is not None:
            self.adapters.source(request.adapter)  # unknown adapter -> UnknownAdapterError now
        req = Request(ids, params, request.adapter, request.cold, request.request_id)
        req.cache_salt, req.echo = request.cache_salt, request.echo
        req.detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        req.sampler = new_sampler_state(params)
        return req

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(
                    [dict(m) for m in request.messages],
                    tokenize=False,
                    add_generation_prompt=True,
                    chat_template=self.chat_template,
                )
            except Exception as e:  # no template, or the template refused the messages
                raise EngineError(
                    f"cannot apply the chat template: {e}; configure chat_template in the "
                    "engine's config if the model has none"
                ) from e
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(request.prompt, str):
            if not request.prompt.strip():
                raise EngineError("prompt is empty")
            return self.tokenizer.encode(request.prompt)  # BOS where the model wants one
        ids = list(request.prompt)
        vocab = self.args.vocab_size
        if not ids:
            raise EngineError("prompt is empty")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise EngineError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def add(self, req: Request) -> None:
        self.scheduler.add(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.scheduler.abort(request_id)

    def fail_running(self, error: Exception) -> list[RequestOutput]:
        """Fail every running request; waiting requests keep waiting."""
        self.scheduler.fail_running(error)
        return self.scheduler.take_outputs()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

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

    # ---- views ----------------------------------------------------------------------------

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def model(self):
        return self.runner.model

    @property
    def cache(self):
        return self.runner.cache

    @property
    def backend(self):
        return self.runner.backend

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def rows(self) -> list:
        """Rows holding a KV slot, in slot order."""
        return sorted(self.runner.cache.rows, key=lambda r: r.slot)

    @property
    def free_rows(self) -> int:
        return self.runner.cache.free_slots

    def kv_usage(self) -> float:
        return self.runner.cache.usage()

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

    def prompt_logits(self, token_ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits at every position of a sequence, [T, V] (scoring, tests); uses a free slot's
        cache as scratch space between steps."""
        if self.free_rows < 1:
            raise EngineError("no free row to score a sequence")
        adapter_slot = self.load_adapter(adapter) if adapter is not None else -1
        return self.runner.prompt_logits(token_ids, self.cache.peek_free(), adapter_slot)

    def shutdown(self) -> None:
        self.adapters.shutdown()
