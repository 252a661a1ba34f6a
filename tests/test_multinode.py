"""The registry on a real multi-node Ray cluster (`ray.cluster_utils`: several nodes in this
box, each with its own COLD_RAY_CACHE; deployments pinned to nodes by custom resources).

- SQLite: each node reads its own file, so an adapter registered on node A does not exist for
  node B — and the app refuses that configuration, at build and in a replica, saying why.
- PostgreSQL: adapters registered at start and through `POST /v1/adapters` on node A serve
  from an engine replica on node B, which fetches them into its own cache; a node that joins
  later serves them; a removal is seen by the engine replica on another node.
Both leave no Ray or PostgreSQL process behind.
"""

import shutil
import time

import psutil
import pytest

from cold_ray.adapters.peft import weights_sha256
from cold_ray.adapters.registry import RegistryError, default_registry_path, open_registry
from cold_ray.adapters.sources import cache_key
from cold_ray.benchmarks.serving.registry import (
    complete,
    http_json,
    node_cluster,
    pinned,
    serve_folder,
)
from cold_ray.engine import UnknownAdapterError
from cold_ray.model.loader import read_model_args
from tests.postgres import PASSWORD
from tests.serve_util import wait_for

pytestmark = pytest.mark.serve


@pytest.fixture
def caches(tmp_path, monkeypatch):
    paths = {n: tmp_path / f"cache-{n[-1]}" for n in ("node_a", "node_b", "node_c")}
    monkeypatch.setenv("COLD_RAY_CACHE", str(paths["node_a"]))  # this driver sits on node A
    monkeypatch.delenv("COLD_RAY_REGISTRY", raising=False)
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. mp's tracker
    yield paths
    # every Ray process the test started (raylets, workers, Serve) is gone; PostgreSQL is not
    # our child
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = [k for k in psutil.Process().children(recursive=True) if k.pid not in before]
        if not kids:
            break
        time.sleep(0.2)
    assert not kids, f"processes outlived the cluster: {[(k.pid, k.name()) for k in kids]}"


def test_sqlite_on_one_node_is_not_seen_elsewhere_and_the_app_refuses_it(
    caches, tiny_llama, tiny_adapters
):
    import ray
    from ray.serve.exceptions import RayServeException

    from cold_ray.serve.app import build_app
    from cold_ray.serve.app_args import AppArgs

    args = read_model_args(tiny_llama)
    with node_cluster({n: caches[n] for n in ("node_a", "node_b")}):
        with open_registry() as here:  # node A's default file
            here.add("a0", tiny_adapters[0], args=args, max_rank=8)

        @ray.remote(num_cpus=0, resources={"node_b": 1})
        def on_node_b():  # what an engine replica there would read
            with open_registry() as there:
                return str(there.target), [r.name for r in there.list()]

        target_b, names_b = ray.get(on_node_b.remote())
        assert target_b == str(caches["node_b"] / "registry.sqlite") != str(default_registry_path())
        assert names_b == []  # the replica on node B would answer 404 for a0

        cfg = AppArgs(engine=dict(model=str(tiny_llama), max_lora_rank=8))
        with pytest.raises(RayServeException, match="SQLite file.*cluster has 2 nodes.*Post") as e:
            build_app(cfg)  # (a failed build is reported to Serve at once, not retried)
        assert isinstance(e.value.__cause__, RegistryError)

        @ray.remote(num_cpus=0, resources={"node_b": 1})
        def replica_start(data):  # the registry line of every replica's constructor
            AppArgs.model_validate(data).open_registry()

        with pytest.raises(ray.exceptions.RayTaskError, match="SQLite file.*2 nodes"):
            ray.get(replica_start.remote(cfg.model_dump()))


def _engine_answer(adapter: str):
    """The engine replica's own first output for `adapter` (past the ingress's check)."""
    from ray import serve

    from cold_ray.decoding import GenerationRequest, SamplingParams

    request = GenerationRequest(
        "one two three", SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), adapter
    )
    handle = serve.get_deployment_handle("ColdEngine", app_name="cold")
    gen = handle.options(stream=True, multiplexed_model_id=adapter).generate.remote(request)
    first = next(iter(gen))
    gen.cancel()
    return first


def _engine_cache() -> str:
    """The COLD_RAY_CACHE of the engine replica's process: which node's environment it has."""
    from ray import serve

    pid = serve.get_deployment_handle("ColdEngine", app_name="cold").info.remote().result()["pid"]
    return psutil.Process(pid).environ()["COLD_RAY_CACHE"]


