"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) for the engine.

Every row of a batch may carry a different LoRA adapter (or none): the LoRA-aware linears
add each row's delta on top of one shared base GEMM. The KV cache is owned by the engine and
indexed by row slot; the model only reads and writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from cold_ray.kernels import LoraBackend, LoraBatch
from cold_ray.model.config import ModelArgs
from cold_ray.model.lora import LoraLinear, linear


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, slots, kv_heads, max_len, head_dim]
    v: torch.Tensor  # [layers, slots, kv_heads, max_len, head_dim]

    @classmethod
    def allocate(cls, args: ModelArgs, slots: int, max_len: int, dtype, device) -> KVCache:
        shape = (args.num_layers, slots, args.num_kv_heads, max_len, args.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))  # fmt: skip

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy one row's cache to another slot (used to keep running rows contiguous)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class ForwardBatch:
    """What one forward pass needs besides token ids; built once per step by the engine."""

    positions: torch.Tensor  # [rows, T] int64, absolute position of each token
    slots: torch.Tensor  # [rows] int64, cache slot of each row
    lora: LoraBatch | None  # adapter metadata per token (rows * T)
    prefill: bool  # True: T prompt tokens per row into empty slots; False: T == 1 decode
    # decode only: attention mask over cache positions [rows, 1, 1, L] (True = attend)
    attn_mask: torch.Tensor | None = None
    contiguous_slots: bool = False  # decode rows are exactly slots 0..rows-1


def rope_tables(args: ModelArgs, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = args.hf_config
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    attention_factor = 1.0
    if rope_type == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    else:  # llama3 / linear / yarn ...: transformers' own definitions
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    freqs = torch.outer(torch.arange(max_len).float(), inv_freq.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attention_factor).to(device), (emb.sin() * attention_factor).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [rows, heads, T, D]; cos/sin: [rows, 1, T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, max_loras: int, max_rank: int):
        super().__init__()
        self.h, self.kvh, self.d = args.num_heads, args.num_kv_heads, args.head_dim
        q, kv = self.h * self.d, self.kvh * self.d
        self.qkv_proj = LoraLinear(
            args.hidden_size, (q, kv, kv), args.attention_bias, max_loras, max_rank
        )
        self.o_proj = LoraLinear(q, (args.hidden_size,), False, max_loras, max_rank)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, fb: ForwardBatch):
        rows, t, _ = x.shape
        qkv = self.qkv_proj(x.view(rows * t, -1), fb.lora).view(rows, t, -1)
        q, k, v = qkv.split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        q = apply_rope(q.view(rows, t, self.h, self.d).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(rows, t, self.kvh, self.d).transpose(1, 2), cos, sin)
        v = v.view(rows, t, self.kvh, self.d).transpose(1, 2)
        if fb.prefill:
            # New rows start at position 0 in empty slots: attend causally within the prompt.
            cache.k[layer, fb.slots, :, :t] = k
            cache.v[layer, fb.slots, :, :t] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            pos = fb.positions[:, 0]
            cache.k[layer, fb.slots, :, pos] = k[:, :, 0]
            cache.v[layer, fb.slots, :, pos] = v[:, :, 0]
            length = fb.attn_mask.shape[-1]
            if fb.contiguous_slots:  # a view: no gather of the cache
                keys = cache.k[layer, :rows, :, :length]
                values = cache.v[layer, :rows, :, :length]
            else:
                keys = cache.k[layer, fb.slots, :, :length]
                values = cache.v[layer, fb.slots, :, :length]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=fb.attn_mask, enable_gqa=True
            )
        out = out.transpose(1, 2).reshape(rows * t, self.h * self.d)
        return self.o_proj(out, fb.lora).view(rows, t, -1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, max_loras: int, max_rank: int):
        super().__init__()
        i = args.intermediate_size
        self.gate_up_proj = LoraLinear(args.hidden_size, (i, i), False, max_loras, max_rank)
        self.down_proj = LoraLinear(i, (args.hidden_size,), False, max_loras, max_rank)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, lora)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, max_loras: int, max_rank: int):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.input_layernorm = nn.Parameter(torch.ones(args.hidden_size), requires_grad=False)
        self.post_attention_layernorm = nn.Parameter(
            torch.ones(args.hidden_size), requires_grad=False
        )
        self.self_attn = Attention(args, max_loras, max_rank)
        self.mlp = MLP(args, max_loras, max_rank)

    def lora_sites(self) -> dict[str, LoraLinear]:
        """The LoRA-aware linears of this block, by fused-site name (see FUSED_SITES)."""
        return {
            "qkv_proj": self.self_attn.qkv_proj,
            "o_proj": self.self_attn.o_proj,
            "gate_up_proj": self.mlp.gate_up_proj,
            "down_proj": self.mlp.down_proj,
        }

    def forward(self, x, cos, sin, cache, layer, fb: ForwardBatch):
        rows, t, hidden = x.shape
        h = F.rms_norm(x, (hidden,), self.input_layernorm, self.eps)
        x = x + self.self_attn(h, cos, sin, cache, layer, fb)
        h = F.rms_norm(x, (hidden,), self.post_attention_layernorm, self.eps)
        return x + self.mlp(h.view(rows * t, hidden), fb.lora).view(rows, t, hidden)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, max_loras: int, max_rank: int, max_len: int):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Parameter(
            torch.empty(args.vocab_size, args.hidden_size), requires_grad=False
        )
        self.layers = nn.ModuleList(
            Block(args, max_loras, max_rank) for _ in range(args.num_layers)
        )
        self.norm = nn.Parameter(torch.ones(args.hidden_size), requires_grad=False)
        self.lm_head = (
            None
            if args.tie_word_embeddings
            else nn.Parameter(torch.empty(args.vocab_size, args.hidden_size), requires_grad=False)
        )
        self.max_len = max_len
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    @property
    def lm_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def lora_linears(self) -> list[LoraLinear]:
        return [m for m in self.modules() if isinstance(m, LoraLinear)]

    def set_backend(self, backend: LoraBackend) -> None:
        for m in self.lora_linears():
            m.backend = backend

    def init_rope(self) -> None:
        self.rope_cos, self.rope_sin = rope_tables(self.args, self.max_len, self.norm.device)
        self.rope_cos = self.rope_cos.to(self.norm.dtype)
        self.rope_sin = self.rope_sin.to(self.norm.dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache, fb: ForwardBatch) -> torch.Tensor:
        """tokens: [rows, T] -> final normed hidden states [rows, T, hidden]."""
        x = F.embedding(tokens, self.embed_tokens)
        cos = self.rope_cos[fb.positions].unsqueeze(1)  # [rows, 1, T, D]
        sin = self.rope_sin[fb.positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, fb)
        return F.rms_norm(x, (x.shape[-1],), self.norm, self.args.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [rows, hidden] -> full-vocabulary logits [rows, V]."""
        return linear(hidden, self.lm_weight)
