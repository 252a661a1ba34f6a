"""The service under test: `serve run <yaml>` as a subprocess, or a server already running.

`Service.from_yaml(...)` copies the deployment YAML into the output folder with the HTTP
port (a free one by default, so parallel runs and other Serve apps on the machine do not
collide) and any `--set key.path=value` overrides applied, starts `serve run` on its own local
Ray cluster (`--address local`: never attach to someone else's cluster), waits for
`GET /health`, and stops it with SIGTERM (`serve run` started from a script ignores SIGINT).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cold_ray.benchmarks.common import free_port


class ServiceError(RuntimeError):
    pass


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def apply_override(config: dict, assignment: str) -> None:
    """`a.b.0.c=VALUE` sets config["a"]["b"][0]["c"] to VALUE parsed as YAML."""
    import yaml

    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"override {assignment!r} must look like key.path=value")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {assignment!r}: {part!r} is not an index of a list")
            idx = int(part)
            if last:
                node[idx] = yaml.safe_load(raw)
            else:
                node = node[idx]
        else:
            if last:
                node[part] = yaml.safe_load(raw)
            else:
                node = node.setdefault(part, {})


class Service:
    """A running cold-ray HTTP endpoint (`url`), started here or found running."""

    def __init__(self, url: str, proc: subprocess.Popen | None = None, log: Path | None = None):
        self.url = url.rstrip("/")
        self.proc = proc
        self.log = log

    @classmethod
    def attach(cls, url: str, timeout: float = 10.0) -> Service:
        svc = cls(url)
        svc.wait_healthy(timeout)
        return svc

    @classmethod
    def from_yaml(
        cls,
        yaml_path: str | Path,
        out_dir: Path,
        port: int = 0,
        overrides: list[str] = (),
        timeout: float = 300.0,
    ) -> Service:
        import yaml

        config = yaml.safe_load(Path(yaml_path).read_text())
        port = port or free_port()
        config.setdefault("http_options", {})
        config["http_options"]["host"] = "127.0.0.1"
        config["http_options"]["port"] = port
        for assignment in overrides:
            apply_override(config, assignment)
        out_dir.mkdir(parents=True, exist_ok=True)
        run_yaml = out_dir / "deployment.yaml"
        run_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
        serve = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.pop("RAY_ADDRESS", None)
        log = out_dir / "serve.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [serve, "run", "--address", "local", str(run_yaml)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        svc = cls(f"http://127.0.0.1:{port}", proc, log)
        try:
            svc.wait_healthy(timeout)
        except BaseException:
            svc.stop()
            raise
        return svc

    def wait_healthy(self, timeout: float) -> None:
        """Poll `GET /health` (and `/v1/models`: the app must route) until both answer 200."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(
                    f"serve run exited with code {self.proc.returncode} before the app was "
                    f"healthy; last lines of {self.log}:\n{self.log_tail()}"
                )
            try:
                status, _ = http_get(f"{self.url}/health")
                if status == 200:
                    status, body = http_get(f"{self.url}/v1/models")
                    if status == 200 and json.loads(body).get("data"):
                        return
                last = f"HTTP {status}"
            except (OSError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.5)
        raise ServiceError(f"{self.url} not healthy after {timeout:.0f} s ({last})")

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to `serve run` (it shuts its Ray cluster down); SIGKILL its group if stuck."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def replica_pids(self) -> list[int]:
        """Process ids of this cluster's Serve replica actors (for RSS sampling)."""
        import psutil

        if self.proc is None:
            return []
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        pids = []
        for p in procs:
            try:
                title = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "ServeReplica" in title:
                pids.append(p.pid)
        return pids

    def metrics_urls(self) -> list[str]:
        """Prometheus endpoints of this cluster: the ports Ray's dashboard agent listens on.

        Ray picks the metrics export port at start (`--metrics-export-port=0`), so it is found
        here rather than configured; callers try each URL for Prometheus text.
        """
        import psutil

        if self.proc is None:
            return []
        urls = []
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                if "DashboardAgent" not in " ".join(p.cmdline()):
                    continue
                conns = p.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    urls.append(f"http://127.0.0.1:{c.laddr.port}/metrics")
        return sorted(set(urls))

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
