"""Randomized differential test of an engine's lifetime: faults across requests.

Each seeded scenario mixes plain and CoLD requests, greedy and seeded-sampled, on several
adapters and the base model, with shared prefixes, stops and aborts (as
tests/test_scheduler_fuzz.py does), and spreads faults over the steps:
- an adapter whose finite weights overflow fp32, and one whose files do not load;
- an adapter replaced in the registry, or deleted and registered again, while its requests
  are queued or running;
- an exception injected into one phase of a step: prefix load, prefix store, forward pass,
  plain or CoLD token selection, one request's detokenisation;
- a waiting request made to outlive `request_timeout_s`.

After every step: no row, KV slot, adapter pin or unwanted adapter load leaks. At the end:
every request ended exactly once; a request no fault touched decodes exactly what it decodes
alone (with the adapter version its rows ran), text and finish reason included; a request a
fault touched ended with an error after a prefix of those tokens; no request waited longer
than the fairness bound.

CI runs a fixed slice of seeds; for more: `python -m pytest tests/test_lifetime_fuzz.py
--fuzz-seeds 300`.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field

import pytest

from cold_ray.adapters.peft import files_checksum
from cold_ray.adapters.sources import AdapterSource
from cold_ray.config import EngineConfig
from cold_ray.engine import EngineCore
from cold_ray.engine.request import UnknownAdapterError
from tests.helpers import make_peft_adapter
from tests.test_scheduler_fuzz import COLD, Spec, check_state

CI_SEEDS = 10
PHASES = ("prefix_load", "prefix_store", "forward", "select_plain", "select_cold", "detok")
MAX_TOKENS = (1, 2, 3, 5, 8, 13)


class Injected(RuntimeError):
    """A fault put there by this test."""


@dataclass
class Tracked:
    spec: Spec
    arrived_step: int
    older: int  # unfinished requests that arrived before it
    req: object = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ends: list = field(default_factory=list)  # every final output (exactly one expected)
    waited: int = 0  # steps that served others while it waited for a row or an adapter
    touched: bool = False  # a fault hit it: an error is allowed
    refused: Exception | None = None  # make_request refused it (deleted adapter)


@pytest.fixture(scope="module")
def versions(tiny_root, tiny_llama, tiny_adapters):
    """{reference name: adapter folder}: every set of files an adapter name may point to."""
    broken = tiny_root / "broken-adapter"
    if not broken.exists():
        shutil.copytree(tiny_adapters[0], broken)
        (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return {
        "a0": tiny_adapters[0],
        "a1": tiny_adapters[1],
        "a2": tiny_adapters[2],
        "a1-v2": make_peft_adapter(tiny_llama, tiny_root / "a1-v2", rank=4, seed=21),
        "overflow": make_peft_adapter(
            tiny_llama, tiny_root / "overflow-fz", rank=4, seed=3, std=1e19
        ),
        "broken": broken,
    }


def _alone(tiny_llama, versions, **config):
    """The simplest correct version: each request by itself on an engine with one row pair."""
    core = EngineCore(
        EngineConfig(
            model=str(tiny_llama),
            max_rows=2,
            max_model_len=64,
            prefix_cache_bytes=0,
            max_loras=6,
            **config,
        )
    )
    for name, path in versions.items():
        if name != "broken":
            core.register_adapter(name, path)
    checksums = {files_checksum(p): n for n, p in versions.items() if n != "broken"}
    memo: dict[tuple, dict] = {}

    def run(spec: Spec, version: str | None) -> dict:
        name = checksums.get(version, spec.adapter) if spec.adapter else None
        key = (spec.key(), name)
        if key not in memo:
            try:
                memo[key] = core.generate([spec.prompt], spec.params(), name, spec.cold)[0]
            except Exception as e:  # the overflowing adapter: no finite score
                memo[key] = {"error": e}
        return memo[key]

    return run


@pytest.fixture(scope="module")
def alone(tiny_llama, versions):
    return _alone(tiny_llama, versions)


def random_specs(rng: random.Random, vocab: int) -> list[Spec]:
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randint(6, 14))] for _ in range(2)]
    specs = []
    for _ in range(rng.randint(4, 14)):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.6:
            prompt = rng.choice(prefixes) + prompt[: rng.randint(0, 6)]
        adapter = rng.choice((None, "a0", "a1", "a1", "a2", "a2", "overflow", "broken"))
        cold = rng.choice(COLD) if adapter and rng.random() < 0.6 else None
        abort = rng.choice([None] * 6 + [0, 1, 3])
        spec = Spec(prompt, adapter, cold, rng.choice(MAX_TOKENS), rng.randint(0, 10), abort)
        if rng.random() < 0.3:
            spec.temperature, spec.seed = rng.choice([0.7, 1.0]), rng.randrange(1 << 32)
        if rng.random() < 0.15:
            spec.stop_token_ids = (rng.randrange(3, vocab),)
        specs.append(spec)
    return specs


class Scenario:
    """One seeded lifetime: requests, registry changes and injected faults, step by step."""

    def __init__(self, seed: int, core: EngineCore, catalog: dict, versions: dict):
        self.rng = random.Random(seed)
        self.seed, self.core, self.catalog, self.versions = seed, core, catalog, versions
        self.specs = random_specs(self.rng, core.args.vocab_size)
        last = max(s.arrive for s in self.specs) + 4
        self.faults = {self.rng.randrange(last): self.rng.choice(PHASES) for _ in range(3)}
        self.registry_events = {
            self.rng.randrange(last): self.rng.choice(
                ["replace a1", "restore a1", "delete a2", "restore a2", "timeout"]
            )
            for _ in range(2)
        }
        self.tracked: list[Tracked] = []
        self.step = 0
        self._wrap()

    # ---- fault injection -------------------------------------------------------------------

    def _armed(self, phase: str) -> bool:
        if self.faults.get(self.step) == phase:
            del self.faults[self.step]
            return True
        return False

    def _touch(self, requests) -> None:
        ids = {id(r) for r in requests}
        for t in self.tracked:
            if id(t.req) in ids:
                t.touched = True

    def _wrap(self) -> None:
        core, runner, pc = self.core, self.core.runner, self.core.prefix_cache

        def wrap(obj, name, before):
            original = getattr(type(obj), name).__get__(obj)

            def wrapped(*args):
                before(*args)
                return original(*args)

            setattr(obj, name, wrapped)

        def on_prefix(phase):
            def before(*args):
                if self._armed(phase):
                    raise Injected(phase)  # guarded by the engine: no request may notice

            return before

        def on_run(plan):
            if self._armed("forward"):
                self._touch(plan.requests)
                raise Injected("forward")

        def on_pick(phase):
            def before(reqs, *rest):
                if self._armed(phase):
                    self._touch(reqs)
                    raise Injected(phase)

            return before

        wrap(pc, "load", on_prefix("prefix_load"))
        wrap(pc, "store", on_prefix("prefix_store"))
        wrap(runner, "run", on_run)
        wrap(runner, "_pick_plain", on_pick("select_plain"))
        wrap(runner, "_pick_cold", on_pick("select_cold"))
        del core  # only these objects are wrapped; the engine is otherwise untouched

    def _detok_fault(self) -> None:
        running = [t for t in self.tracked if t.req in self.core.running]
        if running:
            victim = self.rng.choice(running)

            def broken(token):
                raise Injected("detok")

            victim.req.detok.add = broken
            victim.touched = True

    def _registry_event(self, event: str) -> None:
        action, name = (event.split() + [None])[:2]
        if action == "timeout":
            waiting = [t for t in self.tracked if t.req in self.core.waiting]
            if waiting:
                victim = self.rng.choice(waiting)
                victim.req.arrived -= 10 * self.core.config.request_timeout_s
                victim.touched = True
            return
        version = {"replace a1": "a1-v2", "restore a1": "a1", "restore a2": "a2"}.get(event)
        if version is None:  # delete: waiting requests for it fail; running ones go on
            self.catalog.pop(name, None)
            for t in self.tracked:
                if t.spec.adapter == name and t.req in self.core.waiting:
                    t.touched = True
            return
        path = self.versions[version]
        self.catalog[name] = AdapterSource(str(path), sha256=files_checksum(path))

    # ---- the run ---------------------------------------------------------------------------

    def run(self, alone) -> None:
        core = self.core
        deadline = time.monotonic() + 120
        while self.step <= max(s.arrive for s in self.specs) or core.has_work():
            if self.step in self.registry_events:
                self._registry_event(self.registry_events.pop(self.step))
            for spec in self.specs:
                if spec.arrive == self.step:
                    self._arrive(spec)
            for t in self.tracked:
                s = t.spec
                if s.abort_after is not None and self.step == t.arrived_step + s.abort_after:
                    out = core.abort(t.req.request_id) if t.req is not None else None
                    if out is not None:
                        t.ends.append(out)
            if self._armed("detok"):
                self._detok_fault()
            outputs = core.step()
            for out in outputs:
                self._record(out)
            if core.running or outputs:  # a step that served someone
                for t in self.tracked:
                    t.waited += t.req is not None and t.req in core.waiting
            self._check_step()
            if not core.running:
                time.sleep(0.001)  # only an adapter load to wait for: let its thread run
            self.step += 1
            assert time.monotonic() < deadline, f"seed {self.seed}: no progress"
        self._check_end(alone)

    def _arrive(self, spec: Spec) -> None:
        unfinished = sum(1 for t in self.tracked if t.req is not None and not t.ends)
        t = Tracked(spec, self.step, unfinished)
        self.tracked.append(t)
        try:
            t.req = self.core.make_request(spec.prompt, spec.params(), spec.adapter, spec.cold)
        except UnknownAdapterError as e:  # deleted a moment ago
            t.refused = e
            return
        self.core.add(t.req)

    def _record(self, out) -> None:
        t = next(
            t for t in self.tracked if t.req is not None and t.req.request_id == out.request_id
        )
        t.tokens += out.token_ids
        t.text += out.text
        if out.finished:
            t.ends.append(out)

    def _check_step(self) -> None:
        core = self.core
        check_state(core)
        wanted = {r.adapter for r in core.waiting if r.adapter}
        assert set(core.adapters.loading) <= wanted, (self.seed, core.adapters.loading, wanted)

    def _check_end(self, alone) -> None:
        core, seed = self.core, self.seed
        assert not core.waiting and not core.running and not core.cache.rows
        assert core.cache.free_slots == core.config.max_rows and core.slots.refs == {}
        longest = max(len(s.prompt) for s in self.specs)
        prefill_steps = -(-2 * longest // core.config.max_prefill_tokens)
        t_max = max(MAX_TOKENS) + prefill_steps + 2
        for t in self.tracked:
            where = f"seed {seed}: {t.spec}"
            if t.refused is not None:  # its adapter was deleted when it arrived
                continue
            assert len(t.ends) == 1, f"{where}: ended {len(t.ends)} times"
            end = t.ends[0]
            want = alone(t.spec, t.req.adapter_version)
            if end.finish_reason == "abort":
                if "error" not in want:
                    assert t.tokens == want["token_ids"][: len(t.tokens)], where
            elif "error" in want or t.spec.adapter == "broken":
                assert end.error is not None, f"{where}: expected an error"
            elif t.touched and end.error is not None:
                assert t.tokens == want["token_ids"][: len(t.tokens)], where
            else:
                assert end.error is None, f"{where}: {end.error!r}"
                assert t.tokens == want["token_ids"], where
                assert t.text == want["text"], where
                assert end.finish_reason == want["finish_reason"], where
            # fairness: never overtaken without bound (an adapter load may take a few steps)
            bound = t_max * (2 + t.older) + 40
            assert t.waited <= bound, f"{where}: waited {t.waited} steps, bound {bound}"


@pytest.fixture(scope="module")
def fuzz_seeds(request):
    return request.config.getoption("--fuzz-seeds") or CI_SEEDS


BF16_SEEDS = 3  # the bf16 slice: the same scenarios, both engines in the CPU's bf16 precision


@pytest.mark.parametrize(
    "variant",
    [{}, {"max_prefill_tokens": 3, "max_rows": 3, "max_loras": 1}, {"dtype": "bfloat16"}],
    ids=["default", "one-slot-small-budget", "bf16"],
)
def test_every_untouched_request_decodes_as_if_alone(
    tiny_llama, versions, alone, fuzz_seeds, variant
):
    seeds = fuzz_seeds
    if "dtype" in variant:  # against requests alone in the same precision
        alone, seeds = _alone(tiny_llama, versions, **variant), min(fuzz_seeds, BF16_SEEDS)
    for seed in range(seeds):
        catalog = {
            n: AdapterSource(str(versions[n]), sha256=files_checksum(versions[n]))
            for n in ("a0", "a1", "a2", "overflow")
        }
        catalog["broken"] = AdapterSource(str(versions["broken"]), sha256="0" * 64)
        config = dict(
            model=str(tiny_llama),
            max_rows=5,
            max_model_len=64,
            max_loras=2,
            max_prefill_tokens=7,
            prefix_cache_bytes=24 << 10,
            prefix_block_size=4,
            request_timeout_s=600.0,
        )
        core = EngineCore(EngineConfig(**{**config, **variant}), resolver=catalog.__getitem__)
        try:
            Scenario(seed, core, catalog, versions).run(alone)
        finally:
            core.shutdown()
