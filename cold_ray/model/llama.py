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
from cold_ray.kernels.cpu_gemm import fill_panels, panel_views, release_freed_memory
from cold_ray.model.args import ModelArgs
from cold_ray.model.lora import (
    ROW_MAJOR_ROWS,
    LoraLinear,
    linear,
    pack_weight,
    packed_linear,
)


@dataclass
class DecodeAttention:
    """Decode tokens (one per row) sit first in the step's flat token list, at [0, num).

    SDPA runs over the cache slots [0, span_rows) as a view (no gather): a decode row's query
    goes to its own slot; slots in that range without a decoding row get a dummy query that
    attends position 0 only, and their output is dropped. The CPU kernel needs none of this:
    each token reads positions 0..its position of its own slot (`ForwardBatch.slots` and
    `.positions` at [0, num)).
    """

    num: int  # decode tokens D
    span_rows: int  # S >= D: cache slots [0, S) attended
    slots: torch.Tensor | None  # [D] slot of each decode token; None when it is [0, D) in order
    mask: torch.Tensor  # [S, 1, 1, L] additive (0 = attend, -inf = not)


@dataclass
class PrefillAttention:
    """Prefill chunks follow the decode tokens in the flat list, at [start, N).

    Each chunk attends causally to its row's cache up to itself (earlier chunks and reused
    prefix blocks included); chunks are padded to one [P, C] block for a single SDPA call.
    """

    start: int  # first flat index of prefill tokens (= D)
    slots: torch.Tensor  # [P] cache slot of each chunk
    pad_index: torch.Tensor  # [P, C] flat index of each padded query (padding repeats one)
    unpad_index: torch.Tensor  # [N - start] position in the flattened [P * C] block
    mask: torch.Tensor  # [P, 1, C, L] additive (0 = attend, -inf = not)
    fresh: bool  # one chunk starting at position 0: attend to its own K/V, causally
    gqa_mask: torch.Tensor | None = None  # `mask` tiled for grouped queries, made once


