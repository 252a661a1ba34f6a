"""The application builder that Serve YAMLs name in `import_path: cold_ray.serve:build_app`."""

from __future__ import annotations

import logging

from ray.serve import Application

from cold_ray.serve.app_args import AppArgs

log = logging.getLogger(__name__)


def build_app(args: dict | AppArgs | None = None) -> Application:
    """Validate `args` (see `AppArgs`), check the server is not exposed without both tokens
    (or their explicit opt-outs), prepare the model and the startup adapters once, and compose
    Ingress → Engine. Deployment options come from the YAML's `deployments:` section.

    Any failure is raised as a RayServeException: Serve retries other exceptions of an app
    build three times (each retry would start the same doomed work again), but reports this
    one at once, with its message, as the application's DEPLOY_FAILED status."""
    from ray.serve.exceptions import RayServeException

    from cold_ray.serve.auth import serve_http_host

    try:
        cfg = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
        try:
            host = serve_http_host()
        except LookupError:
            pass  # no Serve instance yet (a Python caller): the ingress checks at its start
        else:
            check_exposure(cfg, host)
        prepare(cfg)
    except Exception as e:
        log.error("cold-ray cannot start: %s", e)
        raise RayServeException(f"cold-ray cannot start: {e}") from e
    return compose(cfg)


def check_exposure(cfg: AppArgs, host: str | None) -> None:
    """Refuse (RuntimeError saying what to set) a server that listens beyond loopback with its
    registry writes or its client routes open. `host`: Serve's http_options.host (None: no
    HTTP proxy)."""
    from cold_ray.serve.auth import Tokens, exposure_problem

    problem = exposure_problem(host, Tokens(cfg.api_key_env, cfg.admin_key_env), cfg)
    if problem is not None:
        raise RuntimeError(problem)


def compose(cfg: AppArgs, engine_options: dict | None = None, ingress_options: dict | None = None):
    """Bind the two deployments; `*_options` override their decorator defaults (tests,
    benchmarks, Python callers)."""
    from cold_ray.serve.ingress import ColdIngress
    from cold_ray.serve.replica import ColdEngine

    data = cfg.model_dump()
    engine = ColdEngine.options(**(engine_options or {})).bind(data)
    return ColdIngress.options(**(ingress_options or {})).bind(engine, data)


def prepare(cfg: AppArgs) -> None:
    """Fetch the model once (before replicas race to) and register the config's adapters."""
    from cold_ray.adapters.registry import refuse_local_in_cluster

    refuse_local_in_cluster(cfg.registry_target())  # a SQLite file cannot serve several nodes
    model_args = cfg.model_args()
    if cfg.adapters:
        register_startup_adapters(cfg, model_args)


def register_startup_adapters(cfg: AppArgs, model_args) -> None:
    """Register each configured adapter that is missing, moved or whose weights changed.

    Config values for alpha/beta/cold_enabled win; otherwise tuned values already in the
    registry (e.g. from `cold-ray eval tune`) are kept across restarts."""
    registry = cfg.open_registry()  # config is trusted: no source roots
    for a in cfg.adapters:
        source = a.resolved_source()
        try:
            old = registry.get(a.name) if a.name in registry else None
            uri = registry.policy.parse(source).uri
            if old is not None and old.source == uri and registry.files_match(old):
                fields = a.model_fields_set & {"alpha", "beta", "cold_enabled"}
                if fields:
                    registry.set_tuned(
                        a.name,
                        a.alpha if "alpha" in fields else old.alpha,
                        a.beta if "beta" in fields else old.beta,
                        a.cold_enabled if "cold_enabled" in fields else old.cold_enabled,
                    )
                continue
            fields = a.model_fields_set
            registry.add(
                a.name,
                source,
                args=model_args,
                max_rank=cfg.engine.max_lora_rank,
                max_bytes=cfg.engine.max_adapter_bytes,
                alpha=a.alpha if "alpha" in fields or old is None else old.alpha,
                beta=a.beta if "beta" in fields or old is None else old.beta,
                cold_enabled=a.cold_enabled
                if "cold_enabled" in fields or old is None
                else old.cold_enabled,
                replace=old is not None,
            )
            log.info("registered startup adapter %s from %s", a.name, source)
        except Exception as e:
            if a.required:
                raise RuntimeError(f"startup adapter {a.name!r} ({source}): {e}") from e
            log.warning("startup adapter %s (%s) not registered: %s", a.name, source, e)
