"""The harness scores known outputs correctly and treats every decoding mode identically."""

import json

import pytest

from cold_ray.config import EngineConfig
from cold_ray.engine import EngineCore, SamplingParams
from cold_ray.engine.request import Request, RequestOutput
from cold_ray.eval import harness
from cold_ray.eval.harness import Mode, Task, evaluate

# ---- a scripted engine: known outputs per (mode, question) ------------------------------------


class ScriptedCore:
    """Engine stand-in that answers each prompt with a scripted text, a few requests per step."""

    def __init__(self, script, per_step=2):
        self.script = script  # (adapter, cold, prompt) -> text
        self.per_step = per_step
        self.waiting = []
        self.sent = []

    def make_request(self, prompt, params, adapter, cold):
        self.sent.append((prompt, params, adapter, cold))
        return Request([1, 2, 3], params, adapter, cold, request_id=f"r{len(self.sent)}")

    def add(self, req):
        req._prompt = self.sent[int(req.request_id[1:]) - 1][0]
        self.waiting.append(req)

    def step(self):
        outs = []
        for req in self.waiting[: self.per_step]:
            text = self.script(req.adapter, req.cold, req._prompt)
            req.output_ids = list(range(len(text.split()) or 1))
            half = len(text) // 2  # streamed in two pieces, like the engine's deltas
            outs.append(RequestOutput(req.request_id, text[:half], []))
            outs.append(
                RequestOutput(req.request_id, text[half:], [], finished=True, finish_reason="stop")
            )
        self.waiting = self.waiting[self.per_step :]
        return outs


ITEMS = [
    {"question": "q0", "answer": "Work: 2 + 2 = 4.\n#### 4"},
    {"question": "q1", "answer": "#### 1,500"},
    {"question": "q2", "answer": "7"},
    {"question": "q3", "answer": "#### -3"},
    {"question": "q4", "answer": "#### 10"},
]
OUTPUTS = {
    # greedy: right, right (formatted differently), wrong number, malformed (no number), empty
    "greedy": ["2 + 2 = 4\n#### 4", "#### 1500.00", "#### 8", "#### minus three", ""],
    # cold: right, no marker but last number right, right, right, only garbage
    "cold": ["#### 4", "so the total is 1,500", "the answer: 7", "#### -3", "\x00\ufffd##"],
    # base: the first number only, then nonsense
    "base_greedy": ["4 4 4 ####4", "15", "7.0", "3", "ten"],
}


def _script(adapter, cold, prompt):
    kind = "base_greedy" if adapter is None else ("cold" if cold else "greedy")
    return OUTPUTS[kind][int(prompt.rsplit("q", 1)[1][0])]


TASK = Task(
    "gsm8k",
    lambda q: f"Question: {q}\nAnswer:",
    harness.extract.gsm8k,
    stop=("\nQuestion:",),
    max_tokens=32,
)


@pytest.mark.parametrize("kw", [{}, {"interleave": True}, {"rounds": 2}, {"rounds": 5}])
def test_accuracy_on_known_outputs(kw):
    core = ScriptedCore(_script)
    modes = harness.default_modes([(0.1, 0.5), (0.1, 0.5)])  # a repeated setting runs once
    report = evaluate(core, ITEMS, "ad", modes, TASK, **kw)
    assert len(report.results) == 3
    assert report.golds == ["4", "1500", "7", "-3", "10"]
    got = {r.mode.kind: r for r in report.results}
    assert got["greedy"].correct == [True, True, False, False, False]
    assert got["greedy"].preds == ["4", "1500", "8", None, None]
    assert got["cold"].correct == [True, True, True, True, False]
    assert got["base_greedy"].correct == [True, False, True, False, False]
    d = report.to_dict()
    rows = {r["mode"]: r for r in d["results"]}
    g, c = rows["greedy"], rows["cold"]
    assert (g["correct"], g["n"], g["accuracy"]) == (2, 5, 0.4)
    assert g["no_answer"] == 2 and c["no_answer"] == 1
    assert c["accuracy"] == 0.8 and (c["alpha"], c["beta"]) == (0.1, 0.5)
    assert rows["base_greedy"]["alpha"] is None and rows["greedy"]["beta"] is None
    assert rows["greedy"]["finish_reasons"] == {"stop": 5}
    cold_vs_greedy = next(p for p in d["paired"] if p["b"].startswith("cold"))
    assert (cold_vs_greedy["only_a"], cold_vs_greedy["only_b"]) == (0, 2)
    assert cold_vs_greedy["p_value"] == pytest.approx(0.5)
    assert {p["a"] for p in d["paired"]} == {"greedy", "base_greedy"}
    json.dumps(d)  # the --json output is serialisable