@dataclass
class ForwardBatch:
    """One step's tokens flattened to [N] (decode tokens first, then prefill chunks), built
    once per step by the engine."""

    positions: torch.Tensor  # [N] int64, absolute position of each token
    slots: torch.Tensor  # [N] int64, cache slot of each token (where its K/V are written)
    lora: LoraBatch | None  # adapter metadata per token
    decode: DecodeAttention | None
    prefill: PrefillAttention | None
    out_index: torch.Tensor  # [R] flat indices whose final hidden states are returned


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
    # x: [N, heads, D]; cos/sin: [N, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, kernels=None
) -> torch.Tensor:
    """x += delta in place (the residual stream; None: nothing to add), then RMS norm of x."""
    if kernels is not None:
        return kernels.add_rms_norm(x, delta, weight, eps)
    if delta is not None:
        x.add_(delta)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _gqa_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, heads, T, D] -> [B, kv_heads, groups * T, D]: the queries sharing a K/V head become
    extra query rows, so SDPA needs neither `enable_gqa` nor repeated K/V (with a mask,
    `enable_gqa` sends CUDA to its math fallback)."""
    b, h, t, d = q.shape
    return q.reshape(b, kv_heads, (h // kv_heads) * t, d)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, max_loras: int, max_rank: int):
        super().__init__()
        self.h, self.kvh, self.d = args.num_heads, args.num_kv_heads, args.head_dim
        q, kv = self.h * self.d, self.kvh * self.d
        self.qkv_proj = LoraLinear(
            args.hidden_size, (q, kv, kv), args.attention_bias, max_loras, max_rank
        )
        self.o_proj = LoraLinear(q, (args.hidden_size,), False, max_loras, max_rank)
        # Set by the engine: a fused decode-attention kernel (CPU, `kernels/cpu_attention.py`)
        # taking (q, k, v, slots, positions); None = SDPA over the cache view.
        self.decode_kernel = None
        self.rowwise = None  # `kernels/cpu_rowwise.py`'s kernels (CPU, fp32), or None

    def forward(self, x, rope, cache, layer: int, fb: ForwardBatch):
        # x: [N, hidden]; rope: (cos, sin) [N, 1, head_dim] per token, or with `rowwise` the
        # [max_len, head_dim] tables
        n = x.shape[0]
        heads = self.qkv_proj(x, fb.lora).view(n, self.h + 2 * self.kvh, self.d)
        v = heads[:, self.h + self.kvh :]
        if self.rowwise is not None:  # rotated in place, K/V written: one call
            self.rowwise.rope_cache_write(
                heads, *rope, fb.positions, fb.slots, cache.k[layer], cache.v[layer], self.h
            )
            q, k = heads[:, : self.h], heads[:, self.h : self.h + self.kvh]
        else:
            qk = apply_rope(heads[:, : self.h + self.kvh], *rope)  # q and k heads in one go
            q, k = qk[:, : self.h], qk[:, self.h :]
            cache.k[layer, fb.slots, :, fb.positions] = k.to(cache.k.dtype)
            cache.v[layer, fb.slots, :, fb.positions] = v.to(cache.v.dtype)
        if fb.prefill is None:  # decode only: no scatter into a shared output
            out = self._decode(q, cache, layer, fb)
        else:
            out = q.new_empty(n, self.h, self.d)
            if fb.decode is not None:
                out[: fb.decode.num] = self._decode(q[: fb.decode.num], cache, layer, fb)
            out[fb.prefill.start :] = self._prefill(q, k, v, cache, layer, fb.prefill)
        return self.o_proj(out.reshape(n, self.h * self.d), fb.lora)

    def _decode(self, q, cache, layer: int, fb: ForwardBatch) -> torch.Tensor:
        # q: [D, heads, head_dim] -> [D, heads, head_dim]
        d = fb.decode
        if self.decode_kernel is not None:  # decode tokens lead the flat list: [0, D)
            return self.decode_kernel(
                q, cache.k[layer], cache.v[layer], fb.slots[: d.num], fb.positions[: d.num]
            )
        span = d.mask.shape[-1]
        keys = cache.k[layer, : d.span_rows, :, :span]  # views: no gather of the cache
        values = cache.v[layer, : d.span_rows, :, :span]
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a bf16 cache widens (a copy)
        if d.slots is not None:  # decode rows are not exactly slots [0, D) in order
            full = q.new_zeros(d.span_rows, self.h, self.d)
            full[d.slots] = q
            q = full
        groups = self.h // self.kvh
        out = F.scaled_dot_product_attention(
            q.view(-1, self.kvh, groups, self.d), keys, values, attn_mask=d.mask
        )  # [S, kv_heads, groups, head_dim]
        out = out.reshape(-1, self.h, self.d)
        return out if d.slots is None else out[d.slots]

    def _prefill(self, q, k, v, cache, layer: int, p: PrefillAttention) -> torch.Tensor:
        # -> [N - start, heads, head_dim]
        if p.fresh:  # one chunk from position 0: its own K/V, plain causal attention
            if cache.k.dtype != q.dtype:  # a bf16 cache: what it holds, as later steps read it
                k, v = k.to(cache.k.dtype).to(q.dtype), v.to(cache.v.dtype).to(q.dtype)
            qs, ks, vs = (t[p.start :].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            return out[0].transpose(0, 1)
        rows, width = p.pad_index.shape
        span = p.mask.shape[-1]
        qp = q[p.pad_index].transpose(1, 2)  # [P, heads, C, head_dim]
        keys = cache.k[layer, p.slots, :, :span].to(q.dtype)  # [P, kv_heads, L, head_dim]
        values = cache.v[layer, p.slots, :, :span].to(q.dtype)
        if p.gqa_mask is None:  # row g*C + c of a K/V head is query c: tile the mask once
            p.gqa_mask = p.mask.repeat(1, 1, self.h // self.kvh, 1)
        out = F.scaled_dot_product_attention(
            _gqa_queries(qp, self.kvh), keys, values, attn_mask=p.gqa_mask
        )  # [P, kv_heads, groups * C, head_dim]
        out = out.view(rows, self.h, width, self.d).transpose(1, 2).reshape(-1, self.h, self.d)
        return out[p.unpad_index]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, max_loras: int, max_rank: int):
        super().__init__()
        i = args.intermediate_size
        self.gate_up_proj = LoraLinear(args.hidden_size, (i, i), False, max_loras, max_rank)
        self.down_proj = LoraLinear(i, (args.hidden_size,), False, max_loras, max_rank)

        self.rowwise = None  # `kernels/cpu_rowwise.py`'s kernels (CPU, fp32), or None

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, lora)
        if self.rowwise is not None:
            return self.down_proj(self.rowwise.silu_mul(gate_up), lora)
        gate, up = gate_up.chunk(2, dim=-1)
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
        self.rowwise = None  # `kernels/cpu_rowwise.py`'s kernels (CPU, fp32), or None

    def lora_sites(self) -> dict[str, LoraLinear]:
        """The LoRA-aware linears of this block, by fused-site name (see FUSED_SITES)."""
        return {
            "qkv_proj": self.self_attn.qkv_proj,
            "o_proj": self.self_attn.o_proj,
            "gate_up_proj": self.mlp.gate_up_proj,
            "down_proj": self.mlp.down_proj,
        }

    def forward(self, x, delta, rope, cache, layer, fb: ForwardBatch):
        """x: the residual stream [N, hidden], to which the previous block's output `delta`
        (None for the first block) is added in place; returns this block's output."""
        h = add_rms_norm(x, delta, self.input_layernorm, self.eps, self.rowwise)
        attn = self.self_attn(h, rope, cache, layer, fb)
        h = add_rms_norm(x, attn, self.post_attention_layernorm, self.eps, self.rowwise)
        return self.mlp(h, fb.lora)


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
        self.lm_packed: torch.Tensor | None = None
        self.weight_dtype = torch.float32  # what the base weights hold (`round_base_weights`)
        self.gemm = None  # the GEMM kernel that reads the LM head by rows (`pack_cpu_weights`)
        self.rowwise = None  # see `set_rowwise_kernels`
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    @property
    def lm_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def lora_linears(self) -> list[LoraLinear]:
        return [m for m in self.modules() if isinstance(m, LoraLinear)]

    def step_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: every base projection and the LM head
        (packing keeps the sizes)."""
        size = self.weight_dtype.itemsize
        linears = sum(m.in_features * m.out_features for m in self.lora_linears())
        return (linears + self.lm_weight.numel()) * size

    @torch.no_grad()
    def round_base_weights(self, dtype: torch.dtype) -> None:
        """Round every base weight — projections, embedding, LM head — to `dtype`'s values in
        place (bf16 on CPU: the model then computes in fp32 on bf16 weights, which
        `pack_cpu_weights` stores in half the bytes). Norms and LoRA slots keep fp32."""
        self.weight_dtype = dtype
        for w in [m.weight for m in self.lora_linears()] + [self.embed_tokens, self.lm_head]:
            if w is not None:
                w.copy_(w.to(dtype))

    def pack_cpu_weights(self, gemm=None, lm_head: bool = True, small_batch: bool = False) -> bool:
        """Lay the base GEMM weights out once for CPU products (fp32 arithmetic).

        With the GEMM kernel `gemm` (`kernels/cpu_gemm.py`), every projection goes to panels of
        `weight_dtype` (fp32, or bf16 after `round_base_weights`) that serve steps of any size:
        one copy, filled and its row-major weight dropped one at a time, so packing never holds
        two copies of the layers. The LM head stays the row-major embedding it is tied to,
        which the kernel's row-major product reads: one copy serves lookups, the restricted
        CoLD head and the head's product (bf16 stores it in bf16). A projection the panels
        cannot take (out features not a multiple of 16) is packed for oneDNN instead.
        Without the kernel, every weight is packed for oneDNN, the LM head's packed copy beside
        the embedding; `small_batch` keeps each projection's row-major weight for 1–2-row steps
        (`LoraLinear.pack_base`). False where oneDNN packing is needed but unavailable."""
        linears = self.lora_linears()
        views = [None] * len(linears)
        if gemm is not None:
            views = panel_views([m.weight for m in linears], self.weight_dtype)
        packed = True
        for m, view in zip(linears, views):
            if view is not None:
                m.use_panels(fill_panels(view, m.weight), gemm)
            else:
                packed = m.pack_base(small_batch) and packed
            release_freed_memory()  # the row-major weight just dropped
        if gemm is not None:
            self.gemm = gemm
            for name in ("embed_tokens", "lm_head"):  # rows read as they are, widened
                weight = getattr(self, name)
                if weight is not None and weight.dtype != self.weight_dtype:
                    setattr(
                        self, name, nn.Parameter(weight.to(self.weight_dtype), requires_grad=False)
                    )
            release_freed_memory()
        elif lm_head:
            self.lm_packed = pack_weight(self.lm_weight)
        return packed

    def set_backend(self, backend: LoraBackend) -> None:
        for m in self.lora_linears():
            m.backend = backend

    def set_decode_kernel(self, kernel) -> None:
        for layer in self.layers:
            layer.self_attn.decode_kernel = kernel

    def set_rowwise_kernels(self, kernels) -> None:
        """`kernels/cpu_rowwise.py`'s kernels for norms, rotary embedding + cache writes and
        SiLU·mul (CPU, fp32), or None for torch's operators."""
        self.rowwise = kernels
        for layer in self.layers:
            layer.rowwise = layer.self_attn.rowwise = layer.mlp.rowwise = kernels

    def init_rope(self) -> None:
        self.rope_cos, self.rope_sin = rope_tables(self.args, self.max_len, self.norm.device)
        self.rope_cos = self.rope_cos.to(self.norm.dtype)
        self.rope_sin = self.rope_sin.to(self.norm.dtype)

    def forward(self, tokens: torch.Tensor, cache, fb: ForwardBatch) -> torch.Tensor:
        """tokens: [N] -> final normed hidden states at `fb.out_index`, [R, hidden].

        `cache` holds k/v tensors [layers, slots, kv_heads, max_len, head_dim]; each token's
        K/V are written at (its slot, its position) before attention reads them.
        """
        # the residual stream, updated in place (bf16 embeddings widen to the model's fp32)
        x = F.embedding(tokens, self.embed_tokens).to(self.norm.dtype)
        if self.rowwise is not None:  # the kernel looks positions up in the tables
            self.rowwise.check_rows(fb.positions, fb.slots, self.max_len, cache.k.shape[1])
            rope = (self.rope_cos, self.rope_sin)
        else:
            rope = (
                self.rope_cos[fb.positions].unsqueeze(1),  # [N, 1, head_dim]
                self.rope_sin[fb.positions].unsqueeze(1),
            )
        delta = None
        for i, layer in enumerate(self.layers):
            delta = layer(x, delta, rope, cache, i, fb)
        x = x.add_(delta)[fb.out_index]
        return add_rms_norm(x, None, self.norm, self.args.rms_norm_eps, self.rowwise)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [rows, hidden] -> full-vocabulary logits [rows, V]."""
        if self.gemm is not None:
            return self.gemm.by_rows(hidden, self.lm_weight)
        if self.lm_packed is not None and hidden.shape[0] > ROW_MAJOR_ROWS:
            return packed_linear(hidden, self.lm_packed, None)
        return linear(hidden, self.lm_weight)
