"""A request in flight and what the engine hands back for it each step."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from cold_ray.decoding import ColdParams, SamplingParams
from cold_ray.engine.detok import IncrementalDetokenizer
from cold_ray.engine.kv_cache import Row
from cold_ray.engine.logprobs import TokenLogprobs
from cold_ray.engine.sampling import SeedState

_ids = itertools.count()


class EngineError(ValueError):
    """A request the engine cannot serve; the message says why."""


class UnknownAdapterError(EngineError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ContextLengthError(EngineError):
    """The prompt, or the prompt plus max_tokens, does not fit the model's context."""


class RequestTimeout(EngineError):
    """A request waited longer than `request_timeout_s` without being scheduled."""


class RequestFailed(RuntimeError):
    """The engine could not finish this request (its forward pass or its sampling failed);
    other requests are unaffected. The message says what went wrong."""


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new tokens since the previous output
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None
    logprobs: list[TokenLogprobs] | None = None  # of token_ids, when the request asks
    prompt_logprobs: list[TokenLogprobs] | None = None  # with the first output
    prompt_text: str | None = None  # with the first output of a request that echoes
    token_text: dict[int, str] | None = None  # the text of each token its logprobs name
    served_by: str | None = None  # the replica that served it (set by the serving layer)


@dataclass(eq=False)  # requests are found by identity
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    cold: ColdParams | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # [expert, amateur] for CoLD, else [row]
    detok: IncrementalDetokenizer | None = None
    sampler: SeedState | None = None  # None: greedy
    finish_reason: str | None = None
    adapter_pinned: bool = False
    adapter_version: str | None = None  # checksum of the adapter weights its rows run
    arrived: float = field(default_factory=time.monotonic)
    prefix_checked: bool = False  # the prefix cache was asked for its rows' prompt K/V
    prompt_logprobs: list[TokenLogprobs] | None = None  # computed so far
    echo: bool = False  # the first output carries the prompt's text
    cache_salt: str | None = None  # prefix-cache blocks are shared only within one salt

    @property
    def num_rows(self) -> int:
        return 2 if self.cold is not None else 1

    @property
    def prefilled(self) -> bool:
        """Every row holds the whole prompt's K/V (the request decodes from now on)."""
        return all(r.prompt_left <= 0 for r in self.rows)

    @property
    def decoding(self) -> str:
        return "cold" if self.cold is not None else "plain"
