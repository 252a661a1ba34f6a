"""The model runner: one base model with its LoRA slots, kernels, KV cache and decode graphs on
one device. It runs a step's plan and selects each ready request's token; it decides nothing
about which requests run (that is the scheduler's).

Setup happens in the order the pieces depend on each other: weights in the configured dtype →
the CPU kernels and packed layouts → rotary tables → the LoRA backend → the KV cache → decode
graphs (captured last, over the finished model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cold_ray import device as devices
from cold_ray.config import DTYPES, EngineConfig
from cold_ray.engine import batch as step_batch
from cold_ray.engine import logprobs
from cold_ray.engine.graphs import DecodeGraphs
from cold_ray.engine.kv_cache import KVCache
from cold_ray.engine.request import Request, RequestFailed
from cold_ray.engine.sampling import FAILED, SamplingError, cold_select, sample_rows
from cold_ray.engine.scheduler import StepPlan, StepResult
from cold_ray.kernels import select_backend
from cold_ray.model.args import ModelArgs
from cold_ray.model.llama import ForwardBatch, LlamaModel, PrefillAttention
from cold_ray.model.loader import load_weights

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, args: ModelArgs, path: Path):
        self.config, self.args = config, args
        self.device = devices.resolve(config.device)
        self.weight_dtype, self.dtype = self._precision()
        model = LlamaModel(args, config.max_loras, config.max_lora_rank, config.max_model_len)
        load_weights(model, path)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if self.weight_dtype != self.dtype:
            self.model.round_base_weights(self.weight_dtype)
        attention, gemm, rowwise = self._cpu_kernels()
        if gemm is not None or config.packed_weights:
            self.model.pack_cpu_weights(gemm, small_batch=config.small_batch_weights)
        self.model.init_rope()
        self.backend = select_backend(config.lora_backend, self.device)
        self.model.set_backend(self.backend)
        if gemm is not None and self.backend.use_cpu_kernel(gemm):
            log.info("LoRA of up to %d rows of an adapter: C kernel", gemm.MAX_LORA_ROWS)
        self.model.set_decode_kernel(attention)
        self.model.set_rowwise_kernels(rowwise)
        # CPU bf16: the cache holds bf16 too (half the memory and the bytes attention reads)
        self.cache = KVCache.allocate(
            args, config.max_rows, config.max_model_len, self.weight_dtype, self.device
        )
        self.graphs = self._decode_graphs()

    def _precision(self) -> tuple[torch.dtype, torch.dtype]:
        """(storage dtype, arithmetic dtype) for the configured dtype (`auto`: from the device
        and the CPU's flags). On CPU, bfloat16 stores the base weights and the KV cache in bf16
        and computes in fp32 (the C kernels widen each value as they read it; without them
        torch runs fp32 on the bf16 values): CoLD's selection and every sum stay fp32, LoRA
        adapters stay fp32, and no product ever runs in bf16 arithmetic, whose CPU kernels
        (oneDNN's AVX512-BF16 / AMX) change with the batch's rows. `auto` takes bf16 on a CPU
        only where the C GEMM kernel reads it: torch's fallback stores fp32 anyway."""
        name, chosen = self.config.dtype, self.config.resolved_dtype
        cpu = self.device.type == "cpu"
        if name == "auto" and cpu and chosen == "bfloat16" and not self._gemm_available():
            chosen = "float32"
        weights = DTYPES[chosen]
        arithmetic = torch.float32 if cpu and weights == torch.bfloat16 else weights
        spoken = str(arithmetic).removeprefix("torch.")
        log.info("precision: dtype %s -> %s weights, %s arithmetic", name, chosen, spoken)
        return weights, arithmetic

    def _gemm_available(self) -> bool:
        if not self.config.cpu_gemm_kernel:
            return False
        from cold_ray.kernels import cpu_gemm

        return cpu_gemm.load() is not None

    def _cpu_kernels(self):
        """The compiled CPU kernels this runner uses: (decode attention, panel GEMM, row-wise
        ops), each None where it is turned off or cannot be built; fp32 only. Each splits its
        work over `num_threads` threads (torch's intra-op count where unset); their results do
        not depend on the count."""
        config = self.config
        if not (self.device.type == "cpu" and self.dtype == torch.float32):
            return None, None, None
        from cold_ray.kernels import cpu_attention, cpu_gemm, cpu_kernels, cpu_rowwise

        threads = config.num_threads or torch.get_num_threads()
        attention = cpu_attention.load() if config.cpu_attention_kernel else None
        gemm = cpu_gemm.load() if config.cpu_gemm_kernel else None
        rowwise = cpu_rowwise.load() if config.cpu_rowwise_kernels else None
        if config.cpu_attention_kernel:
            log.info("decode attention: %s", "C kernel" if attention else "torch SDPA")
        if config.cpu_gemm_kernel:
            log.info("base products: %s", "C kernel over one panel copy" if gemm else "BLAS")
        if config.cpu_rowwise_kernels:
            log.info("norms, rotary embedding, SiLU: %s", "C kernels" if rowwise else "torch")
        if attention or gemm or rowwise:
            log.info("C kernels: %d threads, blocking %s", threads, cpu_kernels.blocking())
        return tuple(
            None if k is None else k.with_threads(threads) for k in (attention, gemm, rowwise)
        )

    def _decode_graphs(self) -> DecodeGraphs | None:
        """Decode steps captured as graphs where the device and the LoRA backend allow it."""
        config = self.config
        if not config.graph_capture or devices.graph_api(self.device) is None:
            return None
        if not self.backend.graph_safe:
            log.info(
                "decode steps run eagerly: the %s LoRA backend cannot be captured",
                self.backend.name,
            )
            return None
        try:
            return DecodeGraphs(
                self.model,
                self.cache,
                self.backend,
                config.max_rows,
                config.max_model_len,
                config.max_loras,
            )
        except Exception:  # a speed-up only: serve eagerly rather than not at all
            log.exception("decode graphs could not be captured; every step runs eagerly")
            return None

    # ---- a step ---------------------------------------------------------------------------

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, dict, dict]:
        """One forward pass over the plan: (final hidden states, {row: index into them},
        {prompt-logprob chunk: index of its first position})."""
        if self.graphs is not None and self.graphs.fits(plan):
            return self.graphs.run(plan), {row: row.slot for row in plan.decode}, {}
        tokens, fb, out_rows, prompt_out = step_batch.build(
            plan, self.backend, self.device, self.dtype
        )
        return self.model(tokens, self.cache, fb), out_rows, prompt_out

    def execute(self, plan: StepPlan) -> StepResult:
        """`select(run(plan))`; a failed forward fails every request in it, and only those."""
        try:
            hidden, out_rows, prompt_out = self.run(plan)
        except Exception as e:
            log.exception("forward pass failed; failing the %d requests in it", len(plan.requests))
            error = RequestFailed(f"the engine's forward pass failed: {type(e).__name__}: {e}")
            return StepResult(dict.fromkeys(plan.requests, error))
        result = self.select(plan.ready, hidden, out_rows)
        if prompt_out:
            try:
                result.prompt_logprobs = self._prompt_logprobs(prompt_out, hidden, out_rows)
            except Exception as e:  # fails the requests that asked, only those
                log.exception("prompt log-probabilities failed")
                error = RequestFailed(f"prompt logprobs failed: {type(e).__name__}: {e}")
                result.tokens.update((c.row.request, error) for c in prompt_out)
        return result

    def select(self, ready: list[Request], hidden, out_rows: dict) -> StepResult:
        """Each ready request's next token from its rows' final hidden states (by row), or the
        exception that fails it: a failed batched selection fails its group (plain or CoLD)
        only; a request whose scores are not finite fails alone."""
        result = StepResult({})
        plain = [req for req in ready if req.cold is None]
        cold = [req for req in ready if req.cold is not None]
        for group, pick in ((plain, self._pick_plain), (cold, self._pick_cold)):
            if not group:
                continue
            try:
                tokens, logprobs = pick(group, hidden, out_rows)
            except Exception as e:
                log.exception("token selection failed for %d requests", len(group))
                error = RequestFailed(f"token selection failed: {type(e).__name__}: {e}")
                result.tokens.update((req, error) for req in group)
                continue
            for req, t in zip(group, tokens):
                result.tokens[req] = SamplingError() if t == FAILED else t
            result.logprobs.update(logprobs)
        return result

    def _pick_plain(self, reqs: list[Request], hidden, out_rows: dict):
        logits = self.model.logits(hidden[[out_rows[req.rows[0]] for req in reqs]])
        tokens = sample_rows(
            logits,
            None,
            [req.params for req in reqs],
            [req.sampler for req in reqs],
            [len(req.output_ids) for req in reqs],
        )
        asked = [i for i, req in enumerate(reqs) if req.params.logprobs is not None]
        if not asked or all(tokens[i] == FAILED for i in asked):
            return tokens, {}
        asked = [i for i in asked if tokens[i] != FAILED]
        found = logprobs.plain(
            logits[asked],
            torch.tensor([tokens[i] for i in asked], device=logits.device),
            [reqs[i].params.logprobs for i in asked],
        )
        return tokens, {reqs[i]: lp for i, lp in zip(asked, found)}

    def _pick_cold(self, reqs: list[Request], hidden, out_rows: dict):
        expert = self.model.logits(hidden[[out_rows[req.rows[0]] for req in reqs]])
        amateur = hidden[[out_rows[req.rows[1]] for req in reqs]]
        tokens = cold_select(
            self.backend,
            self.model.lm_weight,
            expert,
            amateur,
            [req.cold for req in reqs],
            [req.params for req in reqs],
            [req.sampler for req in reqs],
            [len(req.output_ids) for req in reqs],
        )
        asked = [i for i, req in enumerate(reqs) if req.params.logprobs is not None]
        asked = [i for i in asked if tokens[i] != FAILED]
        if not asked:
            return tokens, {}
        # The full amateur head for these rows only: the rest keep the restricted one.
        found = logprobs.contrastive(
            expert[asked],
            self.model.logits(amateur[asked]),
            *self._knobs(reqs, asked),
            torch.tensor([tokens[i] for i in asked], device=expert.device),
            [reqs[i].params.logprobs for i in asked],
        )
        return tokens, {reqs[i]: lp for i, lp in zip(asked, found)}

    def _knobs(self, reqs: list[Request], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = torch.tensor([reqs[i].cold.alpha for i in rows], device=self.device)
        beta = torch.tensor([reqs[i].cold.beta for i in rows], device=self.device)
        return alpha, beta

    def _prompt_logprobs(self, prompt_out: dict, hidden, out_rows: dict) -> dict:
        """{request: TokenLogprobs of the prompt tokens its chunk's positions predict}; a CoLD
        request's expert and amateur chunks cover the same positions (no prefix reuse)."""
        found: dict[Request, list] = {}
        for chunk, first in prompt_out.items():
            req = chunk.row.request
            if req.cold is not None and chunk.row is not req.rows[0]:
                continue  # the amateur's chunk: read beside the expert's below
            targets = logprobs.prompt_targets(req.prompt_ids, chunk.start, len(chunk.tokens))
            if not targets:
                continue
            at = list(range(first, first + len(targets)))
            ids = torch.tensor(targets, device=self.device)
            n_top = [req.params.prompt_logprobs] * len(targets)
            expert = self.model.logits(hidden[at])
            if req.cold is None:
                found[req] = logprobs.plain(expert, ids, n_top)
                continue
            amateur_chunk = next(c for c in prompt_out if c.row is req.rows[1])
            a_first = prompt_out[amateur_chunk]
            amateur = self.model.logits(hidden[a_first : a_first + len(targets)])
            knobs = self._knobs([req] * len(targets), list(range(len(targets))))
            found[req] = logprobs.contrastive(expert, amateur, *knobs, ids, n_top)
        return found

    # ---- scoring (not a step) -------------------------------------------------------------

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], slot: int, adapter_slot: int) -> torch.Tensor:
        """Logits at every position of a sequence, [T, V], using KV slot `slot` as scratch."""
        t = len(token_ids)
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
