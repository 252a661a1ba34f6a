"""The model matches transformers (and PEFT with an adapter) on the same weights."""

import pytest
import torch

from cold_ray.config import EngineConfig
from cold_ray.engine import EngineCore
from tests.helpers import FAMILIES, hf_model, make_peft_adapter, make_tiny_model, peft_model

ATOL = 1e-4  # fp32 on CPU: different fusion/summation order only


def assert_close(actual, expected, atol=ATOL, what="logits"):
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} exceeds {atol:g}"


PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_root, family):
    path = make_tiny_model(tiny_root, family)
    core = EngineCore(EngineConfig(model=str(path), max_rows=4, max_model_len=64))
    with torch.no_grad():
        expected = hf_model(path)(torch.tensor([PROMPT])).logits[0]
    assert_close(core.prompt_logits(PROMPT), expected)


def test_untied_lm_head(tiny_root):
    root = tiny_root / "untied"
    path = make_tiny_model(root, "llama", seed=3, tied=False)
    core = EngineCore(EngineConfig(model=str(path), max_rows=2, max_model_len=64))
    with torch.no_grad():
        expected = hf_model(path)(torch.tensor([PROMPT])).logits[0]
    assert_close(core.prompt_logits(PROMPT), expected)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_rows_match_peft(tiny_root, tiny_llama, rslora):
    adapter = make_peft_adapter(
        tiny_llama, tiny_root / f"peft-rs{rslora}", rank=6, seed=4, use_rslora=rslora
    )
    core = EngineCore(EngineConfig(model=str(tiny_llama), max_rows=4, max_model_len=64))
    core.register_adapter("a", adapter)
    with torch.no_grad():
        expected = peft_model(tiny_llama, adapter)(torch.tensor([PROMPT])).logits[0]
    assert_close(core.prompt_logits(PROMPT, adapter="a"), expected)


def test_partial_targets_match_peft(tiny_root, tiny_llama):
    adapter = make_peft_adapter(
        tiny_llama, tiny_root / "peft-qv", rank=4, targets=("q_proj", "v_proj", "down_proj")
    )
    core = EngineCore(EngineConfig(model=str(tiny_llama), max_rows=4, max_model_len=64))
    core.register_adapter("qv", adapter)
    with torch.no_grad():
        expected = peft_model(tiny_llama, adapter)(torch.tensor([PROMPT])).logits[0]
    assert_close(core.prompt_logits(PROMPT, adapter="qv"), expected)


def test_base_rows_bit_identical_with_adapters_loaded(tiny_llama, tiny_adapters):
    """A -1 row gives exactly the base model's output, whatever sits in the slots."""
    core = EngineCore(EngineConfig(model=str(tiny_llama), max_rows=4, max_model_len=64))
    before = core.prompt_logits(PROMPT)
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
        core.load_adapter(f"a{i}")
    assert torch.equal(core.prompt_logits(PROMPT), before)


@pytest.mark.integration
def test_smollm2_matches_transformers():
    core = EngineCore(EngineConfig(max_rows=2, max_model_len=128))
    ids = core.tokenizer.encode("Contrastive decoding helps small models", add_special_tokens=False)
    with torch.no_grad():
        expected = hf_model(core.model_path)(torch.tensor([ids])).logits[0]
    assert_close(core.prompt_logits(ids), expected, atol=2e-3)
