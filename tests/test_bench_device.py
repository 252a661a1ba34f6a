"""`cold-ray bench device` runs end to end (here on the CPU: the same checks a GPU owner runs)."""

import json

import pytest

from cold_ray.benchmarks import device


@pytest.mark.integration
def test_device_check_runs_and_passes_on_cpu(capsys):
    assert device.main(["--device", "cpu", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["device"] == "cpu"
    kernels = result["kernels"]
    assert kernels["cold_step_tokens_equal"] and all(c["ok"] for c in kernels["cases"])
    steps = {(s["mode"], s["batch"]): s for s in result["steps"]["steps"]}
    assert set(steps) == {(m, b) for m in ("base_greedy", "cold") for b in (1, 8)}
    assert steps[("base_greedy", 1)]["weight_gb_s"] > 0
