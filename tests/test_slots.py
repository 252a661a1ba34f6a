"""Adapter slots in the engine: LRU over idle adapters, pinned ones never evicted, waiting
instead of failing, one load per adapter, host-cache reloads, hot-load without restart."""

import dataclasses
import json
import shutil
import threading
import time

import pytest
import torch

from cold_ray.adapters.registry import Registry
from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from cold_ray.model.args import FUSED_SITES
from cold_ray.model.loader import read_model_args
from tests.helpers import make_peft_adapter

PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 8, 120, 64, 33], [11, 12, 13]]
SHORT = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def make_core(model, resolver=None, **kw) -> EngineCore:
    cfg = dict(model=str(model), max_rows=8, max_model_len=64, max_lora_rank=8, max_loras=2)
    core = EngineCore(EngineConfig(**(cfg | kw)), resolver=resolver)
    core.reads = []  # names whose files were read, in order
    read = core.adapters.read

    def counting(name, source):
        core.reads.append(name)
        return read(name, source)

    core.adapters.read = counting
    return core


def step_until(core, cond, timeout=60.0) -> list:
    """Step until `cond()` holds (a wait-for-condition: loads finish on another thread)."""
    outs = []
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        outs += core.step()
        if not core.running:
            time.sleep(0.001)  # nothing to decode: let the loader thread run
    return outs


def finish(core) -> list:
    outs = step_until(core, lambda: not core.has_work())
    assert [o.error for o in outs if o.error is not None] == []
    return outs


def tokens(core, prompt, adapter, params=SHORT, cold=None):
    return core.generate([prompt], params, adapter=adapter, cold=cold)[0]["token_ids"]


@pytest.fixture(scope="module")
def ref(tiny_llama, tiny_adapters):
    """Each adapter's greedy tokens on an engine with room for all of them."""
    core = make_core(tiny_llama, max_loras=4)
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
    return {
        (p, n): tokens(core, list(p), n) for p in map(tuple, PROMPTS) for n in ("a0", "a1", "a2")
    }


@pytest.fixture
def core(tiny_llama, tiny_adapters, request):
    core = make_core(tiny_llama, host_cache_bytes=getattr(request, "param", 1 << 30))
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
    yield core
    core.shutdown()


@pytest.mark.parametrize("core", [1 << 30, 0], indirect=True, ids=["host-cache", "no-host-cache"])
def test_lru_evicts_least_recently_used_idle_and_reload_is_exact(core, ref):
    p = PROMPTS[0]
    assert tokens(core, p, "a0") == ref[(tuple(p), "a0")]
    assert tokens(core, p, "a1") == ref[(tuple(p), "a1")]
    assert tokens(core, p, "a0") == ref[(tuple(p), "a0")]  # a0 is now the most recent
    assert list(core.slots.resident) == ["a1", "a0"]
    assert tokens(core, p, "a2") == ref[(tuple(p), "a2")]
    assert list(core.slots.resident) == ["a0", "a2"] and core.slots.evictions == 1
    assert tokens(core, p, "a1") == ref[(tuple(p), "a1")]  # reloaded after its eviction
    assert set(core.slots.resident) == {"a2", "a1"}
    if core.config.host_cache_bytes:
        assert core.reads == ["a0", "a1", "a2"]  # the reload came from host memory
    else:
        assert core.reads == ["a0", "a1", "a2", "a1"]


def test_pinned_adapter_is_never_evicted_and_requests_wait(core, ref):
    for name in ("a1", "a2", "a0"):  # fill the host cache: installs below take no load steps
        tokens(core, PROMPTS[1], name)
    long0 = core.make_request(PROMPTS[0], LONG, "a0", ColdParams())
    core.add(long0)
    step_until(core, lambda: long0 in core.running)
    assert tokens(core, PROMPTS[1], "a1") == ref[(tuple(PROMPTS[1]), "a1")]
    # LRU order is a0, a1 — but a0 is pinned by a running row, so a1 is the one to go
    assert tokens(core, PROMPTS[1], "a2") == ref[(tuple(PROMPTS[1]), "a2")]
    assert set(core.slots.resident) == {"a0", "a2"} and long0 in core.running

    long2 = core.make_request(PROMPTS[2], LONG, "a2")
    core.add(long2)
    step_until(core, lambda: long2 in core.running)
    waiter = core.make_request(PROMPTS[1], SHORT, "a1")  # every slot pinned: it must wait
    core.add(waiter)
    for _ in range(5):
        assert all(o.error is None for o in core.step())
    assert waiter in core.waiting and set(core.slots.resident) == {"a0", "a2"}
    assert set(core.slots.refs) == {"a0", "a2"}

    core.abort(long0.request_id)  # a0 becomes idle: the waiter takes its slot
    step_until(core, lambda: waiter.finish_reason is not None)
    assert waiter.finish_reason == "length" and waiter.output_ids == ref[(tuple(PROMPTS[1]), "a1")]
    assert set(core.slots.resident) == {"a1", "a2"} and long2 in core.running
    finish(core)
    assert long2.output_ids[:6] == ref[(tuple(PROMPTS[2]), "a2")]
    assert core.reads == ["a1", "a2", "a0"]  # the waiter's adapter came from host memory


