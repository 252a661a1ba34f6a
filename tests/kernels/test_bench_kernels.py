"""Smoke test of `cold_ray/benchmarks/micro/kernels.py` on a tiny grid: record fields, JSON, the PNG."""

from __future__ import annotations

import json

from cold_ray.benchmarks.micro import kernels as bench

REQUIRED = {"impl", "op", "rows", "rank", "hidden", "ms", "extra_bytes"}


def test_tiny_grid_records_and_plot(tmp_path, capsys) -> None:
    png = tmp_path / "k.png"
    argv = [
        "--json",
        "--rows",
        "1,4",
        "--ranks",
        "4",
        "--hidden",
        "32",
        "--mix",
        "uniform",
        "--cold-vocab",
        "300:16",
        "--cold-rows",
        "2",
        "--min-time",
        "0",
        "--max-reps",
        "3",
        "--plot",
        str(png),
    ]
    assert bench.main(argv) == 0
    *records, machine = json.loads(capsys.readouterr().out)
    assert machine["op"] == "machine" and machine["cpu"] and "isa_flags" in machine
    assert records and all(REQUIRED <= r.keys() for r in records)
    assert {r["impl"] for r in records} >= {"reference", "gather_bmm", "grouped"}
    assert {r["op"] for r in records} == {"shrink", "expand", "lora_delta", "contrastive_step"}
    assert {r["head"] for r in records if r["op"] == "contrastive_step"} == {"full", "restricted"}
    assert all(r["ms"] > 0 for r in records)
    # gather-BMM copies rows x r x in weights: it must show extra memory, grouped far less.
    gb = next(
        r
        for r in records
        if r["impl"] == "gather_bmm" and r["op"] == "lora_delta" and r["rows"] == 4
    )
    assert gb["extra_bytes"] >= 4 * 4 * 32 * 4
    assert png.stat().st_size > 1000


def test_run_returns_records_without_printing(capsys) -> None:
    records = bench.run(
        [
            "--rows",
            "2",
            "--ranks",
            "3",
            "--hidden",
            "17",
            "--ops",
            "lora_delta",
            "--impls",
            "grouped",
            "--cold-vocab",
            "",
            "--min-time",
            "0",
        ]
    )
    assert [(r["impl"], r["op"]) for r in records] == [("grouped", "lora_delta")]
    assert capsys.readouterr().out == ""
