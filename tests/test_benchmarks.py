"""The measurement side of the benchmarks, without timing anything: FLOP accounting against the
model's real tensors, argument validation, the JSON each benchmark reports, that the
shared-prefix workloads really share a prefix token-wise, and small real runs on the tiny
model (their numbers are not checked, only what they count)."""

from __future__ import annotations

import json
import os

import pytest

from cold_ray.benchmarks import goals
from cold_ray.benchmarks.engine import throughput as bench_engine
from cold_ray.benchmarks.micro import attention, gemm, roofline
from cold_ray.benchmarks.serving import arrivals, item_latency
from cold_ray.benchmarks.workloads import (
    PREFIX_KINDS,
    SYSTEM_PROMPT,
    fewshot_prefix,
    question_pool,
    shared_prefix_requests,
)

# ---- FLOP and byte accounting -----------------------------------------------------------------


def test_param_counts_match_the_models_tensors(tiny_llama):
    """Linear, LM-head and LoRA-slot counts are those of the tensors a decode row touches."""
    from cold_ray.model.llama import LlamaModel
    from cold_ray.model.loader import read_model_args

    args = read_model_args(tiny_llama)
    model = LlamaModel(args, max_loras=2, max_rank=8, max_len=32)
    counts = roofline.model_params(args, max_lora_rank=8)
    linears = model.lora_linears()
    assert counts["linear"] == sum(m.weight.numel() for m in linears)
    assert counts["lora_slot"] == sum(m.lora_A[0].numel() + m.lora_B[0].numel() for m in linears)
    assert counts["lm_head"] == model.lm_weight.numel()
    assert roofline.weight_bytes(counts) == 4 * (counts["linear"] + counts["lm_head"])
    assert (
        roofline.weight_bytes(counts, lora=True)
        == roofline.weight_bytes(counts) + 4 * counts["lora_slot"]
    )


def test_smollm2_counts_its_134_5m_parameters(smollm2):
    from cold_ray.model.loader import read_model_args

    counts = roofline.model_params(read_model_args(smollm2), max_lora_rank=16)
    assert counts["linear"] == 30 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536)
    assert counts["linear"] + counts["lm_head"] == 134_479_872  # tied embeddings, no norms


def test_decode_step_flops_per_mode():
    c = {"linear": 1000, "lm_head": 500, "lora_slot": 40, "hidden": 10, "vocab": 50}
    assert roofline.decode_step_flops(c, "base_greedy", 4) == 2 * 4 * 1500
    assert roofline.decode_step_flops(c, "greedy", 4) == 2 * 4 * 1540
    # CoLD at 2: two expert rows (base + LoRA + full head), two amateur rows (base + K tokens)
    want = 2 * (2 * 2 * 1000 + 2 * 40 + 2 * 500 + 2 * 3 * 10)
    assert roofline.decode_step_flops(c, "cold", 2, candidates=3) == want
    # rows x K >= V: the restricted step runs the full head instead (as restricted_torch does)
    full = 2 * (2 * 2 * 1000 + 2 * 40 + 2 * 500 + 2 * 50 * 10)
    assert roofline.decode_step_flops(c, "cold", 2, candidates=30) == full
    with pytest.raises(ValueError, match="candidate"):
        roofline.decode_step_flops(c, "cold", 2)
    with pytest.raises(ValueError, match="no FLOP count"):
        roofline.decode_step_flops(c, "hf_generate_greedy", 2)


def test_gemm_peak_reports_every_shape_and_the_best():
    out = roofline.measure_gemm_peak(shapes=((8, 16, 32), (4, 8, 8)), repeats=1)
    assert [s["shape"] for s in out["shapes"]] == [[8, 16, 32], [4, 8, 8]]
    best = max(v for s in out["shapes"] for v in (s["mm_gflop_s"], s["packed_gflop_s"]) if v)
    assert out["peak_gflop_s"] == best > 0
    assert roofline.measure_bandwidth(mib=1, repeats=1) > 0
    rates = roofline.measure_bandwidths(mib=8, repeats=1)  # 8 MiB: a huge-page buffer too
    assert set(rates) == {"4k_pages", "huge_pages"} and all(v > 0 for v in rates.values())


