"""A request in flight and what the engine hands back for it each step."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from cold_ray.decoding import ColdParams, SamplingParams
from cold_ray.engine.detok import IncrementalDetokenizer

_ids = itertools.count()


class EngineError(ValueError):
    """A request the engine cannot serve; the message says why."""


class UnknownAdapterError(EngineError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


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


@dataclass
class Row:
    """One batch row: a slot in the KV cache holding one decoding stream of a request."""

    request: Request
    adapter_slot: int  # -1 = base model
    slot: int = -1  # cache slot == batch row index (rows are kept contiguous)
    length: int = 0  # tokens in this row's cache


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    cold: ColdParams | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # [expert, amateur] for CoLD, else [row]
    detok: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    adapter_pinned: bool = False

    @property
    def num_rows(self) -> int:
        return 2 if self.cold is not None else 1

    @property
    def decoding(self) -> str:
        return "cold" if self.cold is not None else "plain"