def test_concurrent_requests_for_one_unloaded_adapter_trigger_one_load(core, ref):
    reqs = [core.make_request(p, SHORT, "a1") for p in PROMPTS]
    for r in reqs:
        core.add(r)
    core.step()  # the load starts on the loader thread
    late = core.make_request(PROMPTS[0], SHORT, "a1", ColdParams())
    core.add(late)
    finish(core)
    assert core.reads == ["a1"] and core.slots.loads == 1
    assert [r.output_ids for r in reqs] == [ref[(tuple(p), "a1")] for p in PROMPTS]
    assert len(late.output_ids) == SHORT.max_tokens


def test_hot_load_from_registry_while_decoding_for_others(tmp_path, tiny_llama, tiny_adapters, ref):
    reg = Registry(tmp_path / "registry.sqlite")
    args = read_model_args(tiny_llama)
    reg.add("a0", tiny_adapters[0], args=args, max_rank=8)
    gate = threading.Event()  # holds the new adapter's load open while we watch the others
    resolve = reg.resolver()

    def gated(name):
        src = resolve(name)
        return dataclasses.replace(src, prepare=gate.wait) if name == "hot" else src

    core = make_core(tiny_llama, resolver=gated)
    others = [
        core.make_request(PROMPTS[0], LONG, "a0", ColdParams()),
        core.make_request(PROMPTS[1], LONG),
    ]
    for r in others:
        core.add(r)
    step_until(core, lambda: all(r in core.running for r in others))

    reg.add("hot", tiny_adapters[1], args=args, max_rank=8)  # registered mid-decode
    hot = core.make_request(PROMPTS[2], SHORT, "hot")
    core.add(hot)
    ids = {r.request_id for r in others}
    for _ in range(5):  # the load is in flight: every other stream still gets a token per step
        outs = core.step()
        assert sorted(o.request_id for o in outs if o.token_ids) == sorted(ids)
        assert hot in core.waiting
    gate.set()
    while hot.finish_reason is None:
        active = {r.request_id for r in others if r.finish_reason is None}
        outs = core.step()
        assert active <= {o.request_id for o in outs if o.token_ids}
    assert hot.finish_reason == "length" and hot.output_ids == ref[(tuple(PROMPTS[2]), "a1")]
    finish(core)
    alone = make_core(tiny_llama)
    alone.register_adapter("a0", tiny_adapters[0])
    assert others[0].output_ids == tokens(alone, PROMPTS[0], "a0", LONG, ColdParams())
    assert others[1].output_ids == tokens(alone, PROMPTS[1], None, LONG)
    core.shutdown()


def test_adapter_replaced_in_registry_is_reloaded_not_served_stale(
    tmp_path, tiny_llama, tiny_adapters, ref
):
    reg = Registry(tmp_path / "registry.sqlite")
    args = read_model_args(tiny_llama)
    reg.add("v", tiny_adapters[0], args=args, max_rank=8)
    core = make_core(tiny_llama, resolver=reg.resolver())
    p = PROMPTS[0]
    assert tokens(core, p, "v") == ref[(tuple(p), "a0")]
    running = core.make_request(PROMPTS[1], LONG, "v")
    core.add(running)
    step_until(core, lambda: running in core.running)

    reg.add("v", tiny_adapters[1], args=args, max_rank=8, replace=True)
    new = core.make_request(p, SHORT, "v")
    core.add(new)
    for _ in range(3):  # the old version is pinned by a running row: the new request waits
        core.step()
        assert new in core.waiting
    finish(core)
    # the running request kept the version it started with; the new one got the new version
    assert running.output_ids[:6] == ref[(tuple(PROMPTS[1]), "a0")]
    assert new.output_ids == ref[(tuple(p), "a1")]
    assert core.reads == ["v", "v"]


