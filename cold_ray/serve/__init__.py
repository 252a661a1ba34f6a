"""Ray Serve application: an OpenAI-compatible ingress in front of CoLD engine replicas.

The one public entry point is `build_app`, named by the deployment YAMLs as
`import_path: cold_ray.serve:build_app`. Imported lazily so `cold_ray.serve.cli` stays light.
"""

from __future__ import annotations

__all__ = ["AppArgs", "build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from cold_ray.serve.app import build_app

        return build_app
    if name == "AppArgs":
        from cold_ray.serve.app_args import AppArgs

        return AppArgs
    raise AttributeError(f"module 'cold_ray.serve' has no attribute {name!r}")
