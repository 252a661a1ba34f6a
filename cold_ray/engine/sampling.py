"""Token selection for one step: plain rows from full logits, CoLD pairs from the expert's
full logits and the amateur's logits at the expert's plausible tokens only (docs/design.md §1)."""

from __future__ import annotations

import math

import torch

from cold_ray.decoding import ColdParams, SamplingParams
from cold_ray.kernels import LoraBackend


def sample_rows(
    scores: torch.Tensor,  # [rows, K] fp32, -inf = not allowed
    ids: torch.Tensor | None,  # [rows, K] token id of each column, None = column is the id
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Greedy rows take the argmax; sampling rows apply temperature, top-k, top-p, then draw."""
    picks = scores.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = scores[i] / p.temperature
        if p.top_k:
            kth = row.topk(min(p.top_k, row.shape[0])).values[-1]
            row = row.masked_fill(row < kth, -math.inf)
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the top token)
            drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        picks[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    if ids is not None:
        picks = ids.gather(1, picks.unsqueeze(1)).squeeze(1)
    return picks.tolist()


def cold_select(
    backend: LoraBackend,
    lm_head: torch.Tensor,  # [V, hidden]
    expert_logits: torch.Tensor,  # [pairs, V]
    amateur_hidden: torch.Tensor,  # [pairs, hidden]
    cold: list[ColdParams],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Contrastive step for CoLD pairs; the amateur LM head runs only on candidate tokens."""
    device = expert_logits.device
    alpha = torch.tensor([c.alpha for c in cold], device=device)
    beta = torch.tensor([c.beta for c in cold], device=device)
    step = backend.contrastive_restricted(expert_logits, amateur_hidden, lm_head, alpha, beta)
    picks = step.tokens.tolist()
    if all(p.greedy for p in params):
        return picks
    sampled = sample_rows(step.scores, step.ids, params, generators)
    return [t if p.greedy else s for t, s, p in zip(picks, sampled, params)]
