"""Log-probabilities through the HTTP API, against transformers (+PEFT) on the same model:
completions (`logprobs`, `echo`, vLLM's `prompt_logprobs`), chat (`logprobs`,
`top_logprobs`), streamed and not, plain and CoLD (with the expert/amateur extension), and the
request lm-evaluation-harness sends for log-likelihood tasks. Tolerance 2e-4 (fp32)."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from cold_ray.serve.app_args import AppArgs
from tests.helpers import hf_model, peft_model
from tests.serve_util import CHAT_TEMPLATE, local_ray

pytestmark = pytest.mark.serve

TOL = 2e-4
PROMPT = "the quick brown fox jumps over"
COLD = {"alpha": 0.1, "beta": 0.5}


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_llama, tiny_adapters):
    from ray import serve

    from cold_ray.serve.app import compose, prepare

    root = tmp_path_factory.mktemp("serve_logprobs")
    cfg = AppArgs(
        registry=str(root / "reg.sqlite"),
        adapters=[{"name": "a0", "source": str(tiny_adapters[0])}],
        engine={
            "model": str(tiny_llama),
            "max_rows": 8,
            "max_model_len": 128,
            "max_lora_rank": 8,
            "chat_template": CHAT_TEMPLATE,
            "max_prefill_tokens": 4,
        },
    )
    with local_ray() as url:
        prepare(cfg)
        serve.run(compose(cfg, {"ray_actor_options": {"num_cpus": 0}}), name="lp")
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
def reference(tiny_llama, tiny_adapters):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    return tok, hf_model(tiny_llama), peft_model(tiny_llama, tiny_adapters[0])


def logits_at(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def want_lp(reference, ids, at, cold=None):
    """The log-distribution the server reports at position `at` (predicting ids[at + 1])."""
    tok, base, expert = reference
    if cold is None:
        return torch.log_softmax(logits_at(base, ids)[at], dim=-1)
    e, a = logits_at(expert, ids)[at], logits_at(base, ids)[at]
    valid = e >= e.max() + math.log(cold["alpha"])
    score = ((1 + cold["beta"]) * e - cold["beta"] * a).masked_fill(~valid, -math.inf)
    return torch.log_softmax(score, dim=-1)


@pytest.mark.parametrize("cold", [None, COLD], ids=["plain", "cold"])
def test_completion_logprobs_are_the_decoding_distribution(api, reference, cold):
    """Greedy on the adapter, plainly or with CoLD: every token is the argmax of the reported
    distribution, its logprob and the best alternative's match the reference's."""
    body = {
        "model": "a0",
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": 2,
        "ignore_eos": True,
        "cold": cold or False,
    }
    r = api.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    if "\ufffd" not in "".join(lp["tokens"]):  # a character split over tokens: U+FFFD each
        assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(4)]
    tok, ids = reference[0], reference[0].encode(PROMPT)
    for i, (token_lp, top) in enumerate(zip(lp["token_logprobs"], lp["top_logprobs"])):
        if cold is None:
            want = torch.log_softmax(logits_at(reference[2], ids)[-1], dim=-1)
        else:
            want = want_lp(reference, ids, len(ids) - 1, cold)
        chosen = int(want.argmax())
        assert lp["tokens"][i] == tok.decode([chosen])
        assert abs(token_lp - float(want[chosen])) <= TOL
        assert abs(max(top.values()) - token_lp) <= TOL  # greedy: it is the top token
        ids = ids + [chosen]
    if cold is not None:
        assert len(lp["cold"]) == 4 and {"expert", "amateur", "top"} <= set(lp["cold"][0])


def test_the_request_lm_eval_sends_for_a_loglikelihood(api, reference):
    """lm-evaluation-harness' local-completions: a batch of one prompt, max_tokens 1,
    logprobs 1, echo; it sums token_logprobs[ctxlen:-1] and checks each against the max of
    its top_logprobs."""
    body = {
        "prompt": [PROMPT],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    r = api.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    tok = reference[0]
    ids = tok.encode(PROMPT)
    assert choice["text"].startswith(PROMPT)
    assert len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        want = want_lp(reference, ids, i - 1)
        assert abs(lp["token_logprobs"][i] - float(want[ids[i]])) <= TOL
        is_greedy = lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values())
        assert is_greedy == (int(want.argmax()) == ids[i])


def test_prompt_logprobs_vllm_shape(api, reference):
    r = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["prompt_logprobs"]
    ids = reference[0].encode(PROMPT)
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        want = want_lp(reference, ids, i - 1)
        entry = got[i][str(ids[i])]
        assert abs(entry["logprob"] - float(want[ids[i]])) <= TOL
        assert entry["rank"] == 1 + int((want > want[ids[i]]).sum())
        assert len(got[i]) <= 3  # the token and at most 2 alternatives


@pytest.mark.parametrize("cold", [False, COLD], ids=["plain", "cold"])
def test_chat_logprobs_streamed_equal_unstreamed(api, cold):
    body = {
        "model": "a0",
        "messages": [{"role": "user", "content": "the quick"}],
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
        "ignore_eos": True,
        "cold": cold,
    }
    whole = api.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert len(content) == 5
    joined = "".join(c["token"] for c in content)
    if "\ufffd" not in joined:  # a character split over tokens shows as U+FFFD per token
        assert joined == whole["message"]["content"]
    for c in content:
        assert c["bytes"] == list(c["token"].encode())
        assert 1 <= len(c["top_logprobs"]) <= 3
        assert c["top_logprobs"][0]["logprob"] >= c["logprob"] - TOL
        assert ("cold" in c) == bool(cold)
    streamed = []
    with api.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                lp = json.loads(line[6:])["choices"][0].get("logprobs")
                streamed += lp["content"] if lp else []
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    assert all(abs(a["logprob"] - b["logprob"]) <= TOL for a, b in zip(streamed, content))


@pytest.mark.parametrize(
    "body,status",
    [
        ({"prompt": "x", "logprobs": 21}, 422),
        ({"prompt": "x", "prompt_logprobs": -1}, 422),
        ({"prompt": "x", "cache_salt": ""}, 422),
    ],
)
def test_logprob_limits(api, body, status):
    assert api.post("/v1/completions", json=body).status_code == status
