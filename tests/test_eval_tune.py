"""tune stores only settings that beat greedy, writes the registry once, and the engine's next
request on the adapter uses what it stored."""

import threading
import time

import pytest

from cold_ray.adapters.registry import Registry
from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from cold_ray.eval.harness import Task
from cold_ray.eval.tune import format_decision, tune
from cold_ray.model.loader import read_model_args

WORDS = "the quick brown fox jumps over lazy dog one two three four five six seven eight".split()
PROMPTS = [
    f"{WORDS[i % 16]} {WORDS[(3 * i + 1) % 16]} {WORDS[(5 * i + 2) % 16]} =" for i in range(16)
]
TASK = Task("tiny", lambda q: q, lambda t: t.strip() or None, stop=(), max_tokens=6)
PARAMS = SamplingParams(temperature=0.0, max_tokens=TASK.max_tokens)
WIN = ColdParams(0.1, 1.0)


@pytest.fixture
def reg(tmp_path, tiny_llama, tiny_adapters):
    reg = Registry(tmp_path / "registry.sqlite")
    reg.add("ad", tiny_adapters[0], args=read_model_args(tiny_llama), max_rank=8)
    return reg


@pytest.fixture
def core(reg, tiny_llama):
    config = EngineConfig(model=str(tiny_llama), max_rows=8, max_model_len=64)
    return EngineCore(config, resolver=reg.resolver())


def _outputs(core, cold):
    return [r["text"] for r in core.generate(PROMPTS, PARAMS, "ad", cold)]


def _items(golds):
    return [{"question": p, "answer": g} for p, g in zip(PROMPTS, golds) if g.strip()]


class Spy:
    """The registry, counting writes."""

    def __init__(self, reg):
        self.reg, self.writes = reg, []

    def get(self, name):
        return self.reg.get(name)

    def set_tuned(self, *a):
        self.writes.append(a)
        return self.reg.set_tuned(*a)


def test_a_real_gain_is_stored_and_used_by_the_next_request(reg, core):
    greedy, cold = _outputs(core, None), _outputs(core, WIN)
    assert sum(g != c for g, c in zip(greedy, cold)) >= 8  # the tiny adapter must matter
    spy = Spy(reg)
    # gold = what CoLD(0.1, 1.0) writes: it is right everywhere, greedy where they agree;
    # alpha = 1 is expert greedy by definition, so the grid has one real candidate
    d = tune(core, spy, "ad", _items(cold), TASK, alphas=(1.0, 0.1), betas=(1.0,))
    assert d.cold_enabled and (d.alpha, d.beta) == (0.1, 1.0) and d.stored
    assert spy.writes == [("ad", 0.1, 1.0, True)]  # one write, after every evaluation
    rec = reg.get("ad")
    assert (rec.alpha, rec.beta, rec.cold_enabled) == (0.1, 1.0, True)
    assert "kept" in d.reason and "alpha=0.1 beta=1" in format_decision("ad", d)

    # the next request that omits `cold` decodes with the stored setting
    default = core.default_cold("ad")
    assert default == WIN
    out = core.generate(PROMPTS[:3], PARAMS, "ad", default)
    assert [(o["decoding"], o["alpha"], o["beta"]) for o in out] == [("cold", 0.1, 1.0)] * 3
    assert [o["text"] for o in out] == cold[:3]


def test_no_gain_records_cold_off_and_plain_decoding_follows(reg, core):
    reg.set_tuned("ad", 0.2, 0.7, True)  # an earlier tuning result that must not survive
    greedy = _outputs(core, None)
    spy = Spy(reg)
    d = tune(core, spy, "ad", _items(greedy), TASK, alphas=(0.1, 0.3), betas=(0.5, 1.0))
    assert not d.cold_enabled and d.alpha is None and d.beta is None
    assert all(t["correct"] <= d.greedy_correct for t in d.tried)
    assert spy.writes == [("ad", None, None, False)]
    rec = reg.get("ad")
    assert (rec.alpha, rec.beta, rec.cold_enabled) == (None, None, False)
    assert core.default_cold("ad") is None
    out = core.generate(PROMPTS[:2], PARAMS, "ad", core.default_cold("ad"))
    assert [o["decoding"] for o in out] == ["plain", "plain"]
    assert "CoLD off" in format_decision("ad", d)


def test_failure_midway_and_dry_run_leave_the_entry_unchanged(reg, core, monkeypatch):
    reg.set_tuned("ad", 0.2, 0.7, True)
    before = reg.get("ad")
    greedy = _outputs(core, None)
    spy = Spy(reg)
    d = tune(core, spy, "ad", _items(greedy), TASK, alphas=(0.1,), betas=(0.5,), dry_run=True)
    assert not d.stored and spy.writes == [] and reg.get("ad") == before

    real_step, calls = core.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("replica died")
        return real_step()

    monkeypatch.setattr(core, "step", failing_step)
    with pytest.raises(RuntimeError, match="replica died"):
        tune(core, spy, "ad", _items(greedy), TASK, alphas=(0.1,), betas=(0.5,))
    assert spy.writes == [] and reg.get("ad") == before


def test_unknown_adapter_fails_before_decoding(reg, core):
    from cold_ray.adapters.registry import AdapterNotFound

    with pytest.raises(AdapterNotFound):
        tune(core, reg, "nope", _items(["x"]), TASK)


def test_registry_update_is_atomic_for_concurrent_readers(reg):
    """A reader never sees half a tuning result (alpha of one write, cold_enabled of another)."""
    states = [(0.1, 1.0, True), (None, None, False), (0.3, 0.5, True)]
    seen, stop = set(), threading.Event()
    reads = [0]
    other = Registry(reg.path)  # a second connection, as another replica has

    def read():
        while not stop.is_set():
            r = other.get("ad")
            seen.add((r.alpha, r.beta, r.cold_enabled))
            reads[0] += 1

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(150):
            reg.set_tuned("ad", *states[i % 3])
            if i % 10 == 9:  # let the reader in between writes even on a starved machine
                before = reads[0]
                deadline = time.monotonic() + 5
                while reads[0] == before and time.monotonic() < deadline:
                    time.sleep(0.001)
    finally:
        stop.set()
        reader.join(10)
    assert seen <= set(states) | {(None, None, True)}  # the initial entry, then whole writes
    assert len(seen) >= 2
