"""Architecture description of a Llama-family decoder, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass, field

# LoRA target modules we support, grouped by the fused linear that holds them.
FUSED_SITES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
TARGET_MODULES: tuple[str, ...] = tuple(m for parts in FUSED_SITES.values() for m in parts)
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 has q/k/v bias
    model_type: str = "llama"
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"
    hf_config: object = field(default=None, compare=False, repr=False)  # for RoPE variants

    @classmethod
    def from_hf(cls, cfg, name: str = "model") -> ModelArgs:
        model_type = getattr(cfg, "model_type", "llama")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {model_type!r}; supported: {SUPPORTED_ARCHITECTURES}"
            )
        heads = cfg.num_attention_heads
        eos = cfg.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            model_type=model_type,
            sliding_window=getattr(cfg, "sliding_window", None)
            if getattr(cfg, "use_sliding_window", True)
            else None,
            eos_token_ids=eos_ids,
            name=name,
            hf_config=cfg,
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable projection."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
