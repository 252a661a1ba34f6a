"""The application's arguments: what `args:` in a Serve YAML may say, validated by pydantic.

Deployment options (replicas, `ray_actor_options`, autoscaling, queue limits) are not here:
they live in the YAML's `deployments:` section, where Serve itself reads them.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cold_ray.config import EngineConfig

# The package folder: `deployments/...` below it is the repository's deployments/ (a link in a
# checkout, a copy in the wheel), so the shipped YAMLs' relative sources work from anywhere.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
ENGINE_FIELDS = {f.name for f in fields(EngineConfig)}


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
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="The engine of each replica (cold_ray.config.EngineConfig): model, device, "
        "dtype, rows, adapter slots, context, prefill budget, prefix cache, kernels.",
    )
    served_model_name: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The base model's id in the API (`model` field, /v1/models, adapters' "
        "`parent`), e.g. its hub id; default: the model folder's or GGUF file's name.",
    )
    simulate_accelerator: bool = Field(
        False,
        description="Tests only: check Ray's accelerator assignment for engine.device, then "
        "compute on CPU (lets CI exercise NPU/GPU pinning with simulated resources).",
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
    def _moved(cls, data):
        """Engine settings at the top level of `args:` (this app's earlier layout) fail with
        the place they moved to, not as unknown fields."""
        if isinstance(data, dict):
            moved = sorted(k for k in data if k in ENGINE_FIELDS)
            if moved:
                raise ValueError(
                    f"{', '.join(moved)} moved under `engine:` in the app's args "
                    f"(e.g. engine: {{{moved[0]}: ...}}); see cold_ray.config.EngineConfig"
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
        limit, context = self.max_tokens_limit, self.engine.max_model_len
        if limit is not None and limit >= context:
            raise ValueError(f"max_tokens_limit {limit} must be below max_model_len {context}")
        return self

    @property
    def base_id(self) -> str:
        """The base model's id in the API: served_model_name, else the model's folder or GGUF
        file name, else the default model's name."""
        from cold_ray.model.loader import DEFAULT_MODEL_NAME

        if self.served_model_name:
            return self.served_model_name
        if self.engine.model is None:
            return DEFAULT_MODEL_NAME
        path = Path(self.engine.model.rstrip("/"))
        return path.stem if path.suffix == ".gguf" else path.name

    def model_args(self):
        """The base model's architecture (`ModelArgs`; fetches the default model once), named
        as it is served, so adapter validation speaks of the name users know."""
        from dataclasses import replace

        from cold_ray.model.loader import read_model_args, resolve_model_path

        args = read_model_args(resolve_model_path(self.engine.model))
        return replace(args, name=self.served_model_name) if self.served_model_name else args

    @property
    def tokens_limit(self) -> int:
        return self.max_tokens_limit or self.engine.max_model_len - 1

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
        return open_registry(self.registry_target(), password_env=self.registry_password_env, **kw)

    def roots(self) -> list[str]:
        from cold_ray.model.loader import cache_dir

        if self.adapter_roots is not None:
            return [str(Path(r).expanduser()) if "://" not in r else r for r in self.adapter_roots]
        return [str(cache_dir() / "adapters")]

    def engine_config(self, device: str | None = None) -> EngineConfig:
        """The engine's configuration on `device` (the one Ray assigned a replica)."""
        return replace(self.engine, device=device) if device else self.engine
