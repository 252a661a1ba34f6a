"""lm-evaluation-harness against the server, as docs/eval/lm-eval.md runs it (`lm_eval --model
local-completions`, the local model folder as tokenizer, the task YAMLs of docs/eval/tasks/,
offline): its generations equal `cold-ray eval`'s on the same items, greedy and CoLD, and
its per-request log-likelihoods equal transformers' on the same model within 1e-3 nats per
continuation token (fp32)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cold_ray.eval import extract, lm_eval_check
from cold_ray.serve.app_args import AppArgs
from tests.serve_util import local_ray

pytestmark = pytest.mark.serve

TASKS = Path(__file__).resolve().parents[1] / "docs" / "eval" / "tasks"
MAX_TOKENS = 12
GSM8K = [  # short questions: the tiny model's context is 256 tokens
    {"id": "t/0", "question": "one two three", "answer": "one two three\n#### 6"},
    {"id": "t/1", "question": "the quick fox", "answer": "#### 1,200"},
    {"id": "t/2", "question": "four + five = ####", "answer": "#### 9"},
    {"id": "t/3", "question": "0123456789", "answer": "#### -3"},
]
ARC = [  # benchkit's layout: the stem, then one "X. choice" line per choice
    {"id": "c/0", "answer": "A", "question": "the quick brown fox\nA. jumps over\nB. lazy dog"},
    {"id": "c/1", "answer": "B", "question": "four five\nA. six\nB. eight nine ten\nC. 0123"},
    {
        "id": "c/2",
        "answer": "D",
        "question": "lora adapters\nA. on a\nB. shared\nC. base\nD. model",
    },
]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama, tiny_adapters):
    """(base URL, data folder laid out as cold-ray's data cache) with the tiny model and
    adapter `a0` served."""
    from ray import serve

    from cold_ray.serve.app import compose, prepare

    root = tmp_path_factory.mktemp("lm_eval")
    data = root / "data"
    _write(data / "gsm8k" / "test.jsonl", GSM8K)
    _write(data / "arc_challenge" / "test.jsonl", ARC)
    cfg = AppArgs(
        registry=str(root / "reg.sqlite"),
        adapters=[{"name": "a0", "source": str(tiny_adapters[0])}],
        engine={"model": str(tiny_llama), "max_rows": 8, "max_model_len": 256, "max_lora_rank": 8},
    )
    with local_ray() as url:
        prepare(cfg)
        serve.run(compose(cfg, {"ray_actor_options": {"num_cpus": 0}}), name="lm_eval")
        yield url, data


def lm_eval(url: str, data: Path, out: Path, model: str, task: str, tokenizer: Path, *extra):
    """The documented command, offline, from the data folder; returns its samples file."""
    model_args = (
        f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={tokenizer},tokenized_requests=False,num_concurrent=4"
    )
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    cmd = f"-m lm_eval --model local-completions --tasks {task} --log_samples".split()
    cmd += ["--model_args", model_args, "--include_path", str(TASKS)]
    cmd += ["--output_path", str(out / "results"), *extra]
    run = subprocess.run(
        [sys.executable, *cmd],
        cwd=data,
        env={**os.environ, **offline},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return lm_eval_check.read_jsonl(lm_eval_check.samples_file(out / "results"))


def test_generations_equal_cold_ray_eval(server, tmp_path, tiny_llama, tiny_adapters):
    """Greedy (`cold=false`) and CoLD (`cold=true`: the adapter's defaults, 0.1/0.5) through
    lm-eval's --gen_kwargs give, item by item, the text `cold-ray eval` writes."""
    from cold_ray.cli import main

    url, data = server
    outputs = tmp_path / "outputs.jsonl"
    args = ["eval", "--adapter", str(tiny_adapters[0]), "--model", str(tiny_llama)]
    args += ["--data", str(data / "gsm8k" / "test.jsonl"), "--max-tokens", str(MAX_TOKENS)]
    args += "--max-model-len 256 --max-lora-rank 8 --max-rows 8 --no-base --json".split()
    rc = main([*args, "--no-progress", "--outputs", str(outputs)])
    assert rc == 0
    ours = lm_eval_check.read_jsonl(outputs)
    assert {o["mode"] for o in ours} == {"greedy", "cold a=0.1 b=0.5"}
    for cold in ("false", "true"):
        gen_kwargs = ["--gen_kwargs", f"cold={cold}", f"max_gen_toks={MAX_TOKENS}"]
        samples = lm_eval(url, data, tmp_path / cold, "a0", "cold_gsm8k", tiny_llama, *gen_kwargs)
        r = lm_eval_check.generation_agreement(samples, ours)
        assert r["mode"] == ("greedy" if cold == "false" else "cold a=0.1 b=0.5")
        assert r["gen_kwargs"]["cold"] is (cold == "true")
        assert r["n"] == len(GSM8K) and r["agree"], r["differences"]
    greedy = [o["text"] for o in ours if o["mode"] == "greedy"]
    cold = [o["text"] for o in ours if o["mode"] != "greedy"]
    assert greedy != cold  # the two runs compared different decodings


def test_loglikelihoods_equal_transformers(server, tmp_path, tiny_llama):
    """Every choice of the multiple-choice task, scored by lm-eval through `echo` +
    `logprobs`, against transformers on the same model folder."""
    url, data = server
    samples = lm_eval(url, data, tmp_path, "tiny-llama", "cold_arc_challenge", tiny_llama)
    r = lm_eval_check.loglikelihood_agreement(samples, tiny_llama, tolerance=1e-3)
    assert r["docs"] == len(ARC) and r["requests"] == sum(a["question"].count("\n") for a in ARC)
    assert r["agree"], r["worst"]
    assert r["same_is_greedy"] == r["requests"] and r["docs_same_choice"] == r["docs"]
    assert all(x["tokens"] >= 1 for x in r["per_request"])
    assert max(x["tokens"] for x in r["per_request"]) > 3  # sums over several tokens


# ---- the task YAMLs, without a server ------------------------------------------------------

TEXTS = [
    "so 2 + 2 = 4\n#### 4",
    "#### 1,500 and later 7",
    "the total is $18.00.",
    "#### minus three, so 7 is left",
    "she has -5 apples",
    "3-5",
    "no number at all",
    "####5 then #### 6",
    "12.5 and 7.25",
    "1,23 or 4",
]


def test_gsm8k_yaml_extracts_as_cold_ray_does():
    """The YAML's `cold-ray` filter and exact_match normalisation read the same answer from
    a text as cold_ray.eval.extract.gsm8k."""
    from lm_eval.filters.extraction import RegexFilter

    cfg = yaml.safe_load((TASKS / "cold_gsm8k.yaml").read_text())
    (chain,) = [f["filter"] for f in cfg["filter_list"] if f["name"] == "cold-ray"]
    pattern = chain[0]["regex_pattern"]
    ignore = cfg["metric_list"][0]["regexes_to_ignore"]
    got = RegexFilter(regex_pattern=pattern).apply([[t] for t in TEXTS], [{}] * len(TEXTS))
    for text, (answer,) in zip(TEXTS, got):
        for r in ignore:
            answer = re.sub(r, "", answer)
        want = extract.gsm8k(text)
        assert (None if answer == lm_eval_check.INVALID else answer) == want, text
