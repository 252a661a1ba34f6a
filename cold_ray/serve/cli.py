"""`cold-ray serve`: run a shipped deployment file, and check Serve YAMLs offline.

- `cold-ray serve run [FILE]`: `serve run` on FILE, or on a deployment file shipped in the
  package (`cold.yaml` by default: SmolLM2 + the demo adapter on this CPU) — the embedded
  default from an installed wheel, from any directory.
- `cold-ray serve validate FILE...`: Serve's schema plus cold-ray's own argument validation,
  before `serve run` / `serve deploy` / a KubeRay RayService.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

# The repository's deployments/ (a link in a checkout, a copy in the wheel).
SHIPPED = Path(__file__).resolve().parents[1] / "deployments"


def deployment_file(name: str) -> Path:
    """An existing file, else a file shipped in the package's deployments/."""
    if Path(name).is_file():
        return Path(name)
    shipped = SHIPPED / name
    if shipped.is_file() and shipped.suffix in (".yaml", ".yml"):
        return shipped
    names = sorted(p.name for p in SHIPPED.glob("*.yaml"))
    raise FileNotFoundError(f"{name!r} is neither a file nor a shipped deployment ({names})")


def _run(args: argparse.Namespace) -> int:
    try:
        path = deployment_file(args.config)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Ray's own CLI from this environment, with this process's signals: exec, not a child.
    serve = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    if serve is None:
        print("error: Ray Serve's `serve` command is not installed", file=sys.stderr)
        return 2
    os.execv(serve, [serve, "run", str(path), *args.serve_args])


def validate_file(path: str, notes: list[str] | None = None) -> list[str]:
    """Problems found in one Serve config file (YAML, or a RayService embedding one). What the
    file cannot settle alone (tokens come from the environment) is appended to `notes`."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from cold_ray.serve.app_args import AppArgs

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
    from cold_ray.serve.auth import is_loopback, required_tokens

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
        needed = required_tokens(host, args)
        if notes is not None and needed:
            notes.append(
                f"application {app.name!r} listens on {host!r}: it starts only with "
                f"{' and '.join(needed)} set in the environment of `serve run` (registry "
                "writes and clients), or on a trusted network with "
                "allow_unauthenticated_admin / allow_unauthenticated_clients: true"
            )
        exposed = host is not None and not is_loopback(host)
        if notes is not None and exposed and args.allowed_hosts is None:
            notes.append(
                f"application {app.name!r} listens on {host!r} but answers only loopback Host "
                "names: list the names its clients use in allowed_hosts (or '*')"
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
    r = sub.add_parser("run", help="`serve run` a shipped deployment file (default cold.yaml)")
    r.add_argument(
        "config",
        nargs="?",
        default="cold.yaml",
        help="a Serve YAML, or a shipped one: cold.yaml, cold-gpu.yaml, cold-npu.yaml",
    )
    r.add_argument("serve_args", nargs=argparse.REMAINDER, help="passed on to `serve run`")
    r.set_defaults(func=_run)
    v = sub.add_parser("validate", help="validate Serve YAMLs (Serve schema + cold-ray args)")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=_validate)