def test_gemm_reports_each_route_for_the_rows_it_serves():
    """The small-batch route appears only for the row counts it serves; the panel kernel for
    every count, at this CPU's register block and at each one asked for."""
    from cold_ray.kernels import cpu_gemm
    from cold_ray.model.lora import SMALL_ROWS

    tiny = {
        "hidden": 32,
        "intermediate": 48,
        "heads": 2,
        "kv_heads": 1,
        "head_dim": 16,
        "layers": 1,
        "vocab": 64,
    }
    out = gemm.measure([1, 33], repeats=1, model=tiny, threads=2, row_blocks=[2, 8])
    small, big = out
    assert {"linear_gflops", "w_xt_gflops", "small_batch_gflops"} <= small.keys()
    assert "small_batch_gflops" not in big and SMALL_ROWS < 33
    assert all("head_linear_gflops" in rec for rec in out)
    kernel = {
        "panels_gflops",
        "panels_rb2_gflops",
        "panels_rb8_gflops",
        "head_rows_gflops",
        "head_panels_gflops",
    }
    assert all((kernel <= rec.keys()) == (cpu_gemm.load() is not None) for rec in out)
    assert all(v > 0 for rec in out for k, v in rec.items() if k.endswith("_gflops"))


def test_attention_bench_counts_the_kv_bytes_of_ragged_rows():
    """SDPA and the kernel are timed over the same K/V: the bytes of every row's positions."""
    from cold_ray.kernels import cpu_attention

    model = {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16}
    rec = attention.measure(rows=3, context=20, repeats=1, model=model)
    assert (rec["rows"], rec["context"]) == (3, 20)
    kv_bytes = rec["sdpa_gb_s"] * rec["sdpa_ms"] * 1e6
    per_position = 2 * 2 * 2 * 16 * 4  # K and V, layers, kv heads, head_dim, fp32
    positions = kv_bytes / per_position  # sum over rows of (position + 1), each in 6..21
    assert abs(positions - round(positions)) < 1e-6 and 3 * 6 <= round(positions) <= 3 * 21
    assert ("kernel_ms" in rec) == (cpu_attention.load() is not None)
    if "kernel_ms" in rec:
        assert rec["kernel_over_sdpa"] == pytest.approx(rec["kernel_ms"] / rec["sdpa_ms"])


# ---- bench engine -----------------------------------------------------------------------------


def test_engine_plan_pairs_cold_at_b_with_greedy_at_2b():
    assert bench_engine.runs(["cold", "greedy"], [1, 2], pair_greedy=True) == [
        ("cold", 1),
        ("greedy", 1),
        ("cold", 2),
        ("greedy", 2),
        ("greedy", 4),
    ]
    assert ("greedy", 2) in bench_engine.runs(["cold"], [1], True)
    assert bench_engine.runs(["cold"], [1], False) == [("cold", 1)]
    assert bench_engine.runs(["greedy"], [1], True) == [("greedy", 1)]


