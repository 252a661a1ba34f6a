"""A short headless Locust run against the CPU deployment (`deployments/cold.yaml`, SmolLM2):
`cold-ray loadtest` starts `serve run` itself, runs Locust for a few seconds and must report
zero failures and a well-formed summary; then stops the service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.serve, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "deployments" / "adapters" / "arith-demo"


@pytest.fixture(scope="module")
def adapter_overrides(tmp_path_factory):
    """The YAML's demo adapter when it is in the repository, else a random rank-8 one."""
    if (DEMO / "adapter_config.json").exists():
        return []
    from cold_ray.model.loader import default_model_path
    from tests.helpers import make_peft_adapter

    out = tmp_path_factory.mktemp("smol-adapter") / "r8"
    make_peft_adapter(default_model_path(), out, rank=8, std=0.02)
    return ["--set", f"applications.0.args.adapters=[{{name: arith-demo, source: {out}}}]"]


def test_short_locust_run_against_cpu_deployment(tmp_path, adapter_overrides):
    out = tmp_path / "lt"
    cmd = [
        sys.executable,
        "-m",
        "cold_ray.benchmarks.serving.loadtest.cli",
        "--deployment",
        str(REPO / "deployments" / "cold.yaml"),
        "--set",
        f"applications.0.args.registry={tmp_path / 'registry.sqlite'}",
        *adapter_overrides,
        "--users",
        "3",
        "--duration",
        "6s",
        "--out",
        str(out),
        "--max-tokens",
        "uniform:4:12",
        "--prompt-tokens",
        "uniform:48:96",
        "--mix",
        "identical",
        "--max-failure-rate",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO)
    serve_log = (out / "serve.log").read_text()[-3000:] if (out / "serve.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + serve_log
    s = json.loads((out / "summary.json").read_text())
    assert s["requests"] >= 3 and s["failures"] == 0 and s["rejected_503"] == 0, s["errors"]
    assert s["ok"] == s["requests"] and s["rps"] > 0 and s["tokens_per_s"] > 0
    for key in ("latency_ms", "ttft_ms", "itl_ms"):
        assert set(s[key]) >= {"p50", "p95", "p99"} and s[key]["p95"] is not None, key
    assert s["thresholds"]["passed"] and s["run"]["locust"]["nice"] == 10
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"arith-demo"}
    assert {r["decoding"] for r in records} <= {"cold", "plain"}
