"""Load-test tooling: the statistics and thresholds (on synthetic records), the runner's exit
codes, and a real headless Locust run against a small in-process OpenAI-style stub server.

The run against the real Ray Serve deployment is in tests/test_loadtest_serve.py.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cold_ray.benchmarks.serving.loadtest import cli
from cold_ray.benchmarks.serving.loadtest.runner import Workload, parse_duration
from cold_ray.benchmarks.serving.loadtest.service import apply_override
from cold_ray.benchmarks.serving.loadtest.stats import (
    LengthDist,
    check_thresholds,
    make_prompt,
    percentile,
    summarize,
)

# ---- statistics -----------------------------------------------------------------------------


def _record(t0, latency_ms, ok=True, status=200, ttft=None, itl=(), tokens=10, decoding="cold"):
    return {
        "t_start": t0,
        "t_end": t0 + latency_ms / 1000,
        "endpoint": "completions",
        "stream": ttft is not None,
        "decoding": decoding,
        "model": "a",
        "status": status,
        "ok": ok,
        "error": None if ok else "boom",
        "latency_ms": latency_ms,
        "ttft_ms": ttft,
        "itl_ms": list(itl),
        "prompt_tokens": 5,
        "completion_tokens": tokens if ok else 0,
    }


def test_percentile_interpolates_like_numpy():
    xs = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_summary_counts_503_apart_and_rates_over_the_window():
    records = [
        _record(0.0, 1000, ttft=100, itl=[10, 20]),
        _record(1.0, 1000, ttft=300, itl=[30], decoding="plain"),
        _record(1.5, 500, tokens=20),  # not streamed: no TTFT
        _record(2.0, 5, ok=False, status=503),
        _record(2.0, 5, ok=False, status=500),
    ]
    s = summarize(records)
    assert (s["requests"], s["ok"], s["failures"], s["rejected_503"]) == (5, 3, 1, 1)
    assert s["failure_rate"] == pytest.approx(0.2)
    assert s["window_s"] == pytest.approx(2.005)
    assert s["rps"] == pytest.approx(3 / 2.005, rel=1e-3)
    assert s["tokens_per_s"] == pytest.approx(40 / 2.005, rel=1e-3)
    assert s["ttft_ms"]["count"] == 2 and s["ttft_ms"]["p50"] == pytest.approx(200)
    assert s["itl_ms"]["count"] == 3 and s["itl_ms"]["p50"] == pytest.approx(20)
    assert s["latency_ms"]["p95"] == pytest.approx(1000)
    assert list(s["errors"]) == ["500: boom"]
    for key in ("latency_ms", "ttft_ms", "itl_ms"):
        assert set(s[key]) >= {"p50", "p95", "p99"}


def test_summary_of_nothing_is_well_formed():
    s = summarize([])
    assert s["requests"] == 0 and s["rps"] == 0.0 and s["ttft_ms"]["p95"] is None


# ---- thresholds -----------------------------------------------------------------------------


def test_thresholds_report_each_missed_limit_with_both_numbers():
    s = summarize([_record(0.0, 1000, ttft=900, itl=[50]), _record(0, 5, ok=False, status=500)])
    assert check_thresholds(s, {"max_p95_ttft_ms": 1000, "max_failure_rate": 0.6}) == []
    missed = check_thresholds(
        s, {"max_p95_ttft_ms": 800, "max_failure_rate": 0.1, "min_tokens_per_s": 1e6}
    )
    assert len(missed) == 3
    assert "900" in missed[0] and "800" in missed[0]
    assert "0.5" in missed[1] and "0.1" in missed[1]
    assert "below" in missed[2]
    assert check_thresholds(s, {"max_p95_ttft_ms": None}) == []  # None = not checked


def test_threshold_on_unmeasured_metric_fails():
    s = summarize([_record(0.0, 1000)])  # nothing streamed: no TTFT
    assert "not measured" in check_thresholds(s, {"max_p95_ttft_ms": 1e9})[0]
    with pytest.raises(ValueError, match="unknown threshold"):
        check_thresholds(s, {"max_p42": 1})


def _synthetic_run(monkeypatch, summary):
    from contextlib import contextmanager

    @contextmanager
    def fake_service(args):
        class S:
            url = "http://stub"

        yield S()

    monkeypatch.setattr(cli, "service_for", fake_service)
    monkeypatch.setattr(cli, "one_run", lambda *a, **k: summary)


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        ([], 0),
        (["--max-p95-ttft-ms", "1000", "--max-failure-rate", "0.6"], 0),
        (["--max-p95-ttft-ms", "800"], 1),
        (["--max-failure-rate", "0"], 1),
        (["--min-rps", "1000"], 1),
    ],
)
def test_runner_exit_code_follows_thresholds(monkeypatch, tmp_path, limits, code):
    summary = summarize([_record(0.0, 1000, ttft=900), _record(0, 5, ok=False, status=500)])
    _synthetic_run(monkeypatch, summary)
    assert cli.main(["--host", "http://stub", "--out", str(tmp_path), *limits]) == code
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["thresholds"]["passed"] is (code == 0)


def test_runner_with_no_finished_request_is_an_error(monkeypatch, tmp_path):
    _synthetic_run(monkeypatch, summarize([]))
    assert cli.main(["--host", "http://stub", "--out", str(tmp_path)]) == 2


# ---- helpers --------------------------------------------------------------------------------


def test_length_distributions():
    rng = random.Random(0)
    assert {LengthDist("fixed:64").sample(rng) for _ in range(10)} == {64}
    draws = [LengthDist("uniform:3:5").sample(rng) for _ in range(200)]
    assert set(draws) == {3, 4, 5}
    assert all(1 <= LengthDist("normal:2:50").sample(rng) for _ in range(200))
    assert max(LengthDist("lognormal:100:2", cap=300).sample(rng) for _ in range(200)) <= 300
    assert {LengthDist("choice:8,16").sample(rng) for _ in range(100)} == {8, 16}
    for bad in ("fixed", "gamma:1:2", "uniform:5:3", "fixed:x", "normal:1", "fixed:-1"):
        with pytest.raises(ValueError, match="length distribution"):
            LengthDist(bad)


def test_prompts_grow_with_the_target_length():
    rng = random.Random(0)
    short, long = make_prompt(rng, 40), make_prompt(rng, 400)
    assert short.endswith("Answer:") and long.endswith("Answer:")
    assert 2 * len(short) < len(long) <= 400 * 4 + 50


def test_durations_overrides_and_locust_args():
    assert parse_duration("60s") == 60 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    with pytest.raises(ValueError):
        parse_duration("1 minute")
    config = {"applications": [{"args": {"model": None}}]}
    apply_override(config, "applications.0.args.model=/tmp/m")
    apply_override(config, "applications.0.args.adapters=[]")
    apply_override(config, "http_options.port=8123")
    assert config == {
        "applications": [{"args": {"model": "/tmp/m", "adapters": []}}],
        "http_options": {"port": 8123},
    }
    with pytest.raises(ValueError):
        apply_override(config, "applications.3.args=1")
    args = Workload(mix="identical", ignore_eos=True, adapters="").locust_args()
    assert args[:2] == ["--mix", "identical"] and "--ignore-eos" in args
    assert "--adapters" not in args


# ---- a real Locust run against a stub server ------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    """Just enough of the OpenAI API: /health, /v1/models, completions + chat, SSE streams."""

    protocol_version = "HTTP/1.1"
    bodies: list[dict] = []  # every request body received, in order

    def log_message(self, *args):
        pass

    def _json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            return self._json(200, {})
        if self.path == "/v1/models":
            models = [{"id": "base"}] + [{"id": f"a{i}", "parent": "base"} for i in range(3)]
            return self._json(200, {"object": "list", "data": models})
        self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.bodies.append(req)
        n, chat = req["max_tokens"], "messages" in req
        assert req["model"] in ("a0", "a1", "a2") and req["cold"] in (
            False,
            {"alpha": 0.1, "beta": 0.5},
        )
        usage = {"prompt_tokens": 12, "completion_tokens": n}
        if not req.get("stream"):
            return self._json(200, {"choices": [{"text": "x" * n}], "usage": usage})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def send(event):
            data = f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))  # one HTTP chunk per event
            self.wfile.flush()

        for _ in range(n):
            send({"choices": [{"delta": {"content": "x"}} if chat else {"text": "x"}]})
        send({"choices": [], "usage": usage})
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture
def stub_url():
    _Stub.bodies.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _loadtest(*argv):
    # Its own process, as users run it: Locust's gevent must patch before torch is imported.
    cmd = [sys.executable, "-m", "cold_ray.benchmarks.serving.loadtest.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_headless_locust_run_against_stub(stub_url, tmp_path):
    # 6 s: Locust runs niced, and on a loaded machine a 3 s run once finished no request at all
    out = tmp_path / "run"
    proc = _loadtest(
        "--host",
        stub_url,
        "--users",
        "3",
        "--duration",
        "6s",
        "--out",
        str(out),
        "--max-tokens",
        "uniform:4:12",
        "--mix",
        "uniform",
        "--max-failure-rate",
        "0",
        "--locust-nice",
        "5",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["requests"] > 10 and s["failures"] == 0 and s["rejected_503"] == 0
    assert s["rps"] > 0 and s["tokens_per_s"] > 0
    for key in ("latency_ms", "ttft_ms", "itl_ms"):
        assert all(s[key][p] is not None for p in ("p50", "p95", "p99")), key
    assert set(s["by_decoding"]) == {"cold", "plain"}
    assert set(s["by_endpoint"]) == {"chat", "completions"}
    assert s["run"]["locust"]["nice"] == 5 and s["thresholds"]["passed"]
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"a0", "a1", "a2"}
    streamed = [r for r in records if r["stream"]]
    assert all(r["completion_tokens"] == len(r["itl_ms"]) + 1 for r in streamed)
    assert (out / "run.png").stat().st_size > 0
    stats_csv = (out / "locust_stats.csv").read_text()
    assert "TTFT" in stats_csv and "ITL" in stats_csv  # custom Locust metrics

    # the same service with an impossible TTFT limit: a non-zero exit naming the limit
    proc = _loadtest(
        "--host",
        stub_url,
        "--users",
        "1",
        "--duration",
        "3s",
        "--out",
        str(tmp_path / "strict"),
        "--stream-fraction",
        "1",
        "--max-tokens",
        "fixed:4",
        "--max-p95-ttft-ms",
        "0.0001",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "THRESHOLD MISSED: p95 time to first token" in proc.stderr


def test_shared_prefix_prompt_modes(stub_url, tmp_path):
    """fewshot: every prompt (or chat user turn) is the one few-shot prefix + a question of
    the test split; system: every request is chat with the one system prompt."""
    from cold_ray.benchmarks.workloads import SYSTEM_PROMPT, fewshot_prefix, question_pool

    prefix, pool = fewshot_prefix(3), set(question_pool())
    proc = _loadtest(
        "--host",
        stub_url,
        "--users",
        "2",
        "--duration",
        "4s",
        "--out",
        str(tmp_path / "fewshot"),
        "--prompt-mode",
        "fewshot",
        "--shots",
        "3",
        "--max-tokens",
        "fixed:2",
        "--mix",
        "uniform",
        "--locust-nice",
        "0",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    texts = [b["prompt"] if "prompt" in b else b["messages"][-1]["content"] for b in _Stub.bodies]
    assert len(texts) > 2 and {"prompt", "messages"} <= {k for b in _Stub.bodies for k in b}
    assert all(t.startswith(prefix) and t.endswith("\nAnswer:") for t in texts)
    questions = [
        t[len(prefix) :].removeprefix("Question: ").removesuffix("\nAnswer:") for t in texts
    ]
    assert set(questions) <= pool and len(set(questions)) > 1
    assert prefix.count("\n#### ") == 3  # three worked examples

    _Stub.bodies.clear()
    proc = _loadtest(
        "--host",
        stub_url,
        "--users",
        "2",
        "--duration",
        "4s",
        "--out",
        str(tmp_path / "system"),
        "--prompt-mode",
        "system",
        "--chat-fraction",
        "0",
        "--max-tokens",
        "fixed:2",
        "--mix",
        "uniform",
        "--locust-nice",
        "0",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(_Stub.bodies) > 2
    for b in _Stub.bodies:
        system, user = b["messages"]
        assert system == {"role": "system", "content": SYSTEM_PROMPT}
        assert user["role"] == "user" and user["content"] in pool
    proc = _loadtest("--host", stub_url, "--out", str(tmp_path / "bad"), "--shots", "-1")
    assert proc.returncode == 2 and "--shots" in proc.stderr


# ---- soak verdicts --------------------------------------------------------------------------


def test_soak_gauges_and_verdicts():
    import argparse

    from cold_ray.benchmarks.serving.loadtest.soak import checks, parse_gauges

    text = (
        "# HELP ray_cold_running_rows Batch rows in use.\n"
        'ray_cold_running_rows{replica="a"} 4.0\n'
        'ray_cold_running_rows{replica="b"} 2.0\n'
        'ray_cold_waiting_requests{replica="a"} 1.0\n'
        "ray_other 7\n"
    )
    assert parse_gauges(text)["running_rows"] == 6.0
    assert parse_gauges(text)["waiting_requests"] == 1.0
    assert parse_gauges("ray_other 1\n") == {}
    args = argparse.Namespace(rss_baseline_s=120, max_rss_growth=0.05, max_queue=10)
    summary = summarize([_record(0.0, 100), _record(1.0, 5, ok=False, status=503)])
    samples = [
        {"t": t, "rss_mib": 1000 + (t > 60) * 100 + t / 100, "engine": {"waiting_requests": 3}}
        for t in range(0, 600, 5)
    ]
    zero = dict.fromkeys(("running_rows", "running_requests", "waiting_requests"), 0.0)
    ok = checks(summary, samples, zero, args)
    assert all(v["passed"] for v in ok.values()), ok  # a warm-up jump before minute 2 is fine
    leaky = [{**s, "rss_mib": 1000 + s["t"]} for s in samples]
    assert checks(summary, leaky, zero, args)["rss_growth"]["passed"] is False
    bad = summarize([_record(0.0, 100), _record(1.0, 5, ok=False, status=500)])
    assert checks(bad, samples, zero, args)["only_503_errors"]["passed"] is False
    assert (
        checks(summary, samples, {**zero, "running_rows": 2.0}, args)["drained"]["passed"] is False
    )
    args.max_queue = 2
    assert checks(summary, samples, zero, args)["bounded_queue"]["passed"] is False


def test_soak_gauges_skip_ports_that_do_not_speak_http():
    """The dashboard agent also listens on gRPC ports; their binary answer (BadStatusLine)
    must not end the soak."""
    import socket

    from cold_ray.benchmarks.serving.loadtest.soak import EngineGauges

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'ray_cold_running_rows{replica="a"} 3.0\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    binary = socket.create_server(("127.0.0.1", 0))

    def answer_in_binary():
        conn, _ = binary.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x05\xfe\r\n")

    threading.Thread(target=answer_in_binary, daemon=True).start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        urls = [
            f"http://127.0.0.1:{binary.getsockname()[1]}/metrics",
            f"http://127.0.0.1:{http.server_address[1]}/metrics",
        ]
        service = type("Service", (), {"metrics_urls": lambda self: urls})()
        gauges = EngineGauges(service)
        assert gauges.read()["running_rows"] == 3.0
        assert gauges.url == urls[1]
    finally:
        http.shutdown()
        binary.close()


def test_soak_plot_takes_samples_taken_before_the_gauges_were_exported(tmp_path):
    from cold_ray.benchmarks.serving.loadtest.report import plot_soak

    samples = [
        {"t": 0.0, "rss_mib": 300.0, "engine": None},
        {"t": 5.0, "rss_mib": 2500.0, "engine": {"running_rows": 4.0}},
    ]
    assert plot_soak(samples, tmp_path / "soak.png").stat().st_size > 0