def test_engine_ratios_and_machine_summary():
    def rec(mode, batch, step_ms, **kw):
        return {
            "mode": mode,
            "batch": batch,
            "step_ms": step_ms,
            "tokens_per_s": 1.0,
            "peak_rss_bytes": 1,
            **kw,
        }

    summary = [
        rec("cold", 1, 30.0, gflop_s=8.0, rows=2, gflop_per_step=0.5, attention_gflop_per_step=0.1),
        rec("greedy", 1, 20.0, gflop_s=6.0, rows=1, weight_bytes=2 * 2**30),
        rec(
            "greedy", 2, 40.0, gflop_s=6.0, rows=2, gflop_per_step=0.7, attention_gflop_per_step=0.1
        ),
        rec("base_greedy", 1, 10.0, gflop_s=5.0, rows=1, weight_bytes=2**30),
    ]
    (row,) = bench_engine.ratios(summary)
    assert row["threads"] == 1 and row["cold_step_over_greedy"] == 1.5
    assert row["cold_step_over_greedy_2b_rows"] == 0.75
    assert row["cold_flop_over_greedy_2b_rows"] == pytest.approx(0.6 / 0.8)  # attention counted
    machines = [
        {"peak_gflop_s": 40.0, "bandwidth_gib_s": 100.0, "gemm": []},
        {"peak_gflop_s": 80.0, "bandwidth_gib_s": 200.0, "gemm": []},
        {"peak_gflop_s": 60.0, "bandwidth_gib_s": 150.0, "gemm": []},
    ]
    m = bench_engine.machine_summary(machines, summary)
    assert m["peak_gflop_s"] == 60.0 and m["bandwidth_gib_s"] == 150.0  # medians
    frac = {(e["mode"], e["batch"]): e["fraction_of_peak"] for e in m["efficiency"]}
    assert frac[("cold", 1)] == pytest.approx(8 / 60)
    floor = {f["mode"]: f for f in m["bandwidth_floor"]}
    assert floor["base_greedy"]["floor_step_ms"] == pytest.approx(1000 / 150)
    assert floor["base_greedy"]["fraction_of_floor_speed"] == pytest.approx(1000 / 150 / 10)
    assert floor["greedy"]["floor_step_ms"] == pytest.approx(2000 / 150)


def test_engine_compares_each_thread_count_with_one_thread():
    def rec(mode, batch, threads, tokens_per_s, step_ms):
        return {
            "mode": mode,
            "batch": batch,
            "threads": threads,
            "step_ms": step_ms,
            "tokens_per_s": tokens_per_s,
            "peak_rss_bytes": 100 * threads,
        }

    summary = [
        rec("cold", 16, 1, 50.0, 100.0),
        rec("cold", 16, 2, 90.0, 55.0),
        rec("greedy", 16, 2, 80.0, 40.0),
        rec("cold", 8, 1, 40.0, 60.0),
        rec("cold", 8, 2, 60.0, 40.0),
    ]
    rows = {(r["mode"], r["batch"]): r for r in bench_engine.thread_scaling(summary)}
    assert set(rows) == {("cold", 16), ("cold", 8)}  # greedy at 16 has no 1-thread run
    assert rows["cold", 16]["tokens_per_s_over_1_thread"] == pytest.approx(1.8)
    assert rows["cold", 16]["step_speedup_over_1_thread"] == pytest.approx(100 / 55)
    assert rows["cold", 16]["peak_rss_over_1_thread"] == 2.0
    assert rows["cold", 16]["goal"] == 1.7 and "goal" not in rows["cold", 8]
    # ratios are taken within one thread count: CoLD at 2 threads never meets greedy at 1
    by_threads = {(r["threads"], r["batch"]): r for r in bench_engine.ratios(summary)}
    assert by_threads[2, 16]["cold_step_over_greedy"] == pytest.approx(55 / 40)
    assert (1, 16) not in by_threads  # no greedy at 16 on one thread


def test_engine_summary_keeps_thread_counts_apart():
    records = [
        {
            "mode": "cold",
            "batch": 1,
            "threads": t,
            "tokens_per_s": v,
            "step_ms": 1.0,
            "peak_rss_bytes": 1,
            "wall_s": 1.0,
        }
        for t, v in ((None, 1.0), (2, 3.0), (2, 5.0))
    ]
    one, two = bench_engine.summarize(records)
    assert (one["threads"], one["rounds"], one["tokens_per_s"]) == (1, 1, 1.0)
    assert (two["threads"], two["rounds"], two["tokens_per_s"]) == (2, 2, 4.0)


