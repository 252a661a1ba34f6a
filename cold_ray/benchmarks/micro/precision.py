"""How exact the CPU's bf16 precision is on a real model: greedy CoLD at `dtype: bfloat16` against
the two-model definition computed in the same precision, and against fp32.

    cold-ray bench precision --json [--prompts 8] [--prompt-len 64] [--new-tokens 32]

Per prompt, greedy CoLD (α 0.1, β 0.5) of the adapter runs four ways: the engine at bfloat16
and at float32, and the two-model definition (transformers + PEFT expert, transformers
amateur, full vocabulary) at each precision — for bf16, in fp32 on the bf16-rounded base
weights with keys and values rounded to bf16 as the engine's cache stores them
(`tests/test_precision.py` holds the engine to it token for token on a tiny model). For each
pair compared, the JSON gives the tokens that agree before the first divergence and, at a
divergence, the margin of the reference's own choice (its best CoLD score minus its score of
the token the other run chose): a divergence at a small margin is a near-tie. Every step's
margin between the reference's best and second-best valid tokens is summarised too (how
close the decisions were that did not diverge).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile

from cold_ray.benchmarks.common import machine_record, provenance, require_positive

ALPHA, BETA = 0.1, 0.5


def _round_model(model, keys_too: bool):
    """Base weights (every linear and embedding outside LoRA) rounded to bf16 in place; values
    rounded to bf16 as each layer stores them (keys: `_rounded_keys`)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and "lora_" not in name:
                m.weight.copy_(m.weight.to(torch.bfloat16))
            if keys_too and name.endswith("self_attn.v_proj"):
                m.register_forward_hook(lambda mod, args, out: out.to(torch.bfloat16).float())
    return model.eval()


def _rounded_keys(enabled: bool) -> None:
    """transformers' Llama attention with keys rounded to bf16 after the rotary embedding."""
    import torch
    from transformers.models.llama import modeling_llama

    rotate = getattr(modeling_llama, "_cold_ray_rotate", modeling_llama.apply_rotary_pos_emb)
    modeling_llama._cold_ray_rotate = rotate

    def rounded(q, k, *args, **kwargs):
        q, k = rotate(q, k, *args, **kwargs)
        return q, k.to(torch.bfloat16).float()

    modeling_llama.apply_rotary_pos_emb = rounded if enabled else rotate


def reference_path(expert, amateur, prompt: list[int], new_tokens: int) -> dict:
    """Greedy CoLD of the two models with their own caches: tokens and, per step, the CoLD
    scores over the vocabulary (-inf outside the plausible set)."""
    import torch

    from cold_ray.kernels import reference

    a, b = torch.tensor([ALPHA]), torch.tensor([BETA])
    tokens, scores = [], []
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        oe, oa = expert(ids, use_cache=True), amateur(ids, use_cache=True)
        for _ in range(new_tokens):
            e, m = oe.logits[:, -1].float(), oa.logits[:, -1].float()
            valid = e >= e.amax(-1, keepdim=True) + reference.log_alpha(a).unsqueeze(-1)
            score = ((1 + b) * e - b * m).masked_fill(~valid, float("-inf"))[0]
            token = int(reference.contrastive_greedy(e, m, a, b)[0])
            tokens.append(token)
            scores.append(score)
            nxt = torch.tensor([[token]])
            oe = expert(nxt, past_key_values=oe.past_key_values, use_cache=True)
            oa = amateur(nxt, past_key_values=oa.past_key_values, use_cache=True)
    return {"tokens": tokens, "scores": scores}


def compare(ref: dict, other: list[int]) -> dict:
    """Agreement of `other` with the reference path, and the reference's margin where they
    part."""
    agree = next((i for i, (x, y) in enumerate(zip(ref["tokens"], other)) if x != y), None)
    out = {"agree_tokens": len(other) if agree is None else agree, "diverged": agree is not None}
    if agree is not None:
        s = ref["scores"][agree]
        margin = float(s[ref["tokens"][agree]] - s[other[agree]])
        # inf: the other run chose a token the reference does not find plausible
        out["margin_at_divergence"] = margin if math.isfinite(margin) else None
    return out


