"""The CPU's bf16 precision (`dtype: bfloat16`): the base weights and the KV cache are stored in
bf16 and every product, norm, softmax and CoLD's selection runs in fp32 (LoRA adapters stay
fp32). So it is exactly the fp32 model on bf16-rounded weights whose keys and values are
rounded to bf16 as they are stored: CoLD equals the two-model definition computed that way,
token for token. `dtype: auto` picks bf16 from the CPU's flags."""

import pytest
import torch
from torch import nn

from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from cold_ray.kernels.cpu_kernels import auto_dtype
from tests.helpers import NO_COMPILER, compiler_present, hf_model, peft_model
from tests.test_engine import PROMPTS, greedy, naive_cold

BF16 = torch.bfloat16


def _round_(model: nn.Module) -> nn.Module:
    """Round the base weights (every linear and embedding outside LoRA) to bf16 in place, and
    the values each layer stores to bf16; keys are rounded after the rotary embedding by
    `bf16_keys`."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and "lora_" not in name:
                m.weight.copy_(m.weight.to(BF16))
            if name.endswith("self_attn.v_proj"):
                m.register_forward_hook(lambda mod, args, out: out.to(BF16).float())
    return model.eval()


@pytest.fixture
def bf16_keys(monkeypatch):
    """transformers' Llama attention with keys rounded to bf16 after the rotary embedding, as
    the engine's cache stores them."""
    from transformers.models.llama import modeling_llama

    rotate = modeling_llama.apply_rotary_pos_emb

    def rounded(q, k, cos, sin, *args, **kwargs):
        q, k = rotate(q, k, cos, sin, *args, **kwargs)
        return q, k.to(BF16).float()

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rounded)


@pytest.fixture(scope="module", params=["kernels", "torch"])
def bf16_core(request, tiny_llama, tiny_adapters):
    """The engine at dtype bfloat16: through the C kernels, and through torch's operators (no
    compiler) in the same precision."""
    if request.param == "kernels" and not compiler_present():
        pytest.skip(NO_COMPILER)
    off = (
        {}
        if request.param == "kernels"
        else dict(cpu_gemm_kernel=False, cpu_attention_kernel=False, cpu_rowwise_kernels=False)
    )
    core = EngineCore(
        EngineConfig(model=str(tiny_llama), max_rows=8, max_model_len=64, dtype="bfloat16", **off)
    )
    for i, a in enumerate(tiny_adapters):
        core.register_adapter(f"a{i}", a)
    return core


def _run(core, prompt, adapter=None, cold=None):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return core.generate([prompt], params, adapter=adapter, cold=cold)[0]["token_ids"]


@pytest.mark.parametrize("alpha,beta", [(0.1, 0.5), (0.3, 1.0)])
def test_cold_equals_the_two_model_definition_in_bf16(
    bf16_core, bf16_keys, tiny_llama, tiny_adapters, alpha, beta
):
    expert = _round_(peft_model(tiny_llama, tiny_adapters[0]))
    amateur = _round_(hf_model(tiny_llama))
    for prompt in PROMPTS:
        want = naive_cold(expert, amateur, prompt, alpha, beta)
        assert _run(bf16_core, prompt, "a0", ColdParams(alpha, beta)) == want, prompt


def test_plain_greedy_in_bf16_equals_the_rounded_models(
    bf16_core, bf16_keys, tiny_llama, tiny_adapters
):
    base, expert = _round_(hf_model(tiny_llama)), _round_(peft_model(tiny_llama, tiny_adapters[1]))
    for prompt in PROMPTS:
        assert _run(bf16_core, prompt) == greedy(base, prompt)
        assert _run(bf16_core, prompt, "a1") == greedy(expert, prompt)


def test_bf16_is_a_storage_precision_with_fp32_arithmetic(bf16_core, tiny_llama):
    runner = bf16_core.runner
    model = runner.model
    assert runner.weight_dtype == BF16 and runner.dtype == torch.float32
    assert runner.cache.k.dtype == runner.cache.v.dtype == BF16
    assert model.norm.dtype == torch.float32  # norms and LoRA slots keep fp32
    assert model.layers[0].mlp.down_proj.lora_A.dtype == torch.float32
    if model.gemm is not None:  # the C kernels: half the bytes stored
        assert model.embed_tokens.dtype == BF16  # the LM head, read by rows
        assert all(m.panels.dtype == BF16 for m in model.lora_linears())
    else:  # torch's operators: fp32 tensors holding the bf16 values
        w = model.layers[0].mlp.down_proj.weight  # kept for 1-2-row steps
        assert torch.equal(w, w.to(BF16).float())
    fp32 = EngineCore(EngineConfig(model=str(tiny_llama), max_rows=2, max_model_len=16))
    assert 2 * model.step_weight_bytes() == fp32.runner.model.step_weight_bytes()


def test_auto_picks_bf16_where_the_cpu_has_bf16_matrix_instructions():
    assert auto_dtype("cpu", "flags : fpu avx2 avx512f avx512_bf16\n") == "bfloat16"
    assert auto_dtype("cpu", "flags : fpu avx2 amx_tile amx_bf16\n") == "bfloat16"
    assert auto_dtype("cpu", "Features : fp asimd bf16 i8mm\n") == "bfloat16"
    assert auto_dtype("cpu", "flags : fpu avx2 fma avx512f\n") == "float32"
    assert auto_dtype("cuda:0") == "bfloat16" and auto_dtype("npu") == "float16"


def test_auto_serves_what_this_cpu_is_fast_at(tiny_llama):
    config = EngineConfig(model=str(tiny_llama), max_rows=2, max_model_len=16, dtype="auto")
    assert config.resolved_dtype == auto_dtype("cpu")  # this machine's flags
    runner = EngineCore(config).runner
    assert runner.weight_dtype == config.torch_dtype and runner.dtype == torch.float32
    assert EngineConfig(dtype="bfloat16").resolved_dtype == "bfloat16"


@pytest.mark.parametrize("gemm_kernel", [True, False])
def test_auto_takes_bf16_only_where_the_gemm_kernel_reads_it(tiny_llama, monkeypatch, gemm_kernel):
    """On a CPU with bf16 instructions (its flags stood in for here), `auto` stores bf16 only
    where the C GEMM kernel reads it: torch's fallback would hold fp32 weights anyway."""
    from cold_ray.kernels import cpu_kernels

    bf16_cpu = "flags : fpu avx2 fma avx512f avx512_bf16 amx_bf16\n"
    monkeypatch.setattr(cpu_kernels, "auto_dtype", lambda device: auto_dtype(device, bf16_cpu))
    config = EngineConfig(
        model=str(tiny_llama),
        max_rows=2,
        max_model_len=16,
        dtype="auto",
        cpu_gemm_kernel=gemm_kernel,
    )
    assert config.resolved_dtype == "bfloat16"
    runner = EngineCore(config).runner
    stored = BF16 if gemm_kernel and compiler_present() else torch.float32
    assert (runner.weight_dtype, runner.dtype) == (stored, torch.float32)
    assert runner.cache.k.dtype == stored