def test_postgres_registry_serves_adapters_on_every_node(
    caches, tmp_path, tiny_llama, tiny_adapters, request, monkeypatch
):
    from ray import serve

    from cold_ray.serve.app import compose, prepare
    from cold_ray.serve.app_args import AppArgs

    server = request.getfixturevalue("pg_server")
    url = server.url(server.create_database())
    monkeypatch.setenv("COLD_RAY_REGISTRY_PASSWORD", PASSWORD)  # every node inherits it
    store = tmp_path / "store"  # an object store every node reaches (over HTTP)
    for i, a in enumerate(tiny_adapters):
        shutil.copytree(a, store / f"a{i}")
    keys = [
        cache_key(weights_sha256(a), (a / "adapter_config.json").read_bytes())
        for a in tiny_adapters
    ]  # the name of each adapter's copy in a node's cache

    def fetched(node: str) -> set[str]:
        blobs = caches[node] / "blobs"
        return {p.name for p in blobs.iterdir()} if blobs.exists() else set()

    with (
        serve_folder(store) as files,
        node_cluster({n: caches[n] for n in ("node_a", "node_b")}) as (cluster, base),
    ):
        cfg = AppArgs(
            served_model_name="tiny",
            registry=url,
            adapter_schemes=["file", "http"],
            adapter_roots=[files],
            adapters=[{"name": "boot", "source": f"{files}/a0"}],
            api_key_env="COLD_TEST_NO_KEY",
            admin_key_env="COLD_TEST_NO_KEY",
            engine=dict(model=str(tiny_llama), max_lora_rank=8, max_rows=4, max_model_len=64),
        )
        prepare(cfg)  # registers `boot` from node A (the driver)
        assert fetched("node_a") == {keys[0]} and fetched("node_b") == set()
        serve.run(
            compose(cfg, pinned("node_b", 1), pinned("node_a", 0)), name="cold", route_prefix="/"
        )
        assert _engine_cache() == str(caches["node_b"])

        # registered at start, served on node B from node B's own cache
        status, body = complete(base, "boot")
        assert status == 200 and body["usage"]["completion_tokens"] == 2
        assert fetched("node_b") == {keys[0]}

        # registered through the API on node A, served on node B
        status, body = http_json(
            "POST", f"{base}/v1/adapters", {"name": "posted", "source": f"{files}/a1"}
        )
        assert status == 201, body
        wait_for(lambda: complete(base, "posted")[0] == 200, timeout=30, what="posted served")
        assert fetched("node_b") == {keys[0], keys[1]}

        # a node that joins later serves both, fetching them into its own cache
        cluster.add_node(
            num_cpus=1,
            resources={"node_c": 100},
            env_vars={"COLD_RAY_CACHE": str(caches["node_c"]), "OMP_NUM_THREADS": "1"},
        )
        serve.run(
            compose(cfg, pinned("node_c", 1), pinned("node_a", 0)), name="cold", route_prefix="/"
        )
        wait_for(
            lambda: _engine_cache() == str(caches["node_c"]),
            timeout=60,
            what="the engine on node C",
        )
        for name in ("boot", "posted"):
            assert complete(base, name)[0] == 200
        assert fetched("node_c") == {keys[0], keys[1]}

        # replaced on node A: the replica on node C serves the new version
        status, body = http_json(
            "POST",
            f"{base}/v1/adapters",
            {"name": "posted", "source": f"{files}/a2", "replace": True},
        )
        assert status == 201 and body["sha256"] == weights_sha256(tiny_adapters[2])
        wait_for(
            lambda: complete(base, "posted")[0] == 200 and keys[2] in fetched("node_c"),
            timeout=30,
            what="the new version served on node C",
        )
        # the old version's copy goes once no entry refers to it
        wait_for(lambda: keys[1] not in fetched("node_c"), timeout=30, what="the old copy swept")

        # removed on node A: the engine replica on node C refuses it itself
        assert _engine_answer("posted").error is None
        status, _ = http_json("DELETE", f"{base}/v1/adapters/posted")
        assert status == 200 and complete(base, "posted")[0] == 404
        # within 10 s, under the registry's 30 s resync: NOTIFY carried it, not the resync
        wait_for(
            lambda: isinstance(_engine_answer("posted").error, UnknownAdapterError),
            timeout=10,
            what="the removal to reach node C",
        )
        assert complete(base, "boot")[0] == 200
