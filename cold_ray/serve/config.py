"""The application's arguments: what `args:` in a Serve YAML may say, validated by pydantic.

Deployment options (replicas, `ray_actor_options`, autoscaling, queue limits) are not here:
they live in the YAML's `deployments:` section, where Serve itself reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cold_ray.config import EngineConfig
from cold_ray.decoding import DEFAULT_MAX_TOKENS

# The package folder: `deployments/...` below it is the repository's deployments/ (a link in a
# checkout, a copy in the wheel), so the shipped YAMLs' relative sources work from anywhere.
PACKAGE_DIR = Path(__file__).resolve().parents[1]


class StartupAdapter(BaseModel):
    """An adapter the operator declares in the config; registered when the app starts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Adapter name clients pass as `model` ([A-Za-z0-9._-]{1,64}).")
    source: str = Field(
        description="PEFT folder or fsspec URI. A relative path is tried against the working "
        "directory, then the installed package (so `deployments/adapters/x` works from anywhere)."
    )
    alpha: float | None = Field(None, gt=0, le=1, description="Tuned CoLD alpha (None: 0.1).")
    beta: float | None = Field(None, ge=0, description="Tuned CoLD beta (None: 0.5).")
    cold_enabled: bool = Field(
        True, description="False: requests that omit `cold` decode plainly with this adapter."
    )
    required: bool = Field(True, description="Fail the start if the adapter cannot be registered.")

    def resolved_source(self) -> str:
        if "://" in self.source or Path(self.source).expanduser().is_absolute():
            return self.source
        for base in (Path.cwd(), PACKAGE_DIR):
            if (base / self.source).exists():
                return str((base / self.source).resolve())
        return self.source  # let registration report it missing