@pytest.mark.parametrize("mode", ["cold", "greedy", "base_greedy"])
def test_engine_run_counts_a_full_decode_step(tiny_llama, tiny_adapters, mode):
    rec = bench_engine.run_cold_ray(mode, 2, 8, 6, str(tiny_adapters[0]), str(tiny_llama))
    rows = 4 if mode == "cold" else 2
    assert rec["rows"] == rows and rec["decode_steps"] >= 1 and rec["prefix_hit_tokens"] == 0
    assert 0 < rec["prefill_s"] < rec["wall_s"]
    assert (rec["weight_dtype"], rec["compute_dtype"]) == ("float32", "float32")  # the default
    from cold_ray.model.loader import read_model_args

    counts = roofline.model_params(read_model_args(tiny_llama), 16)
    k = rec["amateur_candidates"]
    assert (k is not None and k >= 1) == (mode == "cold")
    assert rec["gflop_per_step"] * 1e9 == pytest.approx(
        roofline.decode_step_flops(counts, mode, 2, k)
    )
    assert rec["gflop_s"] == pytest.approx(rec["gflop_per_step"] / rec["step_ms"] * 1e3)


def test_engine_settings_reach_the_engine(tiny_llama, tiny_adapters, monkeypatch):
    """`--engine NAME=VALUE` is parsed as JSON and builds cold-ray's engine with it."""
    from cold_ray.engine import EngineCore

    assert bench_engine.engine_setting("cpu_rowwise_kernels=false") == (
        "cpu_rowwise_kernels",
        False,
    )
    assert bench_engine.engine_setting("request_timeout_s=null") == ("request_timeout_s", None)
    assert bench_engine.engine_setting("lora_backend=gather_bmm") == ("lora_backend", "gather_bmm")
    seen = []
    init = EngineCore.__init__
    monkeypatch.setattr(
        EngineCore,
        "__init__",
        lambda self, config, *a: seen.append(config) or init(self, config, *a),
    )
    bench_engine.run_cold_ray(
        "greedy",
        1,
        8,
        2,
        str(tiny_adapters[0]),
        str(tiny_llama),
        {"cpu_rowwise_kernels": False, "lora_backend": "gather_bmm"},
    )
    assert [(c.cpu_rowwise_kernels, c.lora_backend) for c in seen] == [(False, "gather_bmm")]


def test_a_cold_run_can_ask_logprobs(tiny_llama, tiny_adapters):
    """`--logprobs N` times CoLD with the amateur's full head, end to end on the tiny model."""
    runs = [
        bench_engine.run_cold_ray(
            "cold", 2, 8, 3, str(tiny_adapters[0]), str(tiny_llama), {}, logprobs=n
        )
        for n in (None, 2)
    ]
    assert all(r["wall_s"] > 0 and r["step_ms"] > 0 for r in runs)


# ---- argument validation ----------------------------------------------------------------------

BAD_ARGUMENTS = [  # (benchmark, argv, what the usage error must name)
    ("engine", ["--batches", "0"], "--batches"),
    ("engine", ["--batches", "1,x"], "--batches"),
    ("engine", ["--modes", "fast"], "fast"),
    ("engine", ["--rounds", "0"], "--rounds"),
    ("engine", ["--new-tokens", "0"], "--new-tokens"),
    ("engine", ["--engine", "turbo=true"], "turbo"),
    ("engine", ["--engine", "max_rows=8"], "max_rows"),  # the benchmark sets it per run
    ("engine", ["--engine", "cpu_rowwise_kernels=False"], "takes true or false"),
    ("engine", ["--engine", "num_threads=0"], "num_threads must be greater than or equal to 1"),
    ("engine", ["--engine", "dtype=fp8"], "dtype must be 'auto', 'float32'"),
    ("engine", ["--threads", "0"], "--threads"),
    ("engine", ["--logprobs", "-1"], "--logprobs must be >= 0"),
    ("engine", ["--threads", "2", "--engine", "num_threads=2"], "not both"),
    ("prefix", ["--users", "0"], "--users"),
    ("prefix", ["--workloads", "poems"], "poems"),
    ("prefix", ["--decodings", "cold,fast"], "fast"),
    ("prefix", ["--adapter", "/nonexistent"], "/nonexistent"),
    ("prefix", ["--users", "600", "--requests-per-user", "2"], "at most 1000 requests"),
    ("prefix", ["--shots", "-1"], "--shots"),
    ("itl", ["--budgets", "0"], "--budgets"),
    ("itl", ["--budgets", "a"], "--budgets"),
    ("itl", ["--streams", "0"], "--streams"),
    ("item_latency", ["--n", "0"], "--n"),
    ("item_latency", ["--rounds", "3", "--n", "2"], "--rounds 3 exceeds --n 2"),
    ("item_latency", ["--max-rows", "1"], "--max-rows"),
    ("item_latency", ["--adapter", "/nonexistent"], "/nonexistent"),
    ("item_latency", ["--max-tokens", "0"], "--max-tokens"),
    ("gemm", ["--rows", "1,x"], "--rows"),
    ("gemm", ["--rows", "0"], "--rows"),
    ("gemm", ["--repeats", "0"], "--repeats"),
    ("attention", ["--rows", "0"], "--rows"),
    ("attention", ["--context", "8,x"], "--context"),
    ("attention", ["--repeats", "0"], "--repeats"),
]


