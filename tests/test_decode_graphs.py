"""Captured decode steps (`cold_ray/engine/graphs.py`): buckets, which steps are replayed, and
on a CUDA GPU the captured graphs against eager steps. The engine-level differential test
(graphed steps vs each request alone) is in `test_scheduler_fuzz.py`."""

import pytest
import torch

from cold_ray.config import EngineConfig
from cold_ray.decoding import ColdParams
from cold_ray.engine import EngineCore, SamplingParams
from cold_ray.engine.graphs import DecodeGraphs, row_buckets, span_buckets
from cold_ray.engine.kv_cache import Row
from cold_ray.engine.scheduler import Chunk, StepPlan


def test_buckets_cover_every_size_once():
    assert row_buckets(2) == [1, 2]
    assert row_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert row_buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    assert span_buckets(100) == [100]
    assert span_buckets(1024) == [128, 256, 512, 1024]
    assert span_buckets(1000) == [128, 256, 512, 1000]


def _core(model, adapters, **overrides) -> EngineCore:
    config = dict(model=str(model), max_rows=6, max_model_len=64, max_loras=2)
    core = EngineCore(EngineConfig(**{**config, **overrides}))
    for i, path in enumerate(adapters[:2]):
        core.register_adapter(f"a{i}", path)
    return core


def test_backends_that_plan_on_the_host_are_refused(tiny_llama, tiny_adapters):
    core = _core(tiny_llama, tiny_adapters)  # grouped on CPU
    assert core.runner.graphs is None  # a CPU engine captures nothing
    with pytest.raises(ValueError, match="'grouped' LoRA backend reads its plan on the host"):
        DecodeGraphs(core.model, core.cache, core.backend, 6, 64, 2, capture=False)


def test_only_decode_steps_over_the_first_slots_are_replayed(tiny_llama, tiny_adapters):
    core = _core(tiny_llama, tiny_adapters, lora_backend="gather_bmm")
    graphs = DecodeGraphs(core.model, core.cache, core.backend, 6, 64, 2, capture=False)
    rows = [Row(None, -1, slot=s, length=3) for s in (1, 0, 2)]
    assert graphs.fits(StepPlan(decode=rows))  # any order
    gap = [Row(None, -1, slot=s, length=3) for s in (0, 2)]  # slot 1 is not in the step
    assert not graphs.fits(StepPlan(decode=gap))
    chunk = Chunk(Row(None, -1, slot=3), start=0, tokens=[5, 6])
    assert not graphs.fits(StepPlan(decode=rows, prefill=[chunk]))
    assert not graphs.fits(StepPlan())


class _Rerun:
    """A graph whose replay recomputes the step into its output (what a correct capture does)."""

    def __init__(self, graphs, key, out):
        self.graphs, self.key, self.out = graphs, key, out

    def replay(self):
        self.out.copy_(self.graphs.forward(*self.key))


class _Stale:
    """A graph that baked in its capture-time inputs: replay changes nothing."""

    def replay(self):
        pass

    def pool(self):
        return None


def test_each_graph_is_checked_against_the_eager_step(tiny_llama, tiny_adapters):
    core = _core(tiny_llama, tiny_adapters, lora_backend="gather_bmm")
    graphs = DecodeGraphs(core.model, core.cache, core.backend, 6, 64, 2, capture=False)
    key = (4, 64)
    out = graphs.forward(*key)  # the capture-time output: zero inputs
    graphs.check_replay(_Rerun(graphs, key, out), out, *key)
    assert graphs.inputs[2].eq(-1).all() and not graphs.inputs[:2].any()  # reset after the check
    with pytest.raises(RuntimeError, match="for 4 rows x span 64 replays differently"):
        graphs.check_replay(_Stale(), graphs.forward(*key), *key)


def test_an_engine_whose_graphs_fail_their_check_runs_eagerly(
    tiny_llama, tiny_adapters, monkeypatch, caplog
):
    from contextlib import nullcontext

    from cold_ray import device as devices

    monkeypatch.setattr(
        devices, "graph_api", lambda device: (_Stale, lambda g, pool: nullcontext())
    )
    want = _core(tiny_llama, tiny_adapters, lora_backend="gather_bmm", graph_capture=False)
    with caplog.at_level("ERROR", logger="cold_ray.engine.core"):
        core = _core(tiny_llama, tiny_adapters, lora_backend="gather_bmm")
    assert core.runner.graphs is None
    assert "decode graphs could not be captured; every step runs eagerly" in caplog.text
    assert "replays differently from the eager step" in caplog.text
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompts = [[5, 6, 7], [8, 9]]
    assert core.generate(prompts, params, "a0") == want.generate(prompts, params, "a0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_steps_replay_the_eager_steps(tiny_llama, tiny_adapters, dtype):
    """On a GPU: engines with and without graphs decode the same tokens (fp32: exactly; bf16:
    the padded batch may take other GEMM kernels, so at least the first tokens), and a replay
    gives bit for bit what the same padded step gives eagerly."""
    cfg = dict(device="cuda", dtype=dtype, max_rows=8)
    graphed = _core(tiny_llama, tiny_adapters, **cfg)
    eager = _core(tiny_llama, tiny_adapters, graph_capture=False, **cfg)
    assert graphed.graphs is not None and eager.graphs is None
    assert len(graphed.graphs.graphs) == len(graphed.graphs.rows) * len(graphed.graphs.spans)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    runs = {}
    for name, core in (("graphed", graphed), ("eager", eager)):
        runs[name] = [o["token_ids"] for o in core.generate(prompts, params)]
        runs[name] += [
            o["token_ids"] for o in core.generate(prompts[:2], params, "a0", ColdParams())
        ]
        runs[name] += [o["token_ids"] for o in core.generate(prompts[1:], params, "a1")]
    if dtype == "float32":
        assert runs["graphed"] == runs["eager"]
    else:
        assert all(g[:4] == e[:4] for g, e in zip(runs["graphed"], runs["eager"]))
    graphs = graphed.graphs
    graphs.inputs[0, :5] = torch.tensor([5, 6, 7, 8, 9])
    graphs.inputs[1, :5] = torch.tensor([3, 1, 4, 1, 5])
    graphs.inputs[2, :5] = torch.tensor([0, -1, 1, 0, -1])
    key = (8, graphs.spans[0])
    graph, out = graphs.graphs[key]
    graph.replay()
    replayed = out.clone()
    assert torch.equal(replayed, graphs.forward(*key))
