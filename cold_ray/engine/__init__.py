"""The CoLD engine: continuous batching over one base model with per-row LoRA adapters."""

from cold_ray.adapters.sources import AdapterSource
from cold_ray.decoding import ColdParams, GenerationRequest, SamplingParams
from cold_ray.engine.async_engine import AsyncEngine
from cold_ray.engine.core import EngineCore
from cold_ray.engine.request import (
    ContextLengthError,
    EngineError,
    RequestOutput,
    UnknownAdapterError,
)

__all__ = [
    "AdapterSource",
    "AsyncEngine",
    "ColdParams",
    "ContextLengthError",
    "EngineCore",
    "EngineError",
    "GenerationRequest",
    "RequestOutput",
    "SamplingParams",
    "UnknownAdapterError",
]