def test_items_and_modes_are_validated(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"question": "q", "answer": 3}\n\n{"question": "r", "answer": "#### 4"}\n')
    assert harness.load_items(f) == [
        {"question": "q", "answer": "3"},
        {"question": "r", "answer": "#### 4"},
    ]
    assert len(harness.load_items(f, n=1)) == 1
    f.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="t.jsonl:1: expected an object"):
        harness.load_items(f)
    f.write_text("not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        harness.load_items(f)
    with pytest.raises(ValueError, match="no answer can be extracted"):
        evaluate(
            ScriptedCore(_script),
            [{"question": "q0", "answer": "none"}],
            "ad",
            [Mode("greedy")],
            TASK,
        )
    with pytest.raises(ValueError, match="need an adapter"):
        evaluate(ScriptedCore(_script), ITEMS, None, [Mode("greedy")], TASK)
    with pytest.raises(ValueError, match="alpha must be in"):
        Mode("cold", 0.0, 0.5)
    with pytest.raises(ValueError, match="needs alpha and beta"):
        Mode("cold", 0.1, None)
    with pytest.raises(ValueError, match="distinct"):
        evaluate(ScriptedCore(_script), ITEMS, "ad", [Mode("greedy")] * 2, TASK)
    with pytest.raises(ValueError, match="rounds must be"):
        evaluate(ScriptedCore(_script), ITEMS, "ad", [Mode("greedy")], TASK, rounds=6)


# ---- the real engine on a tiny random model ---------------------------------------------------


@pytest.fixture(scope="module")
def core(tiny_llama, tiny_adapters):
    core = EngineCore(EngineConfig(model=str(tiny_llama), max_rows=6, max_model_len=96))
    core.register_adapter("ad", tiny_adapters[0])
    return core


def _words(text):
    return text.strip() or None  # the tiny model writes arbitrary text: compare it whole


TINY = Task("tiny", lambda q: f"{q} =", _words, stop=("####",), max_tokens=8)
QUESTIONS = ["one two", "the quick brown", "lora adapters on", "seven eight nine", "fox", "ten"]


def _route(mode):
    """(adapter, cold) a mode's requests must carry."""
    return (None if mode.kind == "base_greedy" else "ad", mode.cold)


def test_every_mode_gets_the_same_prompts_stop_rule_and_extractor(core, monkeypatch):
    sent, extracted = [], []
    real_make = core.make_request

    def spy_make(prompt, params, adapter, cold, *a):
        sent.append((prompt, params, adapter, cold))
        return real_make(prompt, params, adapter, cold, *a)

    def spy_extract(text):
        extracted.append(text)
        return _words(text)

    monkeypatch.setattr(core, "make_request", spy_make)
    task = Task("tiny", TINY.prompt, spy_extract, TINY.stop, TINY.max_tokens)
    items = [{"question": q, "answer": "x"} for q in QUESTIONS]
    modes = harness.default_modes([(0.1, 0.5), (0.3, 1.0)])
    for kw in ({}, {"interleave": True}, {"rounds": 4}):
        sent.clear()
        extracted.clear()
        report = evaluate(core, items, "ad", modes, task, **kw)
        assert len(sent) == len(items) * len(modes)
        per_mode = {m: [s for s in sent if (s[2], s[3]) == _route(m)] for m in modes}
        assert all(len(reqs) == len(items) for reqs in per_mode.values())  # nothing else sent
        prompts = [TINY.prompt(q) for q in QUESTIONS]
        for reqs in per_mode.values():
            assert [p for p, *_ in reqs] == prompts  # same prompts, same order
            assert {params for _, params, _, _ in reqs} == {sent[0][1]}  # same SamplingParams
        assert sent[0][1].stop == ("####",) and sent[0][1].max_tokens == 8 and sent[0][1].greedy
        # the one extractor read the gold answers and every mode's every output
        outputs = [t for r in report.results for t in r.texts]
        assert extracted == ["x"] * len(items) + outputs


def test_harness_outputs_equal_plain_engine_generation(core):
    items = [{"question": q, "answer": "x"} for q in QUESTIONS]
    modes = harness.default_modes([(0.1, 0.5), (1.0, 2.0)])
    report = evaluate(core, items, "ad", modes, TINY)
    prompts = [TINY.prompt(q) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=TINY.max_tokens, stop=TINY.stop)
    for r in report.results:
        adapter = None if r.mode.kind == "base_greedy" else "ad"
        want = core.generate(prompts, params, adapter, r.mode.cold)
        assert r.texts == [w["text"] for w in want], r.mode.label
        assert r.completion_tokens == sum(w["completion_tokens"] for w in want)
        assert r.wall_s > 0
    # alpha = 1 keeps only the expert's argmax: CoLD-greedy equals expert greedy (docs/design.md §1)
    assert report.results[2].texts == report.results[0].texts
    # scoring items with gold = the greedy output: greedy is right on every item
    gold_items = [
        {"question": q, "answer": t}
        for q, t in zip(QUESTIONS, report.results[0].texts)
        if t.strip()
    ]
    again = evaluate(core, gold_items, "ad", [Mode("greedy")], TINY)
    assert again.results[0].num_correct == len(gold_items)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    report = evaluate(ScriptedCore(_script), ITEMS, "ad", harness.default_modes([(0.1, 0.5)]), TASK)
    harness.plot(report, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"
    harness.plot(json.loads(json.dumps(report.to_dict())), tmp_path / "again.png")  # from --json
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    assert "cold a=0.1 b=0.5" in harness.format_table(report)
