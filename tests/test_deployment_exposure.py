"""Every deployment file exposes only the HTTP port (docs/design.md, "Closed by default").

KubeRay builds the head Service from the head container's ports (all of Ray's defaults, GCS
and client included, when it declares none) and the serve Service from the port named
`serve`; a hostPort or hostNetwork would put a port on the node itself. The dashboard is the
one other port a RayService needs (the operator deploys the app through it): allowed only
behind Ray's token authentication, in-cluster, and fenced by a NetworkPolicy to the operator.
"""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cold_ray.serve.auth import is_loopback

ROOT = Path(__file__).resolve().parents[1] / "deployments"
HTTP = 8000
DASHBOARD = 8265
KUBERAY_DASHBOARD_HOST = "0.0.0.0"  # what KubeRay sets when rayStartParams leave it out


def kuberay_docs() -> list[dict]:
    files = sorted((ROOT / "kuberay").glob("*.yaml"))
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def ray_clusters(docs):
    for doc in docs:
        if doc["kind"] == "RayService":
            yield doc, doc["spec"]["rayClusterConfig"]
        elif doc["kind"] == "RayCluster":
            yield doc, doc["spec"]


def pod_specs(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def test_kuberay_pods_and_services_open_only_the_http_port():
    docs = kuberay_docs()
    clusters = list(ray_clusters(docs))
    assert clusters, "no RayService or RayCluster in deployments/kuberay"
    for doc in docs:
        if doc["kind"] == "Service":
            assert {p["port"] for p in doc["spec"]["ports"]} == {HTTP}, doc["metadata"]
    for doc, cluster in clusters:
        token_auth = cluster.get("authOptions", {}).get("mode") == "token"
        head = cluster["headGroupSpec"]
        # The head Service is built from these: none declared would mean all of Ray's ports.
        containers = head["template"]["spec"]["containers"]
        head_ports = {p["containerPort"] for c in containers for p in c.get("ports", [])}
        assert HTTP in head_ports
        assert head_ports - {HTTP} <= ({DASHBOARD} if token_auth else set()), head_ports
        dashboard_host = head["rayStartParams"].get("dashboard-host", KUBERAY_DASHBOARD_HOST)
        assert is_loopback(dashboard_host) or token_auth
        # The head Service carries the dashboard port: it stays inside the cluster.
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        serve_service = doc["spec"].get("serveService")
        if serve_service is not None:
            assert {p["port"] for p in serve_service["spec"]["ports"]} == {HTTP}
        for spec in pod_specs(cluster):
            assert not spec.get("hostNetwork")
            for c in spec["containers"]:
                assert all("hostPort" not in p for p in c.get("ports", [])), c["name"]
        if DASHBOARD in head_ports:
            assert_dashboard_fenced(docs, head["template"]["metadata"]["labels"])
        serve = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
        assert serve.http_options.port == HTTP and not serve.grpc_options.grpc_servicer_functions


def assert_dashboard_fenced(docs: list[dict], pod_labels: dict) -> None:
    """A NetworkPolicy on the Ray pods admits anyone to the HTTP port only, the cluster's own
    pods to anything, and the operator (a named namespace) to the dashboard."""
    policies = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ]
    assert policies, "the dashboard port needs a NetworkPolicy on the Ray pods"
    dashboard_from = []
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule.get("ports", [])}
            sources = rule.get("from")
            if not sources:  # from anywhere
                assert ports == {HTTP}, rule
            elif DASHBOARD in ports:
                dashboard_from += sources
            else:  # every port: only this cluster's own pods
                own = [
                    s["podSelector"]["matchLabels"] for s in sources if s.keys() == {"podSelector"}
                ]
                assert len(own) == len(sources), rule
                assert all(sel and sel.items() <= pod_labels.items() for sel in own), rule
    assert dashboard_from and all(
        s["namespaceSelector"]["matchLabels"] and s["podSelector"]["matchLabels"]
        for s in dashboard_from
    ), dashboard_from


@pytest.mark.parametrize("name", ["cold.yaml", "cold-gpu.yaml", "cold-npu.yaml"])
def test_serve_configs_open_only_the_http_proxy(name):
    """`serve run` starts Ray with its dashboard on 127.0.0.1; a Serve config may add only
    the HTTP proxy (a gRPC proxy opens once servicers are listed)."""
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / name).read_text()))
    assert not config.grpc_options.grpc_servicer_functions
    assert config.http_options.port == HTTP
