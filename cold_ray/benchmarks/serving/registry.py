"""The adapter registry's speed on the request path and across nodes.

    cold-ray bench serving --scenario registry [--backend both] [--adapters 1000] [--calls 200000]
                            [--repeats 5] [--registry postgresql://...] [--out registry.json]

Measures:
- lookup: the engine's resolver (what the step thread calls for every waiting request)
  answering from a replica's in-memory snapshot of a catalog of `--adapters` entries, per
  call, idle and while another writer changes the catalog 20 times a second (the snapshot is
  reloaded under the lookups); goal p99 <= 1 ms. `get()` (a database read) beside it, for scale;
- post_to_first_completion: a two-node Ray cluster (`ray.cluster_utils`), each node with its
  own COLD_RAY_CACHE, the ingress on node A and the engine replica on node B, a PostgreSQL
  registry. Time from `POST /v1/adapters` (a new adapter, served over HTTP, so node B fetches
  it into its own cache) to the first successful completion on it, retried every 5 ms.

PostgreSQL comes from `--registry` (password in $COLD_RAY_REGISTRY_PASSWORD); `python -m
tests.postgres` in a checkout starts a throwaway server and prints both. Without it only the
SQLite lookups run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.server
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cold_ray.benchmarks import goals
from cold_ray.benchmarks.common import free_port, machine_record

# ---- shared with tests/test_multinode.py ------------------------------------------------------


@contextlib.contextmanager
def serve_folder(root: Path):
    """Serve `root` over HTTP on a free loopback port (a stand-in for an object store that
    every node reaches); yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def node_env(cache: Path) -> dict:
    """A node's own environment: its cache folder, and quiet single-threaded workers."""
    return {"COLD_RAY_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def node_cluster(caches: dict[str, Path], port: int | None = None):
    """A Ray cluster of one node per entry of `caches` (name -> its COLD_RAY_CACHE) in this
    box, each offering the custom resource `name` so deployments can be pinned to it; the
    first is the head. Starts Serve on a free loopback port; yields (cluster, base URL). Shuts
    everything down, leaving no process behind."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    (head, head_cache), *workers = caches.items()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {head: 100},
            "env_vars": node_env(head_cache),
            "include_dashboard": False,
        },
    )
    try:
        for name, cache in workers:
            cluster.add_node(num_cpus=1, resources={name: 100}, env_vars=node_env(cache))
        ray.init(address=cluster.address, log_to_driver=False)
        if port is None:
            port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield cluster, f"http://127.0.0.1:{port}"
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def pinned(node: str, num_cpus: float) -> dict:
    return {"ray_actor_options": {"num_cpus": num_cpus, "resources": {node: 1}}}


def http_json(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def complete(base: str, model: str, max_tokens: int = 2) -> tuple[int, dict]:
    return http_json(
        "POST",
        f"{base}/v1/completions",
        {"model": model, "prompt": "one two three", "max_tokens": max_tokens, "temperature": 0},
    )


# ---- lookup latency -----------------------------------------------------------------------


def _percentiles(ns: list[int]) -> dict:
    ns = sorted(ns)
    q = lambda p: ns[min(len(ns) - 1, int(p * len(ns)))] / 1e6  # noqa: E731
    return {"p50_ms": q(0.50), "p99_ms": q(0.99), "p999_ms": q(0.999), "max_ms": ns[-1] / 1e6}


def lookup_latency(
    target: str, adapter: Path, model_args, n: int, calls: int, seconds: float = 3.0
) -> dict:
    from cold_ray.adapters.registry import open_registry

    tmp = Path(tempfile.mkdtemp(prefix="cold-bench-registry-"))
    writer = open_registry(target, cache_dir=tmp / "blobs")
    first = writer.add("bench-0", adapter, args=model_args, max_rank=16, replace=True)
    for i in range(1, n):  # the same files under n names: the catalog's size is what counts
        writer._put(dataclasses.replace(first, name=f"bench-{i}"), replace=True)
    replica = open_registry(target, cache_dir=tmp / "blobs")  # what an engine replica holds
    resolve = replica.resolver()
    names = [f"bench-{random.randrange(n)}" for _ in range(calls)]

    def timed(fn, names) -> list[int]:
        out, clock = [], time.perf_counter_ns
        for name in names:
            t0 = clock()
            fn(name)
            out.append(clock() - t0)
        return out

    idle = timed(resolve, names)
    stop, changes = threading.Event(), [0]

    def churn():
        while not stop.wait(0.05):
            writer.set_tuned(f"bench-{random.randrange(n)}", random.choice([0.1, 0.2]), 1.0)
            changes[0] += 1

    t = threading.Thread(target=churn)
    generation = replica.snapshot().generation
    t.start()
    busy, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:  # long enough for dozens of reloads under the lookups
        busy += timed(resolve, names[:10_000])
    stop.set()
    t.join()
    reloads = replica.snapshot().generation - generation
    db = timed(replica.get, names[: max(1, calls // 100)])
    writer.close()
    replica.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "adapters": n,
        "calls": calls,
        "resolver_idle": _percentiles(idle),
        "resolver_while_changing": {
            **_percentiles(busy),
            "calls": len(busy),
            "changes": changes[0],
            "generations_seen": reloads,
        },
        "get_from_database": _percentiles(db),
    }


# ---- POST on node A -> first completion on node B --------------------------------------------


def post_to_first_completion(url: str, model: str | None, adapters: list[Path], tmp: Path):
    from ray import serve

    from cold_ray.serve.app import compose, prepare
    from cold_ray.serve.app_args import AppArgs

    caches = {"node_a": tmp / "cache-a", "node_b": tmp / "cache-b"}
    os.environ["COLD_RAY_CACHE"] = str(caches["node_a"])  # this driver sits on node A
    store = adapters[0].parent
    runs = []
    with serve_folder(store) as files, node_cluster(caches) as (_, base):
        cfg = AppArgs(
            registry=url,
            adapter_schemes=["file", "http"],
            adapter_roots=[files],
            api_key_env="COLD_BENCH_NO_KEY",
            admin_key_env="COLD_BENCH_NO_KEY",
            engine=dict(model=model, max_lora_rank=16, max_rows=4, max_model_len=128),
        )
        prepare(cfg)
        serve.run(
            compose(cfg, pinned("node_b", 1), pinned("node_a", 0)), name="cold", route_prefix="/"
        )
        status, body = complete(base, cfg.served_model_name or _model_id(model))
        if status != 200:
            raise RuntimeError(f"the base model does not answer: {status} {body}")
        for i, folder in enumerate(adapters):  # the first run also warms the ingress up
            name = f"new-{i}"
            t0 = time.perf_counter()
            status, body = http_json(
                "POST", f"{base}/v1/adapters", {"name": name, "source": f"{files}/{folder.name}"}
            )
            if status != 201:
                raise RuntimeError(f"POST /v1/adapters: {status} {body}")
            registered = time.perf_counter()
            tries = 0
            while True:
                tries += 1
                status, body = complete(base, name, max_tokens=1)
                if status == 200:
                    break
                if status != 404 or time.perf_counter() - t0 > 60:
                    raise RuntimeError(f"completion on {name}: {status} {body}")
                time.sleep(0.005)
            done = time.perf_counter()
            runs.append(
                {
                    "post_ms": (registered - t0) * 1e3,
                    "first_completion_ms": (done - t0) * 1e3,
                    "tries": tries,
                }
            )
    fetched = sorted(p.name for p in (caches["node_b"] / "blobs").iterdir())
    warm = runs[1:] or runs
    firsts = [r["first_completion_ms"] for r in warm]
    return {
        "first_run_after_start": runs[0],
        "warm_runs": warm,
        "median_first_completion_ms": statistics.median(firsts),
        "max_first_completion_ms": max(firsts),
        "not_found_before_success": sum(r["tries"] - 1 for r in warm),
        "node_b_fetched": len(fetched),
    }


def _model_id(model: str | None) -> str:
    from cold_ray.model.loader import DEFAULT_MODEL_NAME

    if model is None:
        return DEFAULT_MODEL_NAME
    p = Path(model.rstrip("/"))
    return p.stem if p.suffix == ".gguf" else p.name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cold-ray bench serving --scenario registry", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--backend",
        choices=["sqlite", "postgresql", "both"],
        help="default: both with --registry, else sqlite",
    )
    p.add_argument("--adapters", type=int, default=1000, help="catalog size for lookups")
    p.add_argument("--calls", type=int, default=200_000, help="timed lookups per phase")
    p.add_argument(
        "--repeats",
        type=int,
        default=6,
        help="POST -> completion runs (the first, after start, reported apart)",
    )
    p.add_argument("--model", default=None, help="served model (default: SmolLM2-135M)")
    p.add_argument(
        "--registry",
        default=None,
        help="a postgresql:// URL (password in $COLD_RAY_REGISTRY_PASSWORD); "
        "without it, --backend sqlite",
    )
    p.add_argument("--skip-cluster", action="store_true", help="lookups only")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)

    from cold_ray.benchmarks.common import make_adapter
    from cold_ray.model.loader import read_model_args, resolve_model_path

    a.backend = a.backend or ("both" if a.registry else "sqlite")
    if a.backend != "sqlite" and a.registry is None:
        p.error(
            f"--backend {a.backend} needs --registry postgresql://... (`python -m "
            "tests.postgres` starts a throwaway server)"
        )

    tmp = Path(tempfile.mkdtemp(prefix="cold-bench-registry-"))
    model_path = resolve_model_path(a.model)  # the nodes read it where it is (a shared folder)
    model_args = read_model_args(model_path)
    adapters = [
        make_adapter(model_args, tmp / "store" / f"adapter-{i}", rank=8, seed=i)
        for i in range(max(1, a.repeats))
    ]
    result = {"loadavg_1m": os.getloadavg()[0], "machine": machine_record()}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        url = a.registry
        if a.backend in ("sqlite", "both"):
            result["lookup_sqlite"] = lookup_latency(
                str(tmp / "registry.sqlite"), adapters[0], model_args, a.adapters, a.calls
            )
        if a.backend in ("postgresql", "both"):
            result["lookup_postgresql"] = lookup_latency(
                url, adapters[0], model_args, a.adapters, a.calls
            )
            if not a.skip_cluster:
                result["post_to_first_completion"] = post_to_first_completion(
                    url, str(model_path), adapters, tmp
                )
    result["goals"] = goals.check_run("serving:registry", result)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
