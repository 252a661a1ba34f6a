"""Log-probabilities a request asks for: of each generated token (OpenAI's `logprobs`) and of
each prompt token (vLLM's `prompt_logprobs`, OpenAI's `echo`).

Which distribution:
- plain decoding: `log_softmax(logits)`, the model's own distribution before temperature,
  top-k and top-p (vLLM's default, "raw logprobs");
- CoLD: `log_softmax(score)` with score = (1+β)·expert − β·amateur over the expert's plausible
  tokens and −inf elsewhere — the distribution CoLD decodes from, at temperature 1. Beside it,
  for the chosen token and each alternative, the expert's and the amateur's own
  log-probabilities: what the contrast did to each token.
Asking costs the amateur's full LM-head product for those rows (the restricted head computes
the plausible tokens only); requests that do not ask keep the restricted head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cold_ray.kernels.reference import log_alpha


@dataclass(frozen=True)
class TokenLogprobs:
    """One position: the token there, its log-probability (None for a prompt's first token,
    which has no context) and the `top` most likely tokens (id, log-probability), most likely
    first. CoLD positions add `expert` and `amateur`: the log-probabilities of the token and
    of each `top` entry under each model."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # of the token in the distribution (1: the likeliest)
    expert: tuple[float, ...] | None = None  # (the token, then each top entry)
    amateur: tuple[float, ...] | None = None


def _rows(lp: torch.Tensor, tokens: torch.Tensor, n_top: list[int]):
    """(chosen log-probs [rows], their ranks, top ids [rows, k], top log-probs [rows, k]) on
    the host."""
    k = max(n_top, default=0)
    chosen = lp.gather(1, tokens.unsqueeze(1))
    ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    chosen = chosen.squeeze(1).tolist()
    if k:
        top = lp.topk(k, dim=-1)
        return chosen, ranks, top.indices.tolist(), top.values.tolist()
    return chosen, ranks, [[]] * len(n_top), [[]] * len(n_top)


def plain(logits: torch.Tensor, tokens: torch.Tensor, n_top: list[int]) -> list[TokenLogprobs]:
    """logits: [rows, V], tokens: [rows] -> one TokenLogprobs per row."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen, ranks, ids, values = _rows(lp, tokens, n_top)
    return [
        TokenLogprobs(t, c, tuple(zip(i[:n], v[:n])), r)
        for t, c, r, i, v, n in zip(tokens.tolist(), chosen, ranks, ids, values, n_top)
    ]


def contrastive(
    expert_logits: torch.Tensor,  # [rows, V]
    amateur_logits: torch.Tensor,  # [rows, V]
    alpha: torch.Tensor,  # [rows]
    beta: torch.Tensor,  # [rows]
    tokens: torch.Tensor,  # [rows]
    n_top: list[int],
) -> list[TokenLogprobs]:
    """CoLD positions: the contrastive distribution, with each model's view of its tokens."""
    e = torch.log_softmax(expert_logits.float(), dim=-1)
    a = torch.log_softmax(amateur_logits.float(), dim=-1)
    raw = expert_logits.float()
    valid = raw >= raw.amax(dim=-1, keepdim=True) + log_alpha(alpha).unsqueeze(-1)  # as selected
    b = beta.float().unsqueeze(-1)
    score = ((1.0 + b) * raw - b * amateur_logits.float()).masked_fill(~valid, -math.inf)
    lp = torch.log_softmax(score, dim=-1)
    chosen, ranks, ids, values = _rows(lp, tokens, n_top)
    out = []
    for r, (t, c, n) in enumerate(zip(tokens.tolist(), chosen, n_top)):
        # a top list never reaches past the plausible set (those tokens have probability 0)
        top = [(i, v) for i, v in zip(ids[r][:n], values[r][:n]) if v > -math.inf]
        at = torch.tensor([t] + [i for i, _ in top], device=e.device)
        expert, amateur = tuple(e[r, at].tolist()), tuple(a[r, at].tolist())
        out.append(TokenLogprobs(t, c, tuple(top), ranks[r], expert, amateur))
    return out


def prompt_targets(prompt: list[int], start: int, count: int) -> list[int]:
    """The tokens positions start..start+count-1 predict (the next prompt token each); the
    last prompt position predicts the first generated token, which is not a prompt token."""
    return prompt[start + 1 : start + count + 1]