class AppArgs(BaseModel):
    """Arguments of `cold_ray.serve:build_app` (the YAML's `args:`)."""

    model_config = ConfigDict(extra="forbid")

    # ---- the engine (one per replica) -----------------------------------------------------
    model: str | None = Field(
        None, description="HF safetensors folder or .gguf file; None = SmolLM2-135M-Instruct."
    )
    served_model_name: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The base model's id in the API (`model` field, /v1/models, adapters' "
        "`parent`), e.g. its hub id; default: the model folder's or GGUF file's name.",
    )
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda|npu)$",
        description="cpu, cuda or npu. For cuda/npu the replica uses the accelerator Ray "
        "assigned it (ray_actor_options num_gpus / resources NPU) and fails at start without one.",
    )
    simulate_accelerator: bool = Field(
        False,
        description="Tests only: check Ray's accelerator assignment for `device`, then compute "
        "on CPU (lets CI exercise NPU/GPU pinning with simulated resources).",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights/activations dtype (float32 is fastest on CPU)."
    )
    max_loras: int = Field(
        4,
        ge=1,
        le=256,
        description="Adapters resident per replica; also Serve's max_num_models_per_replica.",
    )
    max_lora_rank: int = Field(16, ge=1, le=1024, description="Largest adapter rank accepted.")
    max_rows: int = Field(
        32, ge=2, le=4096, description="Batch rows per replica (a CoLD request takes two)."
    )
    max_model_len: int = Field(
        1024, ge=2, le=1 << 20, description="Prompt + completion tokens per request."
    )
    max_prefill_tokens: int = Field(
        EngineConfig.max_prefill_tokens, ge=1,
        description="Prompt tokens prefilled per engine step (CoLD counts twice); longer prompts "
        "are chunked, so a stream waits at most one chunk's compute for arriving prompts.",
    )  # fmt: skip
    prefix_cache_bytes: int = Field(
        EngineConfig.prefix_cache_bytes, ge=0,
        description="Memory for prompt-prefix K/V reused across requests (0: off); the "
        "amateur rows' prefixes are shared by every adapter.",
    )  # fmt: skip
    prefix_block_size: int = Field(
        EngineConfig.prefix_block_size, ge=1, le=1024, description="Tokens per prefix block."
    )
    request_timeout_s: float | None = Field(
        EngineConfig.request_timeout_s, gt=0,
        description="A request that waits this long without being scheduled fails with a "
        "timeout (null: never).",
    )  # fmt: skip
    packed_weights: bool = Field(
        EngineConfig.packed_weights,
        description="CPU: lay base weights out once for oneDNN (false: plain BLAS, debugging).",
    )
    small_batch_weights: bool = Field(
        EngineConfig.small_batch_weights,
        description="CPU, with packed_weights: keep a second copy of the base weights for "
        "decode-sized steps (panels for cpu_gemm_kernel, up to 32 rows; else row-major for 1-2 "
        "rows); twice the base weights' memory.",
    )
    cpu_attention_kernel: bool = Field(
        EngineConfig.cpu_attention_kernel,
        description="CPU, fp32, one thread: decode attention in a C kernel compiled on first "
        "start (false, or no C compiler: torch SDPA).",
    )
    cpu_gemm_kernel: bool = Field(
        EngineConfig.cpu_gemm_kernel,
        description="CPU, fp32, one thread: LoRA deltas of up to 4 rows of an adapter and, with "
        "small_batch_weights, the base products of steps of up to 32 rows over weights in "
        "huge-page memory, in a C kernel (false, or no C compiler: BLAS).",
    )
    cpu_rowwise_kernels: bool = Field(
        EngineConfig.cpu_rowwise_kernels,
        description="CPU, fp32, one thread: residual add + RMS norm, rotary embedding + KV-cache "
        "write and SiLU-mul in C (false, or no C compiler: torch's operators).",
    )
    graph_capture: bool = Field(
        EngineConfig.graph_capture,
        description="CUDA/NPU: replay decode steps from graphs captured at start, each checked "
        "against the eager step (false: every step eager, for debugging and profiling).",
    )
    host_cache_bytes: int = Field(
        1 << 30, ge=0, description="Host memory (bytes) for validated adapters kept for fast "
        "reloads, per replica; least recently used go first. 0: no host cache.",
    )  # fmt: skip
    max_adapter_bytes: int = Field(1 << 30, ge=1, description="Largest adapter weights file.")
    lora_backend: str = Field("auto", description="BGMV backend: auto, reference, grouped, ...")
    num_threads: int | None = Field(
        1, ge=1, description="Torch intra-op threads per replica (1 avoids OpenMP spin-wait)."
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template (inline, or a path to a file); default: the tokenizer's.",
    )

    # ---- adapters and the registry --------------------------------------------------------
    registry: str | None = Field(
        None,
        description="The adapter catalog every replica reads: a SQLite file (one machine; not "
        "on NFS) or postgresql://USER@HOST:PORT/DB (a cluster; the password comes from the "
        "environment, never the config). Default: $COLD_RAY_REGISTRY, else "
        "~/.cache/cold-ray/registry.sqlite.",
    )
    registry_password_env: str = Field(
        "COLD_RAY_REGISTRY_PASSWORD",
        description="Environment variable holding the PostgreSQL registry's password (libpq's "
        "PGPASSWORD and ~/.pgpass work too).",
    )
    adapter_schemes: list[str] | None = Field(
        None,
        description="URI schemes adapter sources may use; default file, s3, gs, gcs, az, abfs. "
        "http(s) only when listed: a fetch by the server is an SSRF vector.",
    )
    adapters: list[StartupAdapter] = Field(
        default_factory=list,
        description="Adapters registered at start (kept if already registered, re-validated "
        "if their weights changed).",
    )
    adapter_roots: list[str] | None = Field(
        None,
        description="Folders/URI prefixes that POST /v1/adapters sources must lie under; "
        "default: ~/.cache/cold-ray/adapters only. Startup adapters are trusted config.",
    )
    admin_api: bool = Field(True, description="Serve POST/DELETE /v1/adapters.")
    allow_unauthenticated_admin: bool = Field(
        False,
        description="Trusted networks only: start even though the HTTP host is not loopback "
        "and no admin token is set, leaving registry writes open to anyone who reaches the "
        "port. Without it such a server refuses to start.",
    )
    allow_unauthenticated_clients: bool = Field(
        False,
        description="Trusted networks only: start even though the HTTP host is not loopback "
        "and no client token is set, leaving completions and listings open to anyone who "
        "reaches the port. Without it such a server refuses to start.",
    )

    # ---- HTTP API -------------------------------------------------------------------------
    api_key_env: str = Field(
        "COLD_RAY_API_KEY",
        description="Environment variable holding the client bearer token (unset or empty: "
        "no client auth). Tokens are read from the environment, never from the config.",
    )
    admin_key_env: str = Field(
        "COLD_RAY_ADMIN_KEY",
        description="Environment variable holding the admin token for registry writes.",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header values requests may carry besides the loopback names "
        "(localhost, 127.0.0.1, [::1]; any port), e.g. ['cold.example.com', '10.0.0.5:8000'] "
        "('*': any). Others get 421: a web page that rebinds its DNS name to this server "
        "cannot read or write it. Default: loopback names only, so a server that listens "
        "beyond loopback lists the names its clients use.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port], or '*') whose pages may call the API "
        "from a browser (CORS). Default: none.",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest max_tokens accepted (422 above); default max_model_len-1."
    )
    default_max_tokens: int = Field(
        DEFAULT_MAX_TOKENS,
        ge=1,
        description="max_tokens when a request omits it (capped by the context left).",
    )
    max_stop: int = Field(16, ge=0, le=256, description="Most stop strings per request.")
    max_beta: float = Field(100.0, gt=0, description="Largest CoLD beta accepted (422 above).")
    cold_by_default: bool = Field(
        True,
        description="A request on an adapter that omits `cold` decodes with CoLD at the "
        "adapter's registry defaults (unless its entry has cold_enabled=false); False: plain.",
    )
    debug_headers: bool = Field(True, description="Send x-cold-replica (routing debug).")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "host_cache_adapters" in data:
            raise ValueError(
                "host_cache_adapters was replaced by host_cache_bytes (the host adapter cache "
                "is bounded in bytes): e.g. host_cache_bytes: 1073741824"
            )
        return data

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str] | None) -> list[str] | None:
        from cold_ray.serve.guard import parse_host

        for host in value or []:
            if host != "*" and parse_host(host) is None:
                raise ValueError(
                    f"allowed_hosts: {host!r} is not a host name or address with an optional "
                    "port (e.g. 'cold.example.com', '10.0.0.5:8000', '[::1]'), or '*'"
                )
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            scheme, sep, rest = origin.partition("://")
            if origin != "*" and not (
                sep and scheme in ("http", "https") and rest and "/" not in rest
            ):
                raise ValueError(
                    f"cors_origins: {origin!r} is not an origin: scheme://host[:port] with no "
                    "path (e.g. 'https://app.example.com'), or '*'"
                )
        return value

    @field_validator("registry")
    @classmethod
    def _registry_target(cls, value: str | None) -> str | None:
        from cold_ray.adapters.registry import parse_target

        if value is not None:
            parse_target(value, from_config=True)  # RegistryError is a ValueError
        return value

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        if self.max_tokens_limit is not None and self.max_tokens_limit >= self.max_model_len:
            raise ValueError(
                f"max_tokens_limit {self.max_tokens_limit} must be below max_model_len "
                f"{self.max_model_len}"
            )
        self.engine_config()  # the engine's own checks, at build time
        return self

    @property
    def base_id(self) -> str:
        """The base model's id in the API: served_model_name, else the model's folder or GGUF
        file name, else the default model's name."""
        from cold_ray.model.loader import DEFAULT_MODEL_NAME

        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return DEFAULT_MODEL_NAME
        path = Path(self.model.rstrip("/"))
        return path.stem if path.suffix == ".gguf" else path.name

    def model_args(self):
        """The base model's architecture (`ModelArgs`; fetches the default model once), named
        as it is served, so adapter validation speaks of the name users know."""
        from dataclasses import replace

        from cold_ray.model.loader import read_model_args, resolve_model_path

        args = read_model_args(resolve_model_path(self.model))
        return replace(args, name=self.served_model_name) if self.served_model_name else args

    @property
    def tokens_limit(self) -> int:
        return self.max_tokens_limit or self.max_model_len - 1

    def registry_target(self) -> str:
        """`registry`, else $COLD_RAY_REGISTRY, else the default SQLite file."""
        from cold_ray.adapters.registry import default_target

        return self.registry or default_target()

    def registry_path(self) -> Path:
        """The SQLite file of a SQLite registry."""
        from cold_ray.adapters.registry import parse_target

        kind, where = parse_target(self.registry_target())
        if kind != "sqlite":
            raise ValueError(f"the registry is {kind}, not a SQLite file")
        return Path(where).expanduser()

    def open_registry(self, **kw):
        """Open the configured registry; refuse a one-machine (SQLite) catalog in a Ray cluster
        of several nodes. `kw`: `open_registry` options (allowed_roots, ...)."""
        from cold_ray.adapters.registry import open_registry, refuse_local_in_cluster

        refuse_local_in_cluster(self.registry_target())
        if self.adapter_schemes is not None:
            kw.setdefault("allowed_schemes", self.adapter_schemes)
        return open_registry(self.registry_target(), password_env=self.registry_password_env,
                             **kw)  # fmt: skip

    def roots(self) -> list[str]:
        from cold_ray.model.loader import cache_dir

        if self.adapter_roots is not None:
            return [str(Path(r).expanduser()) if "://" not in r else r for r in self.adapter_roots]
        return [str(cache_dir() / "adapters")]

    def engine_config(self, device: str | None = None) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            device=device or "cpu",
            dtype=self.dtype,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_rows=self.max_rows,
            max_model_len=self.max_model_len,
            max_prefill_tokens=self.max_prefill_tokens,
            prefix_cache_bytes=self.prefix_cache_bytes,
            prefix_block_size=self.prefix_block_size,
            request_timeout_s=self.request_timeout_s,
            packed_weights=self.packed_weights,
            small_batch_weights=self.small_batch_weights,
            cpu_attention_kernel=self.cpu_attention_kernel,
            cpu_gemm_kernel=self.cpu_gemm_kernel,
            cpu_rowwise_kernels=self.cpu_rowwise_kernels,
            graph_capture=self.graph_capture,
            host_cache_bytes=self.host_cache_bytes,
            max_adapter_bytes=self.max_adapter_bytes,
            lora_backend=self.lora_backend,
            num_threads=self.num_threads,
        )
