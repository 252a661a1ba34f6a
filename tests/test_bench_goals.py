"""The benchmarks' map: every goal read from the runs' JSON shapes, run_all's plan over every
tier, and the one-line questions `cold-ray bench --help` lists."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from cold_ray.benchmarks import BENCHMARKS, goals, module_of, run_all
from cold_ray.benchmarks.serving import SCENARIOS


def _rec(mode, batch, tps, threads=1):
    return {"mode": mode, "batch": batch, "threads": threads, "tokens_per_s": tps}


ENGINE = [
    _rec("cold", 1, 27.0),
    _rec("greedy", 1, 30.0),
    _rec("cold", 16, 100.0),
    _rec("base_greedy", 16, 120.0),
    _rec("cold", 16, 150.0, threads=2),
    {
        "mode": "ratios",
        "rows": [
            {"batch": 8, "threads": 1, "cold_speedup_over_naive": 2.1},
            {
                "batch": 16,
                "threads": 1,
                "cold_step_over_greedy_2b_rows": 0.95,
                "greedy_speedup_over_hf": 1.6,
            },
        ],
    },
    {
        "mode": "threads",
        "rows": [{"mode": "cold", "batch": 16, "threads": 2, "tokens_per_s_over_1_thread": 1.5}],
    },
    {
        "mode": "machine",
        "bandwidth_floor": [
            {"mode": "base_greedy", "fraction_of_floor_speed": 0.74},
            {"mode": "greedy", "fraction_of_floor_speed": 0.5},
        ],
    },
]
BASELINES = [
    _rec("vllm_lora_default", 16, 50.0),
    _rec("vllm_lora_fp32_eager", 16, 25.0),
    _rec("vllm_base_fp32_eager", 16, 130.0),
    {"mode": "settings"},
]


def test_every_goal_reads_its_runs_and_says_met_missed_or_unmeasured():
    got = {
        g["goal"]: (g["values"], g["met"])
        for g in goals.evaluate({"engine": ENGINE, "baselines": BASELINES})
    }
    assert got["cold_over_greedy_batch1"] == ({"batch 1": 0.9}, True)
    assert got["cold_step_over_greedy_2b_rows"] == ({"batch 16": 0.95}, False)
    assert got["cold_over_naive"] == ({"batch 8": 2.1}, True)
    assert got["greedy_over_hf"] == ({"batch 16": 1.6}, True)
    assert got["batch1_floor"] == ({"base_greedy batch 1": 0.74}, True)
    assert got["two_threads"] == ({"cold batch 16, 2 threads": 1.5}, False)
    assert got["cold_over_vllm_lora_default"] == ({"batch 16": 2.0}, True)  # one thread only
    assert got["cold_over_vllm_lora_fp32"] == ({"batch 16": 4.0}, True)
    assert got["base_over_vllm_base_fp32"] == ({"batch 16": pytest.approx(0.9231, abs=1e-4)}, False)
    assert got["cold_over_peft_cold"] == ({}, None)  # no peft run: not measured
    assert got["prefix_ttft"] == ({}, None)  # its run is absent
    assert len(got) == len(goals.GOALS) == len(goals.BY_NAME)
    for g in goals.GOALS:
        assert g.op in (">=", "<=") and g.runs and g.key and g.what


def test_each_report_checks_only_the_goals_its_own_run_decides():
    sampling = {
        "sampler": [
            {"mix": "temperature", "fraction_of_step": 0.03},
            {"mix": "mixed", "fraction_of_step": 0.06},
        ]
    }
    (verdict,) = goals.check_run("sampling", sampling)
    assert verdict["goal"] == "sampler_fraction_of_step" and verdict["met"] is False
    assert verdict["values"] == {"temperature": 0.03, "mixed": 0.06}
    engine_only = {g["goal"] for g in goals.check_run("engine", ENGINE)}
    assert "cold_over_naive" in engine_only and "cold_over_vllm_lora_default" not in engine_only
    on = {"variant": "cache on", "ttft_p50_over_reference": 0.2, "tokens_per_s_over_reference": 2}
    prefix = {
        "comparison": [
            {"workload": "chat", "decoding": "cold", **on},
            {"workload": "chat", "decoding": "cold", "variant": "cache off"},
            {"workload": "chat", "decoding": "plain", **on, "ttft_p50_over_reference": 0.9},
        ]
    }
    assert {g["goal"]: g["met"] for g in goals.check_run("serving:prefix", prefix)} == {
        "prefix_ttft": True,
        "prefix_tokens": True,
    }


def test_run_all_covers_every_tier_quick_and_full(tmp_path):
    full = run_all.plan(tmp_path, quick=False, registry=None)
    quick = run_all.plan(tmp_path, quick=True, registry="postgresql://x@h/db")
    assert set(quick) < set(full)
    assert {"serving:vllm", "serving:loadtest", "serving:soak"} == set(full) - set(quick)
    benches = {name.split(":")[0] for name in full}
    assert benches == set(BENCHMARKS) - {"run_all"}  # every benchmark, every tier
    for name, argv in full.items():
        if name.startswith("serving:"):
            assert argv[:2] == ["--scenario", name.split(":")[1]]
            assert argv[1] in SCENARIOS
    assert "--registry" in quick["serving:registry"]
    assert "--registry" not in full["serving:registry"]  # no URL: SQLite only
    for run in {r for g in goals.GOALS for r in g.runs}:
        assert run in full, f"goal reads {run}, which run_all never runs"


def test_bench_help_lists_every_benchmark_and_scenario_with_its_question(capsys):
    from cold_ray.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for name, (_, question) in BENCHMARKS.items():
        assert f"  {name}  " in text and question in " ".join(text.split())
        assert hasattr(importlib.import_module(module_of(name)), "main")
    assert main(["bench", "serving", "--help"]) == 0
    text = capsys.readouterr().out
    for name, (module, question) in SCENARIOS.items():
        module, _, function = module.partition(":")
        assert f"  {name}  " in text and question in text
        scenario = importlib.import_module(f"cold_ray.benchmarks.serving.{module}")
        assert hasattr(scenario, function or "main")


def test_nothing_in_the_product_imports_the_benchmarks():
    root = Path(__file__).resolve().parents[1] / "cold_ray"
    for path in root.rglob("*.py"):
        if "benchmarks" in path.relative_to(root).parts or path == root / "cli.py":
            continue
        assert "cold_ray.benchmarks" not in path.read_text(), path
