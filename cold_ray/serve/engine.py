"""The engine deployment: one `AsyncEngine` per replica, pinned to the device Ray assigned.

The ingress calls `generate` through a DeploymentHandle with `multiplexed_model_id=<adapter>`,
so Serve routes an adapter's traffic to replicas that already hold it. The multiplexed loader
(`max_num_models_per_replica` = `max_loras`) checks the adapter exists and gives Serve's
router its view of which replica holds what; the engine itself reads the adapter off its step
thread and installs it in a slot when the first request for it is admitted (LRU, refcounted).
Mixed-adapter batching happens inside the engine, so Serve's `@serve.batch` (which splits
batches by model id) is not used.

`generate` yields plain dicts: first either an error `{"error": {...}, "status": int}` or the
first output carrying the request's metadata (decoding, alpha/beta, replica), then one dict per
engine output. Errors travel as data, not exceptions, so the ingress can answer with the
right status before it sends any byte of a stream.

Nothing slow runs on the replica's event loop: adapters resolve from the registry's in-memory
snapshot (a catalog read, when one is needed, runs in a thread) and tokenisation (chat
templates included) runs in a thread, so one slow disk or long template never stalls the other
streams. Tokenisation has one thread of its own: a fast tokenizer is not made for concurrent
use from several threads, and one thread keeps requests in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from cold_ray import device as devices
from cold_ray.adapters.peft import AdapterError
from cold_ray.adapters.registry.base import RegistryUnavailable
from cold_ray.engine import (
    AsyncEngine,
    ColdParams,
    EngineError,
    SamplingParams,
    UnknownAdapterError,
)
from cold_ray.engine.request import RequestTimeout
from cold_ray.serve.config import AppArgs
from cold_ray.serve.metrics import EngineMetrics, Sampler

log = logging.getLogger(__name__)
_ACCELERATOR_HINT = {
    "npu": "give the engine deployment ray_actor_options: {resources: {NPU: 1}}",
    "cuda": "give the engine deployment ray_actor_options: {num_gpus: 1}",
}


class ContextLengthError(EngineError):
    """Prompt plus max_tokens do not fit the model's context."""


def classify(e: Exception) -> tuple[int, str]:
    """(HTTP status, error code) of an exception raised while serving a request."""
    if isinstance(e, UnknownAdapterError | KeyError):
        return 404, "model_not_found"
    if isinstance(e, ContextLengthError):
        return 400, "context_length_exceeded"
    if isinstance(e, RequestTimeout):  # the engine was busy, not the request wrong: retry
        return 503, "queue_timeout"
    if isinstance(e, RegistryUnavailable):  # a catalog read on a miss (`_lease`): retry
        return 503, "registry_unavailable"
    if isinstance(e, AdapterError):  # a registered adapter that no longer loads (server side)
        return 500, "adapter_load_failed"
    if isinstance(e, EngineError):
        return 400, "invalid_request"
    if isinstance(e, ValueError):
        return 422, "invalid_parameter"
    return 500, "internal_error"


# Server-side errors whose message the client reads (None: the exception's own); any other
# 5xx says "internal error" and leaves the detail to the log.
_TOLD = {
    "adapter_load_failed": None,
    "queue_timeout": None,
    "registry_unavailable": "the adapter registry cannot be reached; retry",
}


def error_item(e: Exception) -> dict:
    status, code = classify(e)
    message = str(e) if status < 500 else _TOLD.get(code, "internal error") or str(e)
    if code == "internal_error":
        log.error("request failed", exc_info=e)
    elif code == "registry_unavailable":
        log.warning("request failed: %s", e)
    return {"status": status, "error": {"message": message, "code": code}}


def load_chat_template(value: str | None) -> str | None:
    if value is None or "{" in value:
        return value
    return Path(value).expanduser().read_text()


@dataclass(frozen=True)
class AdapterLease:
    """What the multiplexed loader hands Serve: the adapter is known and routed here."""

    name: str
    sha256: str | None