@pytest.mark.parametrize(
    "bench,argv,named", BAD_ARGUMENTS, ids=[f"{b[0]} {' '.join(b[1])}" for b in BAD_ARGUMENTS]
)
def test_bad_arguments_are_usage_errors_naming_the_problem(bench, argv, named, capsys):
    """Refused before anything runs (engine parses in main, which would otherwise start
    benchmark children), with argparse's usage error saying which value was wrong."""
    parse = {
        "engine": bench_engine.main,
        "item_latency": item_latency.parse_args,
        "prefix": lambda a: arrivals.parse_args("prefix", a),
        "itl": lambda a: arrivals.parse_args("itl", a),
        "gemm": gemm.main,
        "attention": attention.parse_args,
    }[bench]
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and named in err.split("error:", 1)[1], err  # not just the usage line


# ---- shared-prefix workloads ------------------------------------------------------------------


def test_shared_prefix_requests_are_seeded_and_distinct():
    a, b = shared_prefix_requests("fewshot", 16, seed=0), shared_prefix_requests("fewshot", 16)
    assert a == b and a != shared_prefix_requests("fewshot", 16, seed=1)
    prompts = [r["prompt"] for r in a]
    assert len(set(prompts)) == 16
    head = fewshot_prefix(8)
    assert all(p.startswith(head) and p.endswith("\nAnswer:") for p in prompts)
    assert head.count("\n#### ") == 8 and set(question_pool()).isdisjoint(head.split("\n"))
    chats = shared_prefix_requests("chat", 4, seed=3)
    assert all(c["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT} for c in chats)
    assert len({c["messages"][1]["content"] for c in chats}) == 4
    for bad in (("fewshot", -1), ("fewshot", 1001), ("poems", 2)):
        with pytest.raises(ValueError):
            shared_prefix_requests(*bad)


@pytest.mark.parametrize("kind", PREFIX_KINDS)
def test_shared_prefix_workloads_share_their_prefix_token_wise(kind, smollm2):
    """As the engine sees them (chat template included): every prompt starts with the same
    long run of tokens, hundreds of prefix-cache blocks' worth, then differs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    ids = [arrivals.prompt_ids(tok, body) for body in shared_prefix_requests(kind, 16)]
    common = len(os.path.commonprefix(ids))
    shared_text = fewshot_prefix(8) if kind == "fewshot" else SYSTEM_PROMPT
    assert common >= len(tok.encode(shared_text, add_special_tokens=False)) - 1
    assert common >= (600 if kind == "fewshot" else 350)
    assert all(len(x) >= common + 10 for x in ids)  # each goes on with its own question
    assert len({tuple(x[common:]) for x in ids}) == 16


def _run(workload, decoding, variant, p50, tps, digest="d", itl=None):
    return {
        "scenario": "prefix" if workload != "streams" else "itl",
        "workload": workload,
        "decoding": decoding,
        "variant": variant,
        "ttft_ms": {"p50": p50, "p95": 2 * p50},
        "tokens_per_s": tps,
        "prefix_hit_rate": 0.9 if variant == "cache on" else None,
        "prompt_tokens_computed_fraction": 0.1,
        "tokens_digest": digest,
        "itl_ms": itl or {"p50": None, "p99": None, "max": None, "count": 0},
        "long_ttft_ms": {"p50": 9.0} if isinstance(variant, int) else None,
    }


def test_prefix_compare_ratios_goals_and_exactness():
    rows = arrivals.compare(
        [
            _run("chat", "cold", "cache on", 20.0, 30.0),
            _run("chat", "cold", "cache off", 100.0, 10.0),
            _run("fewshot", "cold", "cache on", 50.0, 12.0, "x"),
            _run("fewshot", "cold", "cache off", 100.0, 10.0),
        ]
    )
    chat, chat_off, few, _ = rows
    assert chat["ttft_p50_over_reference"] == 0.2 and chat["tokens_per_s_over_reference"] == 3.0
    assert chat["same_tokens_as_reference"] and not few["same_tokens_as_reference"]
    assert "ttft_p50_over_reference" not in chat_off  # the reference itself
    got = {
        g["goal"]: (g["values"], g["met"])
        for g in goals.check_run("serving:prefix", {"comparison": rows})
    }
    assert got["prefix_ttft"] == ({"chat CoLD": 0.2, "fewshot CoLD": 0.5}, False)
    assert got["prefix_tokens"] == ({"chat CoLD": 3.0, "fewshot CoLD": 1.2}, False)


def test_itl_compare_against_no_arrivals():
    quiet = {"p50": 2.0, "p99": 4.0, "max": 5.0, "count": 9}
    rows = arrivals.compare(
        [
            _run("streams", "plain", "none", 1.0, 10.0, itl=quiet),
            _run("streams", "plain", 64, 1.0, 10.0, itl={**quiet, "p50": 3.0, "p99": 12.0}),
        ]
    )
    assert rows[1]["itl_p50_over_reference"] == 1.5 and rows[1]["itl_p99_over_reference"] == 3.0
    assert rows[1]["long_ttft_p50_ms"] == 9.0 and "long_ttft_p50_ms" not in rows[0]


def test_settings_keep_variants_adjacent_and_alternate_their_order(capsys):
    args = arrivals.parse_args(
        "prefix", ["--rounds", "2", "--workloads", "chat", "--decodings", "cold"]
    )
    assert [s["variant"] for s in arrivals.settings(args)] == [
        "cache on",
        "cache off",
        "cache off",
        "cache on",
    ]
    args = arrivals.parse_args("itl", ["--budgets", "64,1024", "--rounds", "2"])
    assert [s["variant"] for s in arrivals.settings(args)] == ["none", 64, 1024, 1024, 64, "none"]
    with pytest.raises(SystemExit):
        arrivals.parse_args(
            "itl",
            [
                "--stream-tokens",
                "40",
                "--arrive-at",
                "16",
                "--arrive-every",
                "24",
                "--long-prompts",
                "2",
            ],
        )
    assert "raise it above 40" in capsys.readouterr().err


def test_prefix_run_hits_the_cache_and_keeps_the_tokens(tiny_llama, tiny_adapters):
    """One user, two requests back to back: the second reuses the first's prefix blocks; with
    the cache off nothing is reused; both give the same tokens."""
    args = arrivals.parse_args(
        "prefix",
        [
            "--users",
            "1",
            "--requests-per-user",
            "2",
            "--interval-ms",
            "0",
            "--new-tokens",
            "3",
            "--shots",
            "0",
            "--max-prefill-tokens",
            "64",
            "--prefix-cache-mib",
            "4",
            "--adapter",
            str(tiny_adapters[0]),
            "--model",
            str(tiny_llama),
            "--workloads",
            "fewshot",
            "--decodings",
            "cold",
        ],
    )
    on, off = (arrivals.run_setting(s) for s in arrivals.settings(args))
    assert on["requests"] == off["requests"] == 2
    assert on["generated_tokens"] == off["generated_tokens"] == 6
    assert on["itl_ms"]["count"] == off["itl_ms"]["count"] == 2 * 2
    assert on["prefix_hit_rate"] > 0 and on["prefix_cache"]["hit_tokens"] % 16 == 0
    assert off["prefix_hit_rate"] is None and off["prompt_tokens_computed_fraction"] == 1.0
    assert (
        on["prompt_tokens_computed"] == 2 * on["prompt_tokens"] - on["prefix_cache"]["hit_tokens"]
    )
    assert on["tokens_digest"] == off["tokens_digest"]


def test_itl_run_stamps_every_stream_token(tiny_llama, tiny_adapters):
    from transformers import AutoTokenizer

    args = arrivals.parse_args(
        "itl",
        [
            "--streams",
            "2",
            "--stream-tokens",
            "12",
            "--long-prompts",
            "2",
            "--long-len",
            "40",
            "--long-new-tokens",
            "2",
            "--arrive-at",
            "3",
            "--arrive-every",
            "4",
            "--decoding",
            "cold",
            "--budgets",
            "16",
            "--adapter",
            str(tiny_adapters[0]),
            "--model",
            str(tiny_llama),
        ],
    )
    quiet, busy = (arrivals.run_setting(s) for s in arrivals.settings(args))
    assert busy["itl_ms"]["count"] == quiet["itl_ms"]["count"] == 2 * (12 - 3)  # same gaps
    assert busy["prompt_tokens_computed"] >= 2 * 2 * 40  # both long prompts, both CoLD rows
    assert busy["long_ttft_ms"]["max"] >= busy["long_ttft_ms"]["p50"] > 0
    assert quiet["long_ttft_ms"] is None
    assert busy["tokens_digest"] == quiet["tokens_digest"]  # arrivals change no stream's tokens
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    longs = arrivals.long_prompts(tok, 3, 40)
    assert [len(x) for x in longs] == [40] * 3 and len({tuple(x) for x in longs}) == 3


# ---- bench item_latency -----------------------------------------------------------------------


def test_item_latency_small_run(tiny_llama, tiny_adapters, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("COLD_RAY_CACHE", str(tmp_path))  # the demo split is written there
    argv = [
        "--model",
        str(tiny_llama),
        "--adapter",
        str(tiny_adapters[0]),
        "--n",
        "3",
        "--max-tokens",
        "4",
        "--max-model-len",
        "256",
        "--batched",
        "--rounds",
        "2",
        "--json",
        "--plot",
        str(tmp_path / "il.png"),
    ]
    assert item_latency.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for part in ("alone", "batched"):
        for mode in ("cold", "greedy"):
            r = out[part][mode]
            assert r["items"] == 3 and 1 <= r["completion_tokens_mean"] <= 4
            assert r["latency_ms_median"] > 0 and 0 <= r["accuracy"] <= 1
    assert set(out["ratios_cold_over_greedy"]) == {
        "alone_latency_mean",
        "alone_latency_median",
        "alone_ms_per_token",
        "completion_tokens_mean",
        "batched_wall_per_item",
    }
    assert (tmp_path / "il.png").stat().st_size > 0
    bad = [
        "--model",
        str(tiny_llama),
        "--adapter",
        str(tiny_adapters[0]),
        "--data",
        str(tmp_path / "missing.jsonl"),
    ]
    assert item_latency.main(bad) == 2


def test_precision_bench_holds_each_engine_to_its_own_definition(tiny_llama, tiny_adapters):
    """On the tiny model the engine follows the two-model definition of its own precision
    token for token; margins are reported as numbers."""
    from cold_ray.benchmarks.micro import precision

    out = precision.run(str(tiny_llama), str(tiny_adapters[0]), 2, 6, 5)
    for name in ("float32", "bfloat16"):
        s = out["summary"][name]
        assert (s["prompts"], s["steps"]) == (2, 10)
        assert s["engine_same_precision_diverged"] == 0
        assert s["engine_same_precision_agree_tokens"] == 10
        assert s["smallest_top2_margin"] > 0
    assert {r["reference"] for r in out["rows"]} == {"float32", "bfloat16"}
    json.dumps(out)  # plain numbers only