def top2_margins(ref: dict) -> list[float]:
    """Per step, the reference's best valid score minus its second best (inf: one valid
    token)."""
    return [float(top[0] - top[1]) for top in (s.topk(2).values for s in ref["scores"])]


def run(
    model: str | None, adapter: str | None, prompts: int, prompt_len: int, new_tokens: int
) -> dict:
    """The four runs per prompt, compared (see the module's docstring)."""
    import torch

    from cold_ray.benchmarks.engine.throughput import default_adapter
    from cold_ray.model.loader import resolve_model_path

    torch.set_num_threads(1)
    path = str(resolve_model_path(model))
    with tempfile.TemporaryDirectory() as tmp:
        return _run(path, model, adapter or default_adapter(tmp), prompts, prompt_len, new_tokens)


def _run(
    path: str, model: str | None, adapter: str, prompts: int, prompt_len: int, new_tokens: int
) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cold_ray.benchmarks.common import token_prompts
    from cold_ray.config import EngineConfig
    from cold_ray.engine import ColdParams, EngineCore, SamplingParams

    engines = {}
    for dtype in ("float32", "bfloat16"):
        core = EngineCore(
            EngineConfig(
                model=model,
                dtype=dtype,
                max_rows=2,
                max_loras=1,
                max_model_len=prompt_len + new_tokens + 1,
            )
        )
        core.register_adapter("adapter", adapter)
        engines[dtype] = core
    texts = token_prompts(engines["float32"].tokenizer, prompts, prompt_len)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    got = {
        d: [
            c.generate([p], params, "adapter", ColdParams(ALPHA, BETA))[0]["token_ids"]
            for p in texts
        ]
        for d, c in engines.items()
    }

    def models(bf16: bool):
        _rounded_keys(bf16)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        expert = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter
        )
        return _round_model(expert, bf16) if bf16 else expert.eval(), (
            _round_model(base, bf16) if bf16 else base.eval()
        )

    rows, margins = [], {"float32": [], "bfloat16": []}
    for name, bf16 in (("float32", False), ("bfloat16", True)):
        expert, amateur = models(bf16)
        for i, prompt in enumerate(texts):
            ref = reference_path(expert, amateur, prompt, new_tokens)
            margins[name] += top2_margins(ref)
            row = {
                "prompt": i,
                "reference": name,
                "engine_same_precision": compare(ref, got[name][i]),
            }
            other = "bfloat16" if name == "float32" else "float32"
            row[f"engine_{other}"] = compare(ref, got[other][i])
            rows.append(row)
    _rounded_keys(False)
    summary = {}
    for name in margins:
        mine = [r for r in rows if r["reference"] == name]
        other = "bfloat16" if name == "float32" else "float32"
        finite = [m for m in margins[name] if math.isfinite(m)] or [math.nan]
        summary[name] = {
            "prompts": len(mine),
            "steps": len(margins[name]),
            "smallest_top2_margin": min(finite),
            "median_top2_margin": statistics.median(finite),
        }
        for key in ("engine_same_precision", f"engine_{other}"):
            runs = [r[key] for r in mine]
            summary[name][f"{key}_diverged"] = sum(c["diverged"] for c in runs)
            summary[name][f"{key}_agree_tokens"] = sum(c["agree_tokens"] for c in runs)
            summary[name][f"{key}_margins_at_divergence"] = [
                c["margin_at_divergence"] for c in runs if c["diverged"]
            ]
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cold-ray bench precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="PEFT adapter (default: the demo adapter, else random r16)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    require_positive(p, args, "prompts", "prompt_len", "new_tokens")
    host = machine_record()
    result = run(args.model, args.adapter, args.prompts, args.prompt_len, args.new_tokens)
    from cold_ray.kernels import cpu_kernels

    result.update(
        alpha=ALPHA,
        beta=BETA,
        kernel_blocking=cpu_kernels.blocking().record(),
        **provenance(host, argv),
    )
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
