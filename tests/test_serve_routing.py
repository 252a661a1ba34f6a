"""Adapter-affinity routing (Serve model multiplexing) and accelerator pinning, on a local Ray
cluster with a simulated {"NPU": 2} resource (the device is forced to CPU for the test)."""

import httpx
import pytest

from cold_ray.serve.app_args import AppArgs
from tests.serve_util import local_ray, wait_for

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_llama, tiny_adapters):
    root = tmp_path_factory.mktemp("serve_routing")
    engine = dict(model=str(tiny_llama), max_rows=4, max_model_len=128, max_lora_rank=8)
    base = dict(registry=str(root / "reg.sqlite"), engine=engine)
    with local_ray(num_cpus=2, resources={"NPU": 2}) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {"url": url, "client": client, "base": base, "adapters": tiny_adapters}


def test_adapter_requests_stick_to_the_replica_holding_it(cluster):
    from ray import serve

    from cold_ray.serve.app import compose, prepare

    adapters = [{"name": n, "source": str(p)} for n, p in zip("AB", cluster["adapters"])]
    cfg = AppArgs(
        **{**cluster["base"], "engine": {**cluster["base"]["engine"], "max_loras": 1}},
        adapters=adapters,
    )
    prepare(cfg)
    engine = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}}
    serve.run(compose(cfg, engine), name="route", route_prefix="/route")
    c = cluster["client"]

    def replica(model: str) -> str:
        r = c.post(
            "/route/v1/completions",
            json={"model": model, "prompt": "one two", "max_tokens": 2, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        return r.headers["x-cold-replica"]

    handle = serve.get_deployment_handle("ColdEngine", app_name="route")

    def held() -> dict[str, list[str]]:
        """Each replica's multiplexed adapters (calls land on random replicas: ask until both
        have answered)."""
        seen: dict[str, list[str]] = {}

        def ask():
            info = handle.info.remote().result()
            seen[info["replica"]] = info["multiplexed"]
            return len(seen) == 2

        wait_for(ask, what="both replicas")
        return seen

    def settled():
        """Homes of A and B once each is held by one replica and requests follow it. Until
        then, traffic keeps flowing: a request routed on stale information moves an adapter
        (Serve's LRU, max_loras=1) and the check runs again."""
        h = held()
        a = [r for r, ids in h.items() if "A" in ids]
        b = [r for r, ids in h.items() if "B" in ids]
        routed = [replica("A"), replica("B"), replica("A"), replica("B")]
        if len(a) == 1 and len(b) == 1 and a != b and routed == [a[0], b[0]] * 2:
            return a[0], b[0]
        return None

    # Both replicas serve the base model.
    seen = set()
    wait_for(lambda: seen.add(replica("tiny-llama")) or len(seen) == 2, what="both replicas")
    home_a, home_b = wait_for(settled, timeout=90, what="A and B placed on one replica each")
    interleaved = [(replica("A"), replica("B")) for _ in range(8)]
    assert interleaved == [(home_a, home_b)] * 8
    assert held() == {home_a: ["A"], home_b: ["B"]}
    serve.delete("route")


def test_npu_replicas_get_distinct_devices(cluster):
    from ray import serve

    from cold_ray.serve.app import compose

    cfg = AppArgs(
        **{**cluster["base"], "engine": {**cluster["base"]["engine"], "device": "npu"}},
        simulate_accelerator=True,
    )
    engine = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0, "resources": {"NPU": 1}}}
    serve.run(compose(cfg, engine), name="npu", route_prefix="/npu")
    handle = serve.get_deployment_handle("ColdEngine", app_name="npu")
    infos: dict[str, dict] = {}

    def both_seen():
        info = handle.info.remote().result()
        infos[info["replica"]] = info
        return len(infos) == 2

    wait_for(both_seen, what="both NPU replicas")
    ids = sorted(i["assignment"]["npu_ids"][0] for i in infos.values())
    assert ids == ["0", "1"]
    for info in infos.values():
        (npu,) = info["assignment"]["npu_ids"]
        assert info["assignment"]["ascend_visible"] == npu  # Ray narrowed visibility to it
        assert info["device"] == "cpu"  # simulate_accelerator: computed on CPU
    r = cluster["client"].post("/npu/v1/completions", json={"prompt": "one", "max_tokens": 2})
    assert r.status_code == 200, r.text
    serve.delete("npu")


def test_missing_accelerator_fails_the_start_clearly(cluster):
    from ray import serve

    from cold_ray.serve.app import compose

    cfg = AppArgs(
        **{**cluster["base"], "engine": {**cluster["base"]["engine"], "device": "npu"}},
        simulate_accelerator=True,
    )
    engine = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}  # no NPU requested
    with pytest.raises(RuntimeError, match="nonpu failed"):
        serve.run(compose(cfg, engine), name="nonpu", route_prefix="/nonpu")
    status = serve.status().applications["nonpu"].deployments["ColdEngine"]
    assert "Ray assigned no NPU" in status.message and "resources: {NPU: 1}" in status.message
    serve.delete("nonpu")
