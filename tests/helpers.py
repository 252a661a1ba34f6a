"""Tiny random-weight models and PEFT adapters built inside the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "mistral")

# Skip reasons for tools the CI image has (a C compiler, PostgreSQL, triton): under CI=true a
# test skipped for one of them fails instead (tests/conftest.py).
NO_COMPILER = "no C compiler on this machine"
NO_POSTGRES = "PostgreSQL unavailable"
NO_TRITON = "triton not installed"
CI_HAS = (NO_COMPILER, NO_POSTGRES, NO_TRITON)


def compiler_present() -> bool:
    """A C compiler is on this machine (then the CPU kernels must build: no skip)."""
    from cold_ray.kernels import cpu_kernels

    return cpu_kernels.compiler() is not None


_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "contrastive decoding with lora adapters on a shared base model",
    "one two three four five six seven eight nine ten 0123456789 + - * = ####",
] * 20


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def make_tiny_model(root: Path, family: str = "llama", seed: int = 0, tied: bool = True) -> Path:
    """A 2-layer random model of `family`, saved as an HF safetensors folder with a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    out = Path(root) / f"tiny-{family}"
    if (out / "config.json").exists():
        return out
    tokenizer = make_tokenizer(out)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # peaked logits make greedy decisions well separated
    )
    if family == "llama":
        cfg = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif family == "qwen2":
        cfg = Qwen2Config(**common, use_sliding_window=False)
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if family == "qwen2":  # make q/k/v biases non-zero so they are exercised
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(out)
    return out


TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_peft_adapter(
    model_dir: Path,
    out_dir: Path,
    rank: int = 8,
    targets: tuple[str, ...] = TARGETS_ALL,
    seed: int = 1,
    alpha: float | None = None,
    std: float = 0.2,
    use_rslora: bool = False,
) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved in PEFT's safetensors format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        use_rslora=use_rslora,
    )
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def peft_model(model_dir: Path, adapter_dir: Path):
    """transformers + PEFT model of base + adapter: the reference expert."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
