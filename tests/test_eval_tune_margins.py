"""tune explains its decision with the gold answers' log-probabilities: the engine's numbers
against transformers + PEFT on the same tokens (fp32, tolerance 2e-4 per token), and a report
whose verdict follows the evidence."""

import json
import math

import pytest
import torch

from cold_ray.adapters.registry import Registry
from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore
from cold_ray.eval import margins
from cold_ray.eval.harness import Task
from cold_ray.eval.tune import format_decision, tune
from cold_ray.model.loader import read_model_args
from tests.helpers import hf_model, peft_model
from tests.test_eval_tune import PARAMS, PROMPTS, WIN

TOL = 2e-4
# The gold answer follows the prompt directly (no delimiter): it is the text a decoding wrote.
TASK = Task(
    "tiny", lambda q: q, lambda t: t.strip() or None, stop=(), max_tokens=6, target_delimiter=""
)


@pytest.fixture
def reg(tmp_path, tiny_llama, tiny_adapters):
    reg = Registry(tmp_path / "registry.sqlite")
    reg.add("ad", tiny_adapters[0], args=read_model_args(tiny_llama), max_rank=8)
    return reg


@pytest.fixture
def core(reg, tiny_llama):
    config = EngineConfig(model=str(tiny_llama), max_rows=8, max_model_len=64)
    return EngineCore(config, resolver=reg.resolver())


def _items(golds):
    return [{"question": p, "answer": g} for p, g in zip(PROMPTS, golds)]


def _reference_positions(expert_lp, amateur_lp, ids, n, cold):
    """Positions of the last n tokens of ids from full-vocabulary log-probabilities."""
    out = []
    for t in range(len(ids) - n, len(ids)):
        e, a, gold = expert_lp[t - 1], amateur_lp[t - 1], ids[t]
        lp = e
        if cold is not None:
            valid = e >= e.max() + math.log(cold.alpha)
            score = ((1 + cold.beta) * e - cold.beta * a).masked_fill(~valid, -math.inf)
            lp = torch.log_softmax(score, dim=-1)
        other = lp.clone()
        other[gold] = -math.inf
        out.append((float(lp[gold]), float(lp[gold] - other.max()), int((lp > lp[gold]).sum()) + 1))
    return out


def test_positions_match_transformers(core, tiny_llama, tiny_adapters):
    """Each gold token's log-probability, margin and rank — under the expert, under CoLD, and
    under alpha = 1 (only the expert's argmax is plausible: the gold token is first or cut)."""
    golds = [" four five", " fox jumps over", "####"]
    items = _items(golds)
    settings = [(0.1, 1.0), (1.0, 0.5)]
    scores = margins.score(core, items, TASK, "ad", settings)
    expert_model, base_model = peft_model(tiny_llama, tiny_adapters[0]), hf_model(tiny_llama)
    masked = 0
    for i, item in enumerate(items):
        ids, n = margins.gold_ids(core, TASK, item)
        with torch.no_grad():
            e = torch.log_softmax(expert_model(torch.tensor([ids])).logits[0].float(), -1)
            a = torch.log_softmax(base_model(torch.tensor([ids])).logits[0].float(), -1)
        for key in [margins.EXPERT, *settings]:
            cold = None if key == margins.EXPERT else ColdParams(*key)
            want = _reference_positions(e, a, ids, n, cold)
            got = scores[key][i]
            assert len(got) == n
            for p, (lp, margin, rank) in zip(got, want):
                assert p.rank == rank, (key, i)
                if math.isinf(lp):
                    assert p.logprob == -math.inf and p.margin == -math.inf
                    masked += 1
                    continue
                assert abs(p.logprob - lp) <= TOL, (key, i, p.logprob, lp)
                if math.isinf(margin):  # the gold token is the only plausible one
                    assert p.margin == margin
                else:
                    assert abs(p.margin - margin) <= TOL, (key, i, p.margin, margin)
    assert masked > 0  # alpha = 1 cuts out every gold token the expert does not rank first


def test_report_says_why_cold_is_kept(reg, core):
    """Gold = what CoLD(0.1, 1.0) writes: CoLD ranks the gold tokens first more often than
    the expert, fixes more positions than it breaks, and the verdict says so."""
    cold = [o["text"] for o in core.generate(PROMPTS, PARAMS, "ad", WIN)]
    d = tune(core, reg, "ad", _items(cold), TASK, alphas=(1.0, 0.1), betas=(1.0,))
    assert d.cold_enabled and (d.alpha, d.beta) == (0.1, 1.0)
    best = d.tried[0]["margins"]
    assert best["gold_first"] > d.margins["expert"]["gold_first"]
    assert best["fixed"] > best["broken"]
    assert d.margins["setting"] == {"alpha": 0.1, "beta": 1.0}
    assert d.why.startswith("why on:")
    assert f"first at {best['fixed']} positions where the expert does not" in d.why
    text = format_decision("ad", d)
    assert "gold@1" in text and "fix/brk" in text and d.why in text
    assert "the expert ranks the gold token first" in text
    items = d.margins["items"]
    assert len(items) == len(PROMPTS) and all("logprob_expert" in r for r in items)
    json.dumps(d.to_dict(), allow_nan=False)  # the --json output: no infinities


def test_report_says_why_cold_is_off(reg, core):
    """Gold = what the expert writes greedily: CoLD can only lose gold tokens on balance, and
    the verdict names that as the reason it is off."""
    greedy = [o["text"] for o in core.generate(PROMPTS, PARAMS, "ad", None)]
    d = tune(core, reg, "ad", _items(greedy), TASK, alphas=(0.1,), betas=(0.5, 1.0))
    assert not d.cold_enabled
    e = d.margins["expert"]
    for t in d.tried:
        m = t["margins"]
        assert m["positions"] == e["positions"]
        assert m["gold_first"] == e["gold_first"] + m["fixed"] - m["broken"]
        assert m["broken"] >= m["fixed"]
    assert d.why.startswith("why off: no setting helps") and "pulls decoding away" in d.why
    json.dumps(d.to_dict(), allow_nan=False)
