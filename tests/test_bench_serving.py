"""The peer comparison without vLLM and without timing anything: the machine record every
benchmark JSON carries, `bench baselines`' modes (vLLM at its defaults first), and `bench
serving`'s arguments, the command lines it builds for each server and the client, and how it
reads a result `vllm bench serve --save-result` wrote (a fixture cut from a real run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cold_ray.benchmarks import common, goals
from cold_ray.benchmarks.engine import baselines
from cold_ray.benchmarks.serving import peers, vllm_bench
from cold_ray.benchmarks.serving.loadtest.service import apply_override

FIXTURES = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = REPO / "deployments" / "cold.yaml"

# ---- the machine record -----------------------------------------------------------------------


def test_machine_record_names_the_cpu_its_isa_and_torch():
    import torch

    rec = common.machine_record()
    assert rec["cpu"] and rec["cores"] >= 1 and rec["arch"]
    assert set(rec["isa_flags"]) <= set(common.ISA_FLAGS)
    assert isinstance(rec["bf16_instructions"], bool)
    assert rec["torch"] == torch.__version__
    assert rec["torch_threads"] == torch.get_num_threads()
    assert rec["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert len(rec["loadavg_1_5_15"]) == 3
    json.dumps(rec)  # it goes into JSON as it is


@pytest.mark.parametrize(
    "cpuinfo,flags,bf16",
    [
        (
            "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c sha_ni\n",
            ["sse4_2", "avx", "avx2", "fma", "f16c"],
            False,
        ),
        (
            "flags\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\nflags\t: avx2\n",
            ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"],
            True,
        ),
        ("Features\t: fp asimd sve bf16 i8mm\n", ["asimd", "sve", "bf16", "i8mm"], True),
        ("model name\t: something\n", [], False),
    ],
    ids=["avx2-only", "amx (first cpu only)", "arm", "no flags line"],
)
def test_cpu_isa_reads_the_first_flags_line(cpuinfo, flags, bf16):
    assert common.cpu_isa(cpuinfo) == {"isa_flags": flags, "bf16_instructions": bf16}


# ---- bench baselines: defaults first --------------------------------------------------------


def test_baseline_modes_put_vllm_defaults_first_and_map_former_names():
    assert baselines.MODES[:2] == ("vllm_lora_default", "vllm_base_default")
    assert baselines.parse_modes("peft_mixed_cold,vllm_lora_greedy,vllm_lora_default") == [
        "vllm_lora_default",
        "vllm_lora_fp32_eager",
        "peft_mixed_cold",
    ]
    with pytest.raises(ValueError, match="vllm_turbo"):
        baselines.parse_modes("vllm_turbo")
    with pytest.raises(ValueError, match="unknown modes"):
        baselines.parse_modes(",")


def test_baseline_summary_leads_with_defaults_and_says_what_ran():
    def rec(mode, batch, tps, **ran):
        return {"mode": mode, "batch": batch, "tokens_per_s": tps, "wall_s": 1.0, **ran}

    fp32 = {
        "dtype": "float32",
        "enforce_eager": True,
        "compilation_mode": "NONE",
        "vllm_kernels": "_C_AVX2",
    }
    auto = {**fp32, "dtype": "bfloat16", "enforce_eager": False}
    records = [
        rec("peft_mixed_cold", 1, 5.0, dtype="float32"),
        rec("vllm_lora_fp32_eager", 16, 40.0, **fp32),
        rec("vllm_lora_fp32_eager", 1, 9.0, **fp32),
        rec("vllm_lora_default", 16, 30.0, **auto),
        rec("vllm_lora_default", 1, 7.0, **auto),
        rec("vllm_lora_default", 1, 8.0, **auto),
    ]
    summary = baselines.summarize(records)
    assert [(r["mode"], r["batch"]) for r in summary] == [
        ("vllm_lora_default", 1),
        ("vllm_lora_default", 16),
        ("vllm_lora_fp32_eager", 1),
        ("vllm_lora_fp32_eager", 16),
        ("peft_mixed_cold", 1),
    ]
    assert summary[0]["tokens_per_s"] == 7.5 and summary[0]["rounds"] == 2
    assert summary[0]["dtype"] == "bfloat16" and summary[0]["enforce_eager"] is False
    assert summary[2]["dtype"] == "float32" and summary[2]["vllm_kernels"] == "_C_AVX2"


# ---- bench serving: arguments ---------------------------------------------------------------

BAD_ARGUMENTS = [
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "8,x"], "--concurrency"),
    (["--servers", "sglang"], "sglang"),
    (["--servers", ","], "--servers"),
    (["--modes", "lora,fast"], "fast"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "4096"], "--threads 4096 exceeds"),
    (["--replicas", "0"], "--replicas"),
    (["--output-len", "0"], "--output-len"),
    (["--input-len", "1000"], "max_model_len 1024"),
    (["--deployment", "/nonexistent.yaml"], "/nonexistent.yaml"),
    (["--adapter-name", "poems"], "'poems' is not registered"),
]


@pytest.mark.parametrize("argv,named", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_usage_errors_naming_the_problem(argv, named, capsys):
    """Refused before any server or venv is touched."""
    with pytest.raises(SystemExit) as e:
        vllm_bench.parse_args(["--deployment", str(DEPLOYMENT), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and named in err.split("error:", 1)[1], err


def test_defaults_fit_the_deployment_and_name_the_demo_adapter():
    args, facts = vllm_bench.parse_args(["--deployment", str(DEPLOYMENT)])
    assert args.concurrency == [1, 8, 16, 32] and args.servers == ["cold-ray", "vllm"]
    assert args.modes == ["lora", "cold"]
    assert args.input_len + args.output_len <= facts["max_model_len"] == 1024
    assert Path(facts["adapter"], "adapter_config.json").is_file()
    assert facts["max_lora_rank"] == 16 and facts["engine_autoscales"]


# ---- bench serving: the command lines -------------------------------------------------------


def _deployment() -> tuple[dict, dict]:
    config = yaml.safe_load(DEPLOYMENT.read_text())
    return config, peers.deployment_facts(config, "arith-demo")


@pytest.mark.parametrize("threads,replicas", [(1, 1), (2, 2)])
def test_cold_ray_overrides_hold_the_engine_at_the_thread_budget(threads, replicas):
    config, facts = _deployment()
    for assignment in peers.cold_ray_overrides(facts, threads, replicas):
        apply_override(config, assignment)
    app = config["applications"][facts["app"]]
    engine = app["deployments"][facts["engine"]]
    engine_args = app["args"]["engine"] if facts["engine_args"] == "args.engine" else app["args"]
    assert engine["name"] == "ColdEngine" and engine_args["num_threads"] == threads
    scaling = engine["autoscaling_config"]
    assert (
        scaling["min_replicas"]
        == scaling["initial_replicas"]
        == scaling["max_replicas"]
        == replicas
    )


def test_cold_ray_replicas_run_at_the_niceness_vllm_gets(monkeypatch):
    """Ray starts workers at niceness 15; the benchmark asks for ours, set only while the
    server starts."""
    import os

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    env = peers.cold_ray_env()
    assert env == {"RAY_worker_niceness": str(os.nice(0))}
    with peers.environment(env):
        assert os.environ["RAY_worker_niceness"] == env["RAY_worker_niceness"]
    assert "RAY_worker_niceness" not in os.environ
    monkeypatch.setenv("RAY_worker_niceness", "7")
    with pytest.raises(KeyError), peers.environment(env):
        raise KeyError("a failed start")
    assert os.environ["RAY_worker_niceness"] == "7"


def test_deployment_facts_read_either_layout_of_the_engine_args():
    """Engine settings under `engine:` (today's YAML) or beside the app's own (the earlier
    layout): the same facts, and the thread override goes where the settings are."""
    config, facts = _deployment()
    args = config["applications"][0]["args"]
    engine = args.pop("engine", None) or {
        k: args.pop(k) for k in ("max_model_len", "max_lora_rank")
    }
    flat = dict(config, applications=[{**config["applications"][0], "args": {**args, **engine}}])
    nested = dict(
        config, applications=[{**config["applications"][0], "args": {**args, "engine": engine}}]
    )
    got = {
        name: peers.deployment_facts(c, "arith-demo")
        for name, c in (("flat", flat), ("nested", nested))
    }
    assert got["flat"]["engine_args"] == "args" and got["nested"]["engine_args"] == "args.engine"
    for f in got.values():
        assert (f["max_model_len"], f["max_lora_rank"], f["adapter"]) == (
            facts["max_model_len"],
            facts["max_lora_rank"],
            facts["adapter"],
        )
    assert peers.cold_ray_overrides(got["flat"], 2, 1)[0] == "applications.0.args.num_threads=2"
    assert peers.cold_ray_overrides(got["nested"], 2, 1)[0] == (
        "applications.0.args.engine.num_threads=2"
    )


def test_cold_ray_overrides_without_autoscaling_set_num_replicas():
    config, _ = _deployment()
    del config["applications"][0]["deployments"][0]["autoscaling_config"]
    facts = peers.deployment_facts(config, "arith-demo")
    sets = peers.cold_ray_overrides(facts, 1, 1)
    assert sets == [
        f"applications.0.{facts['engine_args']}.num_threads=1",
        "applications.0.deployments.0.num_replicas=1",
    ]


def test_deployment_facts_name_what_is_missing():
    config, _ = _deployment()
    with pytest.raises(ValueError, match="no application with import_path"):
        peers.deployment_facts({"applications": []}, "arith-demo")
    config["applications"][0]["deployments"][0]["name"] = "Engine"
    with pytest.raises(ValueError, match="no ColdEngine deployment"):
        peers.deployment_facts(config, "arith-demo")


def test_vllm_serve_runs_at_its_defaults_with_lora_and_one_bound_thread(tmp_path):
    _, facts = _deployment()
    cmd = peers.vllm_serve_command(tmp_path, facts, "arith-demo", 8123)
    assert cmd[:3] == [str(tmp_path / "bin" / "python"), "-c", peers.VLLM_CLI]
    assert cmd[3:] == [
        "serve",
        facts["model"],
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--enable-lora",
        "--lora-modules",
        f"arith-demo={facts['adapter']}",
        "--max-lora-rank",
        "16",
    ]
    assert not any(a.startswith(("--dtype", "--enforce-eager", "-O")) for a in cmd)
    env = peers.vllm_serve_env(1)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0" and env["VLLM_TARGET_DEVICE"] == "cpu"
    assert peers.vllm_serve_env(2)["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_the_vllm_cli_shim_answers_what_vllms_platform_fallback_does(monkeypatch):
    """The launcher only renames the distribution vLLM's CLI asks about."""
    import importlib.metadata as metadata

    installed = {"vllm-cpu": "0.32.0", "transformers": "5.19.0"}
    monkeypatch.setattr(metadata, "version", lambda name: installed[name])
    exec(peers.VLLM_CLI.split("; sys.argv[0]")[0], {})
    assert metadata.version("vllm") == "0.32.0+cpu"
    assert metadata.version("transformers") == "5.19.0"


def _client_options(cmd: list[str]) -> tuple[dict, set]:
    """The client command's `--flag value` pairs and its bare switches."""
    args = cmd[cmd.index("serve") + 1 :]
    options, switches, i = {}, set(), 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            options[args[i]] = args[i + 1]
            i += 2
        else:
            switches.add(args[i])
            i += 1
    return options, switches


def _workload() -> peers.Workload:
    return peers.Workload(
        model="arith-demo",
        tokenizer="/models/smollm2",
        input_len=256,
        output_len=64,
        prompts_per_user=4,
        min_prompts=16,
        seed=0,
    )


def test_client_command_per_server_and_mode(tmp_path):
    work, result = _workload(), tmp_path / "cold-ray-cold-c16.json"
    cmd = peers.bench_command(tmp_path, "http://127.0.0.1:9", work, "cold-ray", "cold", 16, result)
    assert cmd[3:5] == ["bench", "serve"]
    options, switches = _client_options(cmd)
    assert options["--backend"] == "openai" and options["--endpoint"] == "/v1/completions"
    assert options["--model"] == "arith-demo" and options["--tokenizer"] == "/models/smollm2"
    assert options["--dataset-name"] == "random" and options["--random-input-len"] == "256"
    assert options["--random-output-len"] == "64" and options["--max-concurrency"] == "16"
    assert options["--num-prompts"] == "64" and options["--num-warmups"] == "2"
    assert options["--metric-percentiles"] == "50,99" and options["--temperature"] == "0"
    assert (options["--result-dir"], options["--result-filename"]) == (str(tmp_path), result.name)
    assert json.loads(options["--extra-body"]) == {"cold": True}
    assert {"--ignore-eos", "--save-result", "--save-detailed"} <= switches
    plain = _client_options(
        peers.bench_command(tmp_path, "u", work, "cold-ray", "lora", 16, result)
    )[0]
    assert json.loads(plain["--extra-body"]) == {"cold": False}
    vllm = _client_options(peers.bench_command(tmp_path, "u", work, "vllm", "lora", 16, result))[0]
    assert "--extra-body" not in vllm  # vLLM gets no cold-ray field
    # The same prompts for both servers in one (mode, concurrency), other prompts elsewhere.
    assert vllm["--seed"] == plain["--seed"] != options["--seed"]
    seeds = {work.seed_for(m, c) for m in peers.MODES for c in (1, 8, 16, 32)}
    assert len(seeds) == 8
    assert work.prompts(1) == 16 and work.prompts(32) == 128


# ---- bench serving: reading vLLM's result ---------------------------------------------------


def test_a_saved_result_becomes_the_summary_row():
    result = json.loads((FIXTURES / "vllm_bench_serve_result.json").read_text())
    row = peers.summarize_result(result, output_len=16)
    assert row == {
        **row,
        "ttft_ms_p50": round(result["p50_ttft_ms"], 2),
        "ttft_ms_p99": round(result["p99_ttft_ms"], 2),
        "itl_ms_p50": round(result["p50_itl_ms"], 2),
        "itl_ms_p99": round(result["p99_itl_ms"], 2),
        "tpot_ms_p50": round(result["p50_tpot_ms"], 2),
        "output_tok_s": round(result["output_throughput"], 2),
        "completed": result["completed"],
        "failed": 0,
        "num_prompts": result["num_prompts"],
    }
    assert "first_error" not in row and "requests_short_of_output_len" not in row
    assert row["total_output_tokens"] == result["num_prompts"] * 16


def test_a_result_with_failures_or_short_outputs_says_so():
    result = json.loads((FIXTURES / "vllm_bench_serve_result.json").read_text())
    result.update(
        completed=result["num_prompts"] - 1,
        failed=1,
        errors=["", "HTTP 503: overloaded"] + [""] * (result["num_prompts"] - 2),
        output_lens=[16] * (result["num_prompts"] - 1) + [3],
    )
    row = peers.summarize_result(result, output_len=16)
    assert row["failed"] == 1 and row["first_error"] == "HTTP 503: overloaded"
    assert row["requests_short_of_output_len"] == 1


def test_older_results_with_medians_only_and_missing_keys():
    result = json.loads((FIXTURES / "vllm_bench_serve_result.json").read_text())
    for metric in ("ttft", "itl", "tpot"):
        del result[f"p50_{metric}_ms"]
    assert peers.summarize_result(result)["ttft_ms_p50"] == round(result["median_ttft_ms"], 2)
    del result["p99_itl_ms"]
    with pytest.raises(ValueError, match="'p99_itl_ms'"):
        peers.summarize_result(result)


def test_goals_at_concurrency_16_compare_plain_lora_with_vllm():
    def row(server, mode, concurrency, tps, ttft):
        return {
            "server": server,
            "mode": mode,
            "concurrency": concurrency,
            "output_tok_s": tps,
            "ttft_ms_p50": ttft,
        }

    runs = [
        row("cold-ray", "lora", 16, 120.0, 300.0),
        row("cold-ray", "cold", 16, 60.0, 900.0),
        row("vllm", "lora", 16, 100.0, 250.0),
        row("vllm", "lora", 8, 1.0, 1.0),
    ]
    got = {
        g["goal"]: (g["values"], g["met"]) for g in goals.check_run("serving:vllm", {"runs": runs})
    }
    assert got == {
        "served_tokens_over_vllm": ({"concurrency 16": 1.2}, True),
        "served_ttft_over_vllm": ({"concurrency 16": 1.2}, False),
    }
    # no vLLM run: nothing measured, neither met nor missed
    assert {g["met"] for g in goals.check_run("serving:vllm", {"runs": runs[:2]})} == {None}


def test_vllm_log_says_what_ran():
    log = (FIXTURES / "vllm_serve_engine_config.log").read_text()
    assert peers.vllm_ran_with(log) == {
        "dtype": "bfloat16",
        "enforce_eager": False,
        "compilation_mode": "NONE",
    }
    assert peers.vllm_ran_with("no config here") == {}


def test_plot_draws_every_server_and_mode(tmp_path):
    result = json.loads((FIXTURES / "vllm_bench_serve_result.json").read_text())
    base = peers.summarize_result(result)
    runs = [
        {**base, "server": s, "mode": m, "concurrency": c}
        for s, m in (("cold-ray", "lora"), ("cold-ray", "cold"), ("vllm", "lora"))
        for c in (1, 8, 16)
    ]
    vllm_bench.plot(runs, tmp_path / "serving.png")
    assert (tmp_path / "serving.png").stat().st_size > 0
