"""The prefix cache returns exactly the K/V stored for a prefix, under its identity, through
any sequence of stores, loads and evictions; and a hit decodes what a miss decodes.

The randomized test writes K/V whose every value is a known function of (identity, the
tokens up to that position), so a block served under the wrong parent, identity or after
reuse by another prefix shows up as a wrong value, not only as a wrong count.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from cold_ray.engine.kv_cache import KVCache
from cold_ray.engine.prefix_cache import BASE, PrefixCache
from cold_ray.model.args import ModelArgs

ARGS = ModelArgs(
    vocab_size=50,
    hidden_size=8,
    intermediate_size=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    attention_bias=False,
)


def signature(identity, tokens: list[int]) -> float:
    """The value every K/V element of the last position of `tokens` gets."""
    return float(zlib.crc32(repr((identity, tokens)).encode()) % 100_003)


def fill(cache: KVCache, slot: int, identity, tokens: list[int]) -> None:
    for i in range(len(tokens)):
        value = signature(identity, tokens[: i + 1])
        cache.k[:, slot, :, i] = value
        cache.v[:, slot, :, i] = -value


def check(cache: KVCache, slot: int, identity, tokens: list[int], n: int) -> None:
    for i in range(n):
        value = signature(identity, tokens[: i + 1])
        assert bool((cache.k[:, slot, :, i] == value).all()), f"position {i}"
        assert bool((cache.v[:, slot, :, i] == -value).all()), f"position {i}"


def check_structure(pc: PrefixCache) -> None:
    children: dict[int, int] = {}
    for block, meta in pc.blocks.items():
        assert pc.ids[meta.key] == block
        if meta.parent >= 0:
            assert meta.parent in pc.blocks, "a block outlived its parent"
            children[meta.parent] = children.get(meta.parent, 0) + 1
    for block, meta in pc.blocks.items():
        assert meta.children == children.get(block, 0)
        assert (block in pc.leaves) == (meta.children == 0)
    assert len(pc.blocks) + len(pc._unused) == pc.capacity


@pytest.mark.parametrize("seed", range(20))
def test_loads_return_exactly_what_was_stored(seed):
    rng = random.Random(seed)
    cache = KVCache.allocate(ARGS, slots=2, max_len=48, dtype=torch.float32, device="cpu")
    block = rng.choice([2, 3, 4])
    per_block = 2 * 4 * ARGS.num_layers * ARGS.num_kv_heads * block * ARGS.head_dim
    pc = PrefixCache(cache, max_bytes=per_block * rng.randint(1, 12), block_size=block)
    stems = [[rng.randrange(50) for _ in range(rng.randint(0, 12))] for _ in range(4)]
    identities = [BASE, ("a0", "sha-1"), ("a1", "sha-2")]
    stored: set[tuple] = set()
    for _ in range(200):
        identity = rng.choice(identities)
        tokens = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randint(0, 10))]
        if not tokens:
            continue
        if rng.random() < 0.5:
            fill(cache, 0, identity, tokens)
            pc.store(identity, tokens, 0, len(tokens))
            stored.add((identity, tuple(tokens[: len(tokens) // block * block])))
        else:
            cache.k[:, 1].zero_()
            cache.v[:, 1].zero_()
            n = pc.load(identity, tokens, 1, len(tokens) - 1)
            assert n % block == 0 and n <= len(tokens) - 1
            check(cache, 1, identity, tokens, n)
            if n:  # a hit is a prefix of something this identity stored
                assert any(i == identity and t[:n] == tuple(tokens[:n]) for i, t in stored)
        check_structure(pc)
    assert pc.stats["hit_tokens"] > 0, "no load hit: the checks above saw only misses"


def test_eviction_is_least_recently_used_leaf_first():
    cache = KVCache.allocate(ARGS, slots=1, max_len=48, dtype=torch.float32, device="cpu")
    per_block = 2 * 4 * ARGS.num_layers * ARGS.num_kv_heads * 2 * ARGS.head_dim
    pc = PrefixCache(cache, max_bytes=per_block * 3, block_size=2)
    a, b = [1, 2, 3, 4], [1, 2, 7, 8]  # share their first block
    for tokens in (a, b):
        fill(cache, 0, BASE, tokens)
        pc.store(BASE, tokens, 0, 4)
    assert len(pc) == 3  # [1,2] shared, then [3,4] and [7,8]
    assert pc.load(BASE, a + [0], 0, 5) == 4  # touch a: b's leaf is now the oldest
    c = [9, 9, 9, 9]
    fill(cache, 0, BASE, c)
    pc.store(BASE, c, 0, 4)  # 2 blocks: evicts b's leaf (oldest), then a's leaf
    assert pc.load(BASE, b + [0], 0, 5) == 2  # the shared block survived
    assert pc.stats["evicted_blocks"] >= 1
    check_structure(pc)


@pytest.fixture(scope="module")
def smol():
    return EngineCore(EngineConfig(max_rows=8, max_model_len=512, max_prefill_tokens=64))


@pytest.mark.integration
def test_a_hit_decodes_what_a_miss_decodes_on_smollm2(smol):
    """Exactness on the real model: CoLD and plain, prefix cache hot vs a cold engine."""
    smol.register_adapter("arith", "deployments/adapters/arith-demo")
    system = (
        "You are a careful assistant. Solve each arithmetic problem step by step and "
        "give the final answer after ####.\n"
    ) * 3
    questions = [
        "Question: Ann has 3 boxes of 4 pens. How many pens?\nAnswer:",
        "Question: Tom reads 12 pages a day for 5 days. How many pages?\nAnswer:",
    ]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    cases = [
        (q, a, c)
        for q in questions
        for a, c in [("arith", ColdParams()), ("arith", None), (None, None)]
    ]
    smol.prefix_cache.clear()
    misses = []
    for q, a, c in cases:
        smol.prefix_cache.clear()
        misses.append(smol.generate([system + q], params, a, c)[0]["token_ids"])
    smol.prefix_cache.clear()
    before = smol.prefix_cache.stats["hit_tokens"]
    hits = [smol.generate([system + q], params, a, c)[0]["token_ids"] for q, a, c in cases]
    assert smol.prefix_cache.stats["hit_tokens"] > before, "the second prompts never hit"
    assert hits == misses


@pytest.mark.integration
def test_the_amateur_prefix_is_shared_by_every_adapter(smol, tmp_path):
    """A CoLD request on a second adapter reuses the amateur rows' prompt K/V that the first
    adapter's request computed; its expert rows (another adapter) do not."""
    from tests.helpers import make_peft_adapter

    other = make_peft_adapter(smol.model_path, tmp_path / "other", rank=4, seed=5, std=0.01)
    smol.register_adapter("other", other)
    smol.register_adapter("arith", "deployments/adapters/arith-demo")
    prompt = "Question: A farmer has 17 sheep and buys 25 more. How many sheep now?\nAnswer:"
    smol.prefix_cache.clear()
    params = SamplingParams(temperature=0.0, max_tokens=4)
    smol.generate([prompt], params, "arith", ColdParams())
    hits = smol.prefix_cache.stats["hit_tokens"]
    smol.generate([prompt], params, "other", ColdParams())
    n = len(smol.tokenizer.encode(prompt))
    block = smol.config.prefix_block_size
    assert smol.prefix_cache.stats["hit_tokens"] - hits == (n - 1) // block * block


def test_a_request_reuses_blocks_of_one_still_prefilling(tiny_llama):
    """Blocks are kept after every chunk, so a request scheduled while another with the same
    prefix is mid-prompt reuses what that one has computed so far — and decodes the same."""
    core = EngineCore(
        EngineConfig(
            model=str(tiny_llama),
            max_rows=4,
            max_model_len=64,
            max_prefill_tokens=8,
            prefix_block_size=4,
        )
    )
    shared = [(7 * i) % 250 + 3 for i in range(24)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    first = core.make_request(shared + [9, 10], params)
    core.add(first)
    core.step()  # 8 of its 26 prompt tokens: 2 blocks kept already
    second = core.make_request(shared + [11, 12], params)
    core.add(second)
    while core.has_work():
        core.step()
    # the second is first scheduled in the step that ends the first's prompt (24 tokens in)
    assert core.prefix_cache.stats["hit_tokens"] == 24
    alone = EngineCore(
        EngineConfig(model=str(tiny_llama), max_rows=2, max_model_len=64, prefix_cache_bytes=0)
    )
    assert second.output_ids == alone.generate([shared + [11, 12]], params)[0]["token_ids"]
