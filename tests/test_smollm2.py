"""Integration on the real default model (SmolLM2-135M-Instruct) with real PEFT adapters."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from tests.helpers import hf_model, make_peft_adapter, peft_model
from tests.test_engine import greedy, naive_cold

pytestmark = pytest.mark.integration
DEMO = Path(__file__).resolve().parents[1] / "deployments" / "adapters" / "arith-demo"
N = 16


@pytest.fixture(scope="module")
def smol():
    return EngineCore(EngineConfig(max_rows=16, max_model_len=256, max_loras=2))


@pytest.fixture(scope="module")
def random_adapter(smol, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol-adapter")
    return make_peft_adapter(
        smol.model_path,
        out,
        rank=8,
        seed=5,
        std=0.05,
        targets=("q_proj", "v_proj", "gate_proj", "down_proj"),
    )


def adapters(random_adapter):
    found = [("random", random_adapter)]
    if (DEMO / "adapter_config.json").exists():
        found.append(("demo", DEMO))
    return found


def test_cold_equals_two_model_definition_on_smollm2(smol, random_adapter):
    base = hf_model(smol.model_path)
    prompts = [
        "Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:",
        "The three primary colours are",
    ]
    for name, path in adapters(random_adapter):
        smol.register_adapter(name, path)
        expert = peft_model(smol.model_path, path)
        # each prompt with one setting: every adapter, prompt and setting is covered, and the
        # reference (two models, the whole prefix recomputed per token) runs half as often
        for text, (alpha, beta) in zip(prompts, [(0.1, 0.5), (0.05, 1.0)]):
            ids = smol.tokenizer.encode(text, add_special_tokens=False)
            got = smol.generate(
                [ids],
                SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True),
                name,
                ColdParams(alpha, beta),
            )[0]["token_ids"]
            assert got == naive_cold(expert, base, ids, alpha, beta, n=N), (name, text, alpha)
            plain = smol.generate(
                [ids], SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True), name
            )
            assert plain[0]["token_ids"] == greedy(expert, ids, n=N)


def test_gguf_reader_equals_the_transformers_gguf_path(smol):
    """The default model read with `gguf` alone is the model transformers reads from the same
    GGUF file (its GGUF path needs accelerate, which only the test extra brings): every
    tensor bit for bit, the tokenizer and chat template, and the engine's logits."""
    # transformers' GGUF path needs accelerate; peft, in the test extra, brings it: no skip
    import accelerate  # noqa: F401
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cold_ray.model.loader import default_gguf

    gguf = default_gguf()
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ours = load_file(str(smol.model_path / "model.safetensors"))
    want = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied
    assert ref.config.tie_word_embeddings and sorted(ours) == sorted(want)
    assert all(torch.equal(ours[k], want[k]) for k in want)
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "Question: 17 * 3 = ?\nAnswer: <|im_end|> é 漢字"
    assert smol.tokenizer.encode(text) == ref_tok.encode(text)
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    assert smol.tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    ) == ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = smol.tokenizer.encode(text)
    with torch.no_grad():
        want_logits = ref(torch.tensor([ids])).logits[0, -1]
    got = smol.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    assert got[0]["token_ids"] == [int(want_logits.argmax())]
    # our decoder vs transformers' on the same weights: fp32 sums in another order
    torch.testing.assert_close(smol.prompt_logits(ids)[-1], want_logits, rtol=0, atol=2e-3)


def test_cli_generate_json(random_adapter):
    cmd = [
        sys.executable,
        "-m",
        "cold_ray.cli",
        "generate",
        "--adapter",
        str(random_adapter),
        "--prompt",
        "Name a colour:",
        "--max-tokens",
        "8",
        "--alpha",
        "0.2",
        "--beta",
        "0.3",
        "--json",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["decoding"] == "cold" and (out["alpha"], out["beta"]) == (0.2, 0.3)
    assert 1 <= len(out["token_ids"]) <= 8 and out["finish_reason"] in ("stop", "length")
    assert isinstance(out["text"], str)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--alpha", "0"], "alpha must be in (0, 1]"),
        (["--beta", "-1"], "beta must be in [0, 1e+06]"),
        (["--max-tokens", "0"], "must be a positive integer"),
    ],
)
def test_cli_rejects_bad_arguments(random_adapter, args, message):
    cmd = [
        sys.executable,
        "-m",
        "cold_ray.cli",
        "generate",
        "--adapter",
        str(random_adapter),
        "--prompt",
        "hi",
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and message in res.stderr


def test_batch_invariance_on_smollm2(smol, random_adapter):
    """Tokens alone equal tokens in a 12-row batch of mixed plain/CoLD requests (BLAS paths
    for small and large row counts differ, so this crosses them)."""
    smol.register_adapter("random", random_adapter)
    texts = [
        "List three fruits:",
        "Write a haiku about rain.",
        "2 + 2 =",
        "The moon is",
        "Translate 'cat' to French:",
        "Why is the sky blue?",
        "Count to five:",
        "Name a planet:",
    ]
    specs = [
        (t, "random" if i % 2 else None, ColdParams() if i % 4 == 1 else None)
        for i, t in enumerate(texts)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    alone = [smol.generate([t], params, a, c)[0]["token_ids"] for t, a, c in specs]
    reqs = [smol.make_request(t, params, a, c) for t, a, c in specs]
    for r in reqs:
        smol.add(r)
    while smol.has_work():
        smol.step()
    assert [r.output_ids for r in reqs] == alone


def test_hub_id_adapter_on_a_renamed_model_folder(smol, tmp_path, capsys):
    """The demo adapter declares `HuggingFaceTB/SmolLM2-135M-Instruct`; the same model copied
    to a folder named `smollm2` serves it in `adapters add` and `eval` with no flags."""
    import shutil

    from cold_ray.cli import main

    model = tmp_path / "x" / "smollm2"
    shutil.copytree(smol.model_path, model)
    reg = ["--registry", str(tmp_path / "reg.sqlite")]
    rc = main(["adapters", "add", "demo", str(DEMO), "--model", str(model), "--json", *reg])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    rc = main(
        [
            "eval",
            "--model",
            str(model),
            "--adapter",
            str(DEMO),
            "--data",
            "demo:test",
            "--n",
            "2",
            "--max-tokens",
            "8",
            "--max-model-len",
            "256",
            "--json",
            "--no-progress",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert [r["n"] for r in json.loads(out.out)["results"]] == [2, 2, 2]
