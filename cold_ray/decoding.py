"""Decoding parameters, their defaults, and the rule that picks a request's decoding.

Every layer — the HTTP API, the engine, the CLIs and the evaluation harness — takes its
defaults and the "which decoding does an adapter request get" rule from here, so they cannot
drift apart (docs/design.md §1).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Request defaults (OpenAI's and vLLM's): sampling at temperature 1, no top-p/top-k cut.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
# vLLM's rule: a temperature below this decodes greedily (dividing by it would overflow).
GREEDY_TEMPERATURE = 1e-5
# CoLD knobs (O'Brien & Lewis 2023) when neither the request nor the registry sets them.
DEFAULT_ALPHA = 0.1
DEFAULT_BETA = 0.5
# Alternatives per token a request may ask log-probabilities for (vLLM's default limit).
MAX_LOGPROBS = 20
# Beyond this the contrastive score (1+beta)*expert - beta*amateur can overflow fp32.
MAX_BETA = 1e6


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class ColdParams:
    """Contrastive LoRA Decoding knobs (docs/design.md §1)."""

    alpha: float = DEFAULT_ALPHA  # plausibility: keep tokens with p_expert >= alpha * max p
    beta: float = DEFAULT_BETA  # contrast strength: score = (1+beta)*expert - beta*amateur

    def __post_init__(self):
        _finite("alpha", self.alpha)
        _finite("beta", self.beta)
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= MAX_BETA:
            raise ValueError(f"beta must be in [0, {MAX_BETA:g}], got {self.beta}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: the engine's default_max_tokens, capped by context
    temperature: float = DEFAULT_TEMPERATURE  # below GREEDY_TEMPERATURE: greedy
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # Log-probabilities to report (cold_ray.engine.logprobs): of each generated token with this
    # many alternatives, and of each prompt token likewise; None: none.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if self.max_tokens is not None:
            if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
                raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        _finite("temperature", self.temperature)
        _finite("top_p", self.top_p)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            valid = isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_LOGPROBS
            if n is not None and not valid:
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {n!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class AdapterDefaults(Protocol):
    """What the rule needs to know about an adapter (a registry record or an engine source)."""

    @property
    def cold(self) -> ColdParams | None: ...  # tuned knobs; None = DEFAULT_ALPHA/BETA

    @property
    def cold_enabled(self) -> bool: ...  # False: tuning found CoLD does not help it


class ColdOnBaseModel(ValueError):
    """CoLD was asked for on the base model, which cannot contrast with itself."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the API accepted it: what to decode and how. Built once at the door, it
    crosses the Serve handle as it is; the engine tokenizes it (EngineCore.make_request)."""

    prompt: str | tuple[int, ...] | None = None  # a completion's text or token ids
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # None: the base model
    cold: ColdParams | None = None  # None: plain decoding
    messages: tuple[Mapping[str, str], ...] | None = None  # a chat, rendered by the template
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    echo: bool = False  # the first output carries the prompt's text (completions' `echo`)
    cache_salt: str | None = None  # requests with another salt share no prompt-prefix K/V

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a request has either a prompt or messages")
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(self.prompt))
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(self.messages))
        if self.cold is not None and self.adapter is None:
            raise ColdOnBaseModel(
                "CoLD needs an adapter: the base model cannot contrast with itself; "
                "set model to an adapter or drop `cold`"
            )


def request_cold(
    adapter: AdapterDefaults | None,
    knob: bool | tuple[float | None, float | None] | None = None,
    cold_by_default: bool = True,
) -> ColdParams | None:
    """The CoLD knobs a request decodes with; None means plain decoding.

    `adapter`: None for the base model. `knob`: what the request said — None (nothing), True
    (the adapter's defaults), False (plain), or (alpha, beta) where a None takes the default.
    Omitted, an adapter request decodes with CoLD at the adapter's tuned knobs unless tuning
    turned CoLD off for it (or the operator set `cold_by_default: false`); the base model
    decodes plainly unless asked otherwise (which GenerationRequest then refuses).
    """
    if knob is False or (knob is None and adapter is None):
        return None
    if knob is None and not (cold_by_default and adapter.cold_enabled):
        return None
    default = (adapter.cold if adapter is not None else None) or ColdParams()
    if not isinstance(knob, tuple):
        return default
    alpha, beta = knob
    return ColdParams(
        default.alpha if alpha is None else alpha, default.beta if beta is None else beta
    )
