"""Read a Llama-family GGUF checkpoint with the `gguf` package: its config, its tensors
dequantized to fp32 under Hugging Face names, and its tokenizer — written out once as an HF
safetensors folder that the loader reads like any other.

Nothing here needs `accelerate` or a transformers model class: tensors are dequantized by
`gguf.quants`, q/k rows are put back in HF order (llama.cpp permutes them for its RoPE), and
the config comes from the file's metadata. The tokenizer is rebuilt from the file's metadata
by transformers' GGUF tokenizer converter (tokenizers only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# GGUF `general.architecture` -> HF model_type. Mistral and SmolLM files say "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_KEY = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file this server cannot read; the message says why."""


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as e:  # bad magic, truncated header, unreadable
        raise GGUFError(f"{str(path)!r} is not a readable GGUF file: {e}") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader) -> dict:
    """An HF `config.json` dict from the file's metadata (Llama-family architectures)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported; cold-ray serves Llama-family "
            f"decoders ({', '.join(ARCHITECTURES)}: Llama 2/3, Mistral, SmolLM, Qwen2)"
        )
    model_type = ARCHITECTURES[arch]
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError(
            "this GGUF carries RoPE frequency factors (Llama 3.1-style rope "
            "scaling), which are not supported; serve the HF folder instead"
        )
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if heads is None or hidden is None or get("block_count") is None:
        raise GGUFError(
            f"GGUF metadata lacks {arch}.attention.head_count, "
            f"{arch}.embedding_length or {arch}.block_count"
        )
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(
            f"partial rotary embeddings ({arch}.rope.dimension_count "
            f"{get('rope.dimension_count')} of head size {head_dim}) are not "
            "supported"
        )
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    config = {
        "architectures": [_HF_CLASS[model_type]],
        "model_type": model_type,
        "vocab_size": get("vocab_size", len(tokens.data) if tokens is not None else None),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": get("context_length", 2048),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(get("rope.scaling.factor")),
        }
    elif scaling != "none":
        raise GGUFError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")
    if model_type == "qwen2":
        config["use_sliding_window"] = False
    for key in ("bos", "eos", "padding", "unknown"):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            hf = {"padding": "pad", "unknown": "unk"}.get(key, key)
            config[f"{hf}_token_id"] = int(value)
    missing = [k for k, v in config.items() if v is None]
    if missing:
        raise GGUFError(f"GGUF metadata does not give {missing}")
    return config


def _hf_name(gguf_name: str, num_layers: int) -> str | None:
    if gguf_name.endswith(".weight") and gguf_name[: -len(".weight")] in _GLOBAL:
        return _GLOBAL[gguf_name[: -len(".weight")]] + ".weight"
    m = _BLOCK_KEY.match(gguf_name)
    if m is None or m.group(2) not in _BLOCK or int(m.group(1)) >= num_layers:
        return None
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs neighbouring dimensions; HF's
    pairs the two halves of each head): rows [heads, 2, d/2] are stored as [heads, d/2, 2]."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def read_tensors(reader, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) for every tensor of the file; unknown tensors are an error."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    layers = config["num_hidden_layers"]
    for t in reader.tensors:
        name = _hf_name(t.name, layers)
        if name is None:
            raise GGUFError(f"unexpected tensor {t.name!r} in the GGUF file")
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            kind = GGMLQuantizationType(t.tensor_type).name
            raise GGUFError(f"tensor {t.name!r}: quantization {kind} cannot be read: {e}") from e
        if config["model_type"] == "llama" and ".attn_q." in t.name:
            w = _unpermute(w, config["num_attention_heads"])
        elif config["model_type"] == "llama" and ".attn_k." in t.name:
            w = _unpermute(w, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the file is mmap'd


def convert(gguf_file: Path, out: Path, name: str) -> None:
    """Write `gguf_file` as an HF folder at `out` (config.json, tokenizer, fp32 safetensors)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    reader = _reader(gguf_file)
    config = read_config(reader)
    config["_name_or_path"] = name
    state = dict(read_tensors(reader, config))
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    expect = config["vocab_size"], config["hidden_size"]
    if tuple(state.get("model.embed_tokens.weight", torch.empty(0)).shape) != expect:
        raise GGUFError(f"token embeddings must have shape {expect} (vocab x hidden)")
    del reader
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
