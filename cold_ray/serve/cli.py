"""`cold-ray serve validate FILE...`: check Serve YAMLs offline (Serve's schema plus cold-ray's
own argument validation) before `serve run` / `serve deploy` / a KubeRay RayService."""

from __future__ import annotations

import argparse
import sys


def validate_file(path: str, notes: list[str] | None = None) -> list[str]:
    """Problems found in one Serve config file (YAML, or a RayService embedding one). What the
    file cannot settle alone (tokens come from the environment) is appended to `notes`."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from cold_ray.serve.config import AppArgs

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        return [f"cannot read: {e}"]
    if isinstance(doc, dict) and doc.get("kind") == "RayService":
        doc = yaml.safe_load(doc.get("spec", {}).get("serveConfigV2") or "{}")
    try:
        config = ServeDeploySchema.model_validate(doc)
    except ValidationError as e:
        return [f"not a Serve config: {e}"]
    from cold_ray.serve.auth import needs_admin_token

    problems = []
    host = config.http_options.host
    for app in config.applications:
        if not app.import_path.startswith("cold_ray.serve"):
            continue
        try:
            args = AppArgs.model_validate(app.args or {})
        except ValidationError as e:
            problems.append(f"application {app.name!r}: {e}")
            continue
        if notes is not None and needs_admin_token(host, args):
            notes.append(
                f"application {app.name!r} listens on {host!r}: it starts only with "
                f"{args.admin_key_env} set in the environment of `serve run` (the admin token "
                "for registry writes; set the client token too), or with "
                "allow_unauthenticated_admin: true on a trusted network"
            )
    return problems


def _validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        notes: list[str] = []
        problems = validate_file(path, notes)
        print(f"{path}: {'ok' if not problems else 'INVALID'}")
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        for n in notes:
            print(f"  note: {n}", file=sys.stderr)
        failed |= bool(problems)
    return 1 if failed else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="Ray Serve application tools")
    sub = p.add_subparsers(dest="serve_command", required=True)
    v = sub.add_parser("validate", help="validate Serve YAMLs (Serve schema + cold-ray args)")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=_validate)