def test_a_new_adapter_config_is_a_new_version(tmp_path, tiny_llama, tiny_adapters, ref):
    """Same weights, other scaling in adapter_config.json: registered again, the replica
    reloads it (the checksum covers the config) and decodes with the new scaling."""
    folder = tmp_path / "scaled"
    shutil.copytree(tiny_adapters[0], folder)
    reg = Registry(tmp_path / "registry.sqlite")
    args = read_model_args(tiny_llama)
    reg.add("s", folder, args=args, max_rank=8)
    core = make_core(tiny_llama, resolver=reg.resolver())
    p = PROMPTS[0]
    assert tokens(core, p, "s") == ref[(tuple(p), "a0")]
    scale = core.model.layers[0].self_attn.qkv_proj.lora_scale[core.slots.lookup("s")].item()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(cfg | {"lora_alpha": 0}))
    reg.add("s", folder, args=args, max_rank=8, replace=True)
    zero = make_core(tiny_llama)  # lora_alpha 0: the adapter adds nothing, as the base model
    assert tokens(core, p, "s") == tokens(zero, p, None) != ref[(tuple(p), "a0")]
    assert core.reads == ["s", "s"] and scale != 0.0
    assert core.model.layers[0].self_attn.qkv_proj.lora_scale[core.slots.lookup("s")] == 0.0
    core.shutdown()


def test_host_cache_is_bounded_in_bytes_least_recently_used_first(tiny_llama, tiny_adapters):
    probe = make_core(tiny_llama)
    probe.register_adapter("a0", tiny_adapters[0])
    size = probe.slots.pack(probe.adapters.read("a0", probe.adapter_source("a0"))).nbytes
    core = make_core(tiny_llama, max_loras=1, host_cache_bytes=2 * size + size // 2)
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
    for name in ("a0", "a1", "a2"):
        tokens(core, PROMPTS[0], name)
        assert core.slots.host_bytes <= core.slots.host_cache_bytes
    assert list(core.slots.host) == ["a1", "a2"] and core.slots.host_bytes == 2 * size
    tokens(core, PROMPTS[0], "a1")  # from host memory; a1 becomes the most recent
    tokens(core, PROMPTS[0], "a0")  # read again: the least recent (a2) makes room
    assert core.reads == ["a0", "a1", "a2", "a0"] and list(core.slots.host) == ["a1", "a0"]

    tight = make_core(tiny_llama, max_loras=1, host_cache_bytes=size - 1)
    tight.register_adapter("a0", tiny_adapters[0])
    tokens(tight, PROMPTS[0], "a0")  # served, but larger than the whole cache: not kept
    assert tight.slots.resident and not tight.slots.host and tight.slots.host_bytes == 0
    for c in (probe, core, tight):
        c.shutdown()


def test_host_copies_are_compact_and_install_the_padded_slot_layout(tmp_path, tiny_llama):
    """A rank-4 adapter on q/v only, in an engine with max_lora_rank 8: the host copy holds
    just its own weights, and the slot it fills equals LoraLinear's padded layout."""
    small = make_peft_adapter(tiny_llama, tmp_path / "small", rank=4, targets=("q_proj", "v_proj"))
    core = make_core(tiny_llama)
    core.register_adapter("small", small)
    adapter = core.adapters.read("small", core.adapter_source("small"))
    args = core.args
    fan_in = args.hidden_size  # q and v read the hidden state; A [4, in], B [out, 4] each
    per_layer = 4 * fan_in * 2 + 4 * (args.num_heads + args.num_kv_heads) * args.head_dim
    assert adapter.nbytes == args.num_layers * per_layer * 4  # float32, no padding
    slot = core.slots.install("small", adapter)
    from cold_ray.adapters.peft import load_peft_adapter

    peft = load_peft_adapter(small, args, 8)
    for i, layer in enumerate(core.model.layers):
        for site_name, site in layer.lora_sites().items():
            parts = [peft.weights.get((i, m)) for m in FUSED_SITES[site_name]]
            a, b = site.pack(parts)
            assert torch.equal(site.lora_A[slot], a) and torch.equal(site.lora_B[slot], b)
    core.shutdown()
