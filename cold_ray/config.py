"""Engine configuration: a frozen dataclass validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF safetensors folder or .gguf file; None = SmolLM2-135M-Instruct
    device: str = "cpu"  # cpu | cuda[:i] | npu[:i]
    dtype: str = "float32"
    max_loras: int = 4  # adapters resident on the device at once
    max_lora_rank: int = 16
    max_rows: int = 32  # batch rows; a CoLD request takes two (expert + amateur)
    max_model_len: int = 1024  # prompt + generated tokens per request (KV cache per row)
    # Prompt tokens prefilled per step (a CoLD prompt counts twice); longer prompts are
    # chunked across steps. Bounds the stall that new prompts put on decoding streams.
    max_prefill_tokens: int = 256
    # Prompt-prefix KV kept for reuse across requests (0 = off), in blocks of this many tokens.
    prefix_cache_bytes: int = 256 << 20
    prefix_block_size: int = 16
    # A request that waits this long without getting a row fails with a timeout (None = never).
    request_timeout_s: float | None = 600.0
    # Validated adapters kept in host memory for fast reloads, bounded in bytes (0: none).
    host_cache_bytes: int = 1 << 30
    max_adapter_bytes: int = 1 << 30
    lora_backend: str = "auto"  # auto | reference | grouped | triton | ...
    num_threads: int | None = 1  # intra-op threads; 1 avoids OpenMP spin-wait collapse
    packed_weights: bool = True  # CPU: base GEMM weights in oneDNN's packed layout
    # CPU, with packed_weights: keep a second copy of the base weights for decode-sized steps:
    # panels for the small-GEMM kernel (up to 32 rows), or without it the row-major weights
    # for 1–2 rows (`bench gemm`); twice the base weights' memory.
    small_batch_weights: bool = True
    # CPU, fp32, one thread: compiled C kernels (torch's operators without a compiler) for
    # decode attention, for the products of steps of up to 32 rows (over small_batch_weights'
    # panels) and for LoRA deltas of up to 4 rows of an adapter
    cpu_attention_kernel: bool = True
    cpu_gemm_kernel: bool = True
    # CPU, fp32, one thread: residual add + RMS norm, rotary embedding + KV-cache write and
    # SiLU·mul in C, one call each instead of chains of small torch operators
    cpu_rowwise_kernels: bool = True
    # CUDA/NPU: replay decode steps from graphs captured at start (CUDA graphs / ACLGraph),
    # one per (rows, span) bucket; false runs every step eagerly (debugging, profiling)
    graph_capture: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("max_loras", "max_lora_rank", "max_rows", "max_model_len",
                     "max_prefill_tokens", "prefix_block_size"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_rows < 2:
            raise ValueError(
                f"max_rows must be >= 2 (a CoLD request needs two), got {self.max_rows}"
            )
        if not isinstance(self.prefix_cache_bytes, int) or self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be an integer >= 0, got "
                             f"{self.prefix_cache_bytes!r}")  # fmt: skip
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(
                f"request_timeout_s must be > 0 or None, got {self.request_timeout_s!r}"
            )
        if not isinstance(self.host_cache_bytes, int) or self.host_cache_bytes < 0:
            raise ValueError(f"host_cache_bytes must be >= 0, got {self.host_cache_bytes!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")

    def check_model(self, args) -> None:
        """What this configuration needs of the model (`ModelArgs`); ValueError naming both
        numbers when the model cannot give it."""
        if self.max_model_len > args.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {args.max_position_embeddings}"
            )
        if args.sliding_window and self.max_model_len > args.sliding_window:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the sliding window "
                f"{args.sliding_window}; sliding-window attention is not implemented"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