@serve.deployment(
    name="ColdEngine",
    max_ongoing_requests=32,
    max_queued_requests=64,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
class ColdEngine:
    def __init__(self, args: dict):
        self.args = AppArgs.model_validate(args)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        device, self.assignment = self._pin(self.args.device)
        self.registry = self.args.open_registry()
        config = self.args.engine_config(device)
        self.engine = AsyncEngine(config, resolver=self.registry.resolver())
        self.core = self.engine.core
        self.tokenizer = self.core.tokenizer
        self.chat_template = load_chat_template(self.args.chat_template)
        self.device = str(self.core.device)
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

        async def lease(name: str) -> AdapterLease:  # Serve keeps its LRU state on a function
            return await self._lease(name)

        self._lease_fn = lease
        self._adapter = serve.multiplexed(max_num_models_per_replica=self.args.max_loras)(lease)
        self.metrics = EngineMetrics()
        self.sampler = Sampler(lambda: self.metrics.sample(self.engine.stats()))
        self.sampler.start()
        log.info("engine replica %s on %s (%s)", self.replica_id, self.device, self.assignment)

    def _pin(self, configured: str) -> tuple[str, dict]:
        """The device Ray assigned this replica; fails the start with a clear message."""
        try:
            device, info = devices.from_ray_assignment(configured)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {_ACCELERATOR_HINT.get(configured, '')}") from e
        if self.args.simulate_accelerator:
            return "cpu", info
        return device, info

    async def _lease(self, name: str) -> AdapterLease:
        try:
            source = self.core.adapter_source(name)  # the in-memory snapshot
        except UnknownAdapterError:  # registered a moment ago elsewhere? read the catalog once
            await asyncio.to_thread(self.registry.refresh)
            source = self.core.adapter_source(name)  # UnknownAdapterError -> 404
        return AdapterLease(name, source.sha256)

    # ---- requests -------------------------------------------------------------------------

    def _prompt_ids(self, req: dict) -> list[int]:
        if req.get("messages") is not None:
            try:
                text = self.tokenizer.apply_chat_template(
                    req["messages"], tokenize=False, add_generation_prompt=True,
                    chat_template=self.chat_template,
                )  # fmt: skip
            except Exception as e:  # no template, or the template refused the messages
                raise EngineError(
                    f"cannot apply the chat template: {e}; configure chat_template in the "
                    "app's args if the model has none"
                ) from e
            return self.tokenizer.encode(text, add_special_tokens=False)
        prompt = req["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise EngineError("prompt is empty")
            return self.tokenizer.encode(prompt)  # BOS where the model wants one, as vLLM
        return list(prompt)

    def _max_tokens(self, req: dict, n_prompt: int) -> int:
        limit = self.args.max_model_len
        room = limit - n_prompt
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens; this model's context is {limit} tokens "
                "(prompt plus at least one generated token)"
            )
        asked = req.get("max_tokens")
        if asked is None:
            return min(self.args.default_max_tokens, room)
        if asked > room:
            raise ContextLengthError(
                f"this model's context is {limit} tokens; the prompt has {n_prompt} and "
                f"max_tokens asks for {asked} more ({n_prompt + asked} in all): shorten the "
                "prompt or lower max_tokens"
            )
        return asked

    async def _submit(self, req: dict):
        adapter = req.get("adapter")
        if adapter is not None:
            await self._adapter(adapter)  # Serve's multiplex LRU; a miss runs _lease
        if req.get("messages") is not None or isinstance(req.get("prompt"), str):
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(self._tokenize, self._prompt_ids, req)
        else:
            ids = self._prompt_ids(req)  # token ids: nothing to do
        s = req["sampling"]
        params = SamplingParams(
            max_tokens=self._max_tokens(req, len(ids)),
            temperature=s["temperature"],
            top_p=s["top_p"],
            top_k=max(s["top_k"], 0),
            seed=s["seed"],
            stop=tuple(s["stop"]),
            stop_token_ids=tuple(s["stop_token_ids"]),
            ignore_eos=s["ignore_eos"],
        )
        cold = ColdParams(*req["cold"]) if req.get("cold") is not None else None
        stream = await self.engine.submit(ids, params, adapter, cold, req["request_id"])
        return stream, cold, len(ids)

    async def generate(self, req: dict):
        """Stream one request: see the module docstring for what is yielded."""
        try:
            stream, cold, n_prompt = await self._submit(req)
        except Exception as e:
            yield error_item(e)
            return
        self.metrics.request("cold" if cold else "plain", req.get("adapter"))
        meta = {
            "replica": self.replica_id,
            "decoding": "cold" if cold else "plain",
            "alpha": cold.alpha if cold else None,
            "beta": cold.beta if cold else None,
            "prompt_tokens": n_prompt,
        }
        try:
            async for out in stream:
                item = {
                    "text": out.text,
                    "tokens": len(out.token_ids),
                    "finish_reason": out.finish_reason,
                    "completion_tokens": out.completion_tokens,
                }
                if meta is not None:
                    item["meta"], meta = meta, None
                yield item
        except Exception as e:  # e.g. the adapter failed to load, or a step failed
            yield error_item(e)
        finally:
            await stream.aclose()  # a cancelled (disconnected) request frees its rows here

    # ---- introspection --------------------------------------------------------------------

    def stats(self) -> dict:
        return {**self.engine.stats(), "replica": self.replica_id, "device": self.device}

    def info(self) -> dict:
        return {
            "replica": self.replica_id,
            "device": self.device,
            "assignment": self.assignment,
            "pid": os.getpid(),
            "multiplexed": self.multiplexed(),
            "max_model_len": self.args.max_model_len,
            "time": time.time(),
        }

    def multiplexed(self) -> list[str]:
        """Adapters Serve's multiplexer counts as held here (what routing sees), LRU first."""
        wrapper = getattr(self._lease_fn, "__serve_multiplex_wrapper", None)
        return list(wrapper.models) if wrapper is not None else []

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine step thread has died")

    def __del__(self):
        sampler = getattr(self, "sampler", None)
        if sampler is not None:
            sampler.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        pool = getattr(self, "_tokenize", None)
        if pool is not None:
            pool.shutdown(wait=False)
