"""Engine configuration: one frozen, validated dataclass. It is the `engine:` section of a
Serve YAML's `args:` (cold_ray.serve.app_args.AppArgs nests it as it is), so every field carries
its own description, and a wrong value fails with a message naming the field."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from cold_ray.decoding import DEFAULT_MAX_TOKENS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class EngineConfig:
    model: str | None = Field(
        None, description="HF safetensors folder or .gguf file; None = SmolLM2-135M-Instruct."
    )
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda|npu)(:\d+)?$",
        description="cpu, cuda[:i] or npu[:i]. Under Serve, the replica uses the accelerator "
        "Ray assigned it (ray_actor_options num_gpus / resources NPU).",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "float32",
        description="Precision. CPU: float32, or bfloat16 = base weights and KV cache stored "
        "in bf16, every sum and CoLD's selection in fp32 (half the bytes; LoRA stays fp32). "
        "Accelerators: weights, activations and KV cache in that dtype. auto: bfloat16 on a "
        "CPU with bf16 matrix instructions (AVX512-BF16, AMX, Arm BF16), else float32; "
        "bfloat16 on CUDA, float16 on NPU. The engine logs what it chose.",
    )
    max_loras: int = Field(
        4, ge=1, le=256, description="Adapters resident on the device at once (LRU, pinned)."
    )
    max_lora_rank: int = Field(16, ge=1, le=1024, description="Largest adapter rank accepted.")
    max_rows: int = Field(
        32, ge=2, le=4096, description="Batch rows (a CoLD request takes two: expert, amateur)."
    )
    max_model_len: int = Field(
        1024, ge=2, le=1 << 20, description="Prompt + generated tokens per request."
    )
    default_max_tokens: int = Field(
        DEFAULT_MAX_TOKENS,
        ge=1,
        description="max_tokens of a request that omits it (capped "
        "by the context left after its prompt).",
    )
    max_prefill_tokens: int = Field(
        256,
        ge=1,
        description="Prompt tokens prefilled per step (a CoLD prompt counts twice); "
        "longer prompts are chunked, so a stream waits at most one chunk for new prompts.",
    )
    prefix_cache_bytes: int = Field(
        256 << 20,
        ge=0,
        description="Memory for prompt-prefix K/V reused across requests "
        "(0: off); the amateur rows' prefixes are shared by every adapter.",
    )
    prefix_block_size: int = Field(16, ge=1, le=1024, description="Tokens per prefix block.")
    request_timeout_s: float | None = Field(
        600.0,
        gt=0,
        description="A request that waits this long without being scheduled "
        "fails with a timeout (null: never).",
    )
    host_cache_bytes: int = Field(
        1 << 30,
        ge=0,
        description="Host memory for validated adapters kept for fast reloads "
        "(least recently used go first; 0: none).",
    )
    max_adapter_bytes: int = Field(1 << 30, ge=1, description="Largest adapter weights file.")
    lora_backend: str = Field(
        "auto",
        description="BGMV backend: auto, reference, grouped, gather_bmm, triton, "
        "ascend_native (cold_ray.kernels).",
    )
    num_threads: int | None = Field(
        1,
        ge=1,
        description="Cores this replica computes on: the CPU C kernels' threads and torch's "
        "intra-op threads (null: torch's default). Set OMP_WAIT_POLICY=PASSIVE for more than "
        "one: OpenMP's spin-waits otherwise fight the kernels' threads.",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template (inline, or a path to a file); default: the tokenizer's.",
    )
    packed_weights: bool = Field(
        True,
        description="CPU without cpu_gemm_kernel: base weights laid out once for oneDNN "
        "(false: plain BLAS).",
    )
    small_batch_weights: bool = Field(
        True,
        description="CPU with packed_weights and without cpu_gemm_kernel: keep the row-major "
        "base weights beside the packed ones for 1-2-row steps (twice the base weights' "
        "memory). With the kernel there is one copy whatever this says.",
    )
    cpu_attention_kernel: bool = Field(
        True,
        description="CPU: decode attention in a C kernel compiled at first start, on "
        "num_threads threads (false, or no C compiler: torch SDPA).",
    )
    cpu_gemm_kernel: bool = Field(
        True,
        description="CPU: every base product in a C kernel over one copy of the weights "
        "(projections in panels, the LM head read from the embedding it is tied to), on "
        "num_threads threads, and LoRA deltas of up to 4 rows of an adapter (false, or no C "
        "compiler: oneDNN / BLAS).",
    )
    cpu_rowwise_kernels: bool = Field(
        True,
        description="CPU: residual add + RMS norm, rotary embedding + KV-cache write and "
        "SiLU-mul in C (false, or no C compiler: torch's operators).",
    )
    graph_capture: bool = Field(
        True,
        description="CUDA/NPU: replay decode steps from graphs captured at start, each "
        "checked against the eager step (false: every step eager, for debugging).",
    )

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
    def resolved_dtype(self) -> str:
        """`dtype`, with `auto` resolved for `device` and this machine's CPU."""
        if self.dtype != "auto":
            return self.dtype
        from cold_ray.kernels.cpu_kernels import auto_dtype

        return auto_dtype(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.resolved_dtype]
