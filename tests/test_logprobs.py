"""Log-probabilities of generated and prompt tokens against a reference computed with
transformers (+ PEFT for the expert): plain decoding reports the model's own distribution;
CoLD reports the contrastive distribution over the expert's plausible tokens, with each
model's log-probabilities beside it. Tolerance: 2e-4 absolute (fp32 logits of two
implementations; greedy choices are exact)."""

from __future__ import annotations

import math

import pytest
import torch

from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from tests.helpers import hf_model, peft_model

TOL = 2e-4
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33, 12]


@pytest.fixture(scope="module")
def core(tiny_llama, tiny_adapters):
    core = EngineCore(
        EngineConfig(
            model=str(tiny_llama),
            max_rows=8,
            max_model_len=64,
            max_prefill_tokens=5,
            prefix_block_size=4,
        )
    )
    core.register_adapter("a0", tiny_adapters[0])
    return core


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_adapters):
    return hf_model(tiny_llama), peft_model(tiny_llama, tiny_adapters[0])


def logits_at(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: the logits after each prefix of ids."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def contrastive_lp(e: torch.Tensor, a: torch.Tensor, cold: ColdParams) -> torch.Tensor:
    valid = e >= e.max() + math.log(cold.alpha)
    score = ((1 + cold.beta) * e - cold.beta * a).masked_fill(~valid, -math.inf)
    return torch.log_softmax(score, dim=-1)


def run(core, prompt, params, adapter=None, cold=None):
    req = core.make_request(prompt, params, adapter, cold)
    core.add(req)
    outs = []
    while core.has_work():
        outs += [o for o in core.step() if o.request_id == req.request_id]
    assert outs[-1].error is None, outs[-1].error
    return req, outs


def check_top(got, lp: torch.Tensor, n: int):
    want = lp.topk(n)
    assert [t for t, _ in got.top] == want.indices.tolist()[: len(got.top)]
    assert len(got.top) == min(n, int(torch.isfinite(lp).sum()))
    for (_, v), w in zip(got.top, want.values.tolist()):
        assert abs(v - w) <= TOL


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_plain_logprobs_are_the_models_distribution(core, models, temperature):
    base, _ = models
    params = SamplingParams(
        temperature=temperature, seed=7, max_tokens=6, ignore_eos=True, logprobs=3
    )
    req, outs = run(core, PROMPT, params)
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert [lp.token for lp in lps] == req.output_ids
    full = logits_at(base, PROMPT + req.output_ids)
    for i, got in enumerate(lps):
        want = torch.log_softmax(full[len(PROMPT) - 1 + i], dim=-1)
        assert abs(got.logprob - float(want[got.token])) <= TOL
        assert got.rank == 1 + int((want > want[got.token]).sum())
        check_top(got, want, 3)
        assert got.expert is None and got.amateur is None


@pytest.mark.parametrize("cold", [ColdParams(0.1, 0.5), ColdParams(0.02, 2.0)])
def test_cold_logprobs_are_the_contrastive_distribution(core, models, cold):
    base, expert = models
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=4)
    req, outs = run(core, PROMPT, params, "a0", cold)
    lps = [lp for o in outs for lp in o.logprobs]
    ids = PROMPT + req.output_ids
    e_all, a_all = logits_at(expert, ids), logits_at(base, ids)
    for i, got in enumerate(lps):
        at = len(PROMPT) - 1 + i
        want = contrastive_lp(e_all[at], a_all[at], cold)
        assert got.token == int(want.argmax())
        assert abs(got.logprob - float(want[got.token])) <= TOL
        check_top(got, want, 4)
        e, a = torch.log_softmax(e_all[at], -1), torch.log_softmax(a_all[at], -1)
        for j, tok in enumerate([got.token] + [t for t, _ in got.top]):
            assert abs(got.expert[j] - float(e[tok])) <= TOL
            assert abs(got.amateur[j] - float(a[tok])) <= TOL


@pytest.mark.parametrize("cold", [None, ColdParams(0.1, 0.5)])
def test_prompt_logprobs_cover_every_prompt_token_across_chunks(core, models, cold):
    """Prompt logprobs come from a prefill chunked under a 5-token budget, after the same
    prompt filled the prefix cache (a cached prefix has no logits: it is recomputed)."""
    base, expert = models
    adapter = "a0" if cold else None
    run(core, PROMPT, SamplingParams(temperature=0.0, max_tokens=1), adapter, cold)  # cached
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    req, outs = run(core, PROMPT, params, adapter, cold)
    got = outs[0].prompt_logprobs
    assert len(got) == len(PROMPT) and got[0].token == PROMPT[0] and got[0].logprob is None
    assert all(o.prompt_logprobs is None for o in outs[1:])
    b_all = logits_at(base, PROMPT)
    e_all = logits_at(expert, PROMPT) if cold else b_all
    for i in range(1, len(PROMPT)):
        if cold is None:
            want = torch.log_softmax(b_all[i - 1], dim=-1)
        else:
            want = contrastive_lp(e_all[i - 1], b_all[i - 1], cold)
        assert got[i].token == PROMPT[i]
        assert abs(got[i].logprob - float(want[PROMPT[i]])) <= TOL or (
            got[i].logprob == -math.inf and want[PROMPT[i]] == -math.inf
        )
        check_top(got[i], want, 2)


def test_asking_changes_no_token(core):
    """The same request with and without logprobs decodes the same tokens (the restricted
    amateur head and the full one pick alike)."""
    for adapter, cold in [(None, None), ("a0", ColdParams(0.1, 0.5))]:
        plain = SamplingParams(temperature=0.9, seed=3, max_tokens=8, ignore_eos=True)
        asked = SamplingParams(
            temperature=0.9, seed=3, max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=1
        )
        a, _ = run(core, PROMPT, plain, adapter, cold)
        b, _ = run(core, PROMPT, asked, adapter, cold)
        assert a.output_ids == b.output_ids


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True])
def test_logprobs_counts_are_validated(bad):
    with pytest.raises(ValueError, match="logprobs must be an integer in"):
        SamplingParams(logprobs=bad)
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer in"):
        SamplingParams(prompt_logprobs=bad)
