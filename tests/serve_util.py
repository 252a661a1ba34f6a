"""Helpers for the Ray Serve tests: a local Ray cluster that always shuts down, free ports,
a tiny model with a long context and a chat template, and condition polling."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_tiny_model(tiny_model: Path, root: Path, max_len: int = 4096) -> Path:
    """The tiny random model with a longer context (RoPE needs no retraining for a test), so a
    request can run long enough to be interrupted. Same folder name: adapters still match."""
    out = Path(root) / Path(tiny_model).name
    if not (out / "config.json").exists():
        shutil.copytree(tiny_model, out)
        cfg = json.loads((out / "config.json").read_text())
        cfg["max_position_embeddings"] = max_len
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def wait_for(condition, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll `condition()` until it returns a truthy value; return it or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, resources: dict | None = None, metrics_port: int | None = None):
    """A private local Ray cluster with Serve on a free loopback port; yields the HTTP base
    URL. Always shuts Serve and Ray down, leaving no processes behind."""
    import ray
    from ray import serve

    kwargs = {"_metrics_export_port": metrics_port} if metrics_port else {}
    ray.init(
        address="local",
        num_cpus=num_cpus,
        resources=resources or {},
        include_dashboard=False,
        log_to_driver=False,
        **kwargs,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def ray_logs_containing(*needles: str) -> list[str]:
    """Files of the current Ray session's folder (every process's logs) holding a needle."""
    import os

    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    hits = []
    for root, _dirs, files in os.walk(session):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if any(n.encode() in data for n in needles):
                hits.append(path)
    return hits
