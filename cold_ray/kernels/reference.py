"""Plain-torch fp32 reference for the LoRA (BGMV) and contrastive-step contracts.

This is the oracle every other implementation is tested against, and the fallback that
runs anywhere torch runs.
"""

from __future__ import annotations

import math

import torch


def shrink(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Project each row onto its adapter's rank space.

    Semantics:
        t[i] = x[i] @ A[idx[i]].T  if idx[i] >= 0 else 0      (fp32)

    x: [rows, in], A: [slots, r, in], idx: [rows] int64 -> t: [rows, r] fp32
    """
    t = torch.zeros(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)
    for i in range(x.shape[0]):
        k = int(idx[i])
        if k >= 0:  # explicit: A[-1] would silently pick the last slot
            t[i] = x[i].float() @ A[k].float().T
    return t


def expand(
    t: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor, y: torch.Tensor
) -> None:
    """Add each row's adapter output to y in place; rows with idx -1 are untouched.

    Semantics:
        y[i] += scale[idx[i]] * t[i] @ B[idx[i]].T   if idx[i] >= 0

    t: [rows, r], B: [slots, out, r], idx: [rows], scale: [slots], y: [rows, out]
    """
    for i in range(t.shape[0]):
        k = int(idx[i])
        if k >= 0:
            delta = scale[k].float() * (t[i].float() @ B[k].float().T)
            y[i] = (y[i].float() + delta).to(y.dtype)


def lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    idx: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """y[i] += scale[k] * (x[i] @ A[k].T) @ B[k].T for k = idx[i] >= 0 (shrink, then expand)."""
    expand(shrink(x, A, idx), B, idx, scale, y)


def log_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """ln(alpha) in fp32, never -inf.

    An alpha too small for fp32 (1e-300 rounds to 0, whose log is -inf) gives the lowest
    finite fp32 instead: max + ln(alpha) then stays below every finite logit, so every token
    with a finite logit is plausible (the limit alpha -> 0), -inf logits stay implausible,
    and a +inf maximum cannot turn the threshold into inf - inf = NaN.

    alpha: [rows] -> [rows] fp32
    """
    return torch.log(alpha.float()).clamp_min(torch.finfo(torch.float32).min)


def candidate_width(counts: torch.Tensor) -> int:
    """K, the padded candidate count: the widest row's, at least 1 (a row whose logits are
    NaN has no valid token; it gets one padding column and all -inf scores, not an error)."""
    return max(int(counts.max()), 1) if counts.numel() else 1


def plausible_candidates(
    expert_logits: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the expert finds plausible, as a padded candidate list per row.

    Semantics:
        valid[i, v] = expert_logits[i, v] >= max(expert_logits[i]) + log_alpha(alpha[i])
        ids[i]      = the valid token ids of row i, padded to the widest row (K >= 1)
        mask[i, j]  = ids[i, j] is a real (not padding) candidate

    expert_logits: [rows, V], alpha: [rows] -> ids: [rows, K] int64, mask: [rows, K] bool
    """
    logits = expert_logits.float()
    threshold = logits.max(dim=-1, keepdim=True).values + log_alpha(alpha).unsqueeze(-1)
    valid = logits >= threshold
    counts = valid.sum(dim=-1)
    k = candidate_width(counts)
    # Exactly counts[i] logits of row i are >= its threshold, so its top-counts[i] are the valid set.
    ids = logits.topk(k, dim=-1).indices
    mask = torch.arange(k, device=logits.device).unsqueeze(0) < counts.unsqueeze(-1)
    return ids, mask


def contrastive_scores(
    expert_logits: torch.Tensor,
    amateur_logits: torch.Tensor,
    beta: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """CoLD scores at candidate tokens.

    Semantics:
        score = (1 + beta) * expert - beta * amateur   where mask, -inf elsewhere

    expert_logits, amateur_logits, mask: [rows, K] (both logits at the same candidate ids);
    beta: [rows] -> scores [rows, K] fp32
    """
    b = beta.float().unsqueeze(-1)
    score = (1.0 + b) * expert_logits.float() - b * amateur_logits.float()
    return score.masked_fill(~mask, -math.inf)


def contrastive_greedy(
    expert_logits: torch.Tensor,
    amateur_logits: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
) -> torch.Tensor:
    """Greedy CoLD token from full expert and amateur logits (docs/design.md §1, the definition).

    Semantics:
        valid = expert >= max(expert) + ln(alpha)                  # mask on EXPERT logits
        next  = argmax((1 + beta) * expert - beta * amateur  on valid, -inf elsewhere)
    (ln(alpha) as `log_alpha`: finite even where fp32 rounds alpha to 0.)

    expert_logits, amateur_logits: [rows, V]; alpha, beta: [rows] -> tokens [rows] int64
    """
    e = expert_logits.float()
    threshold = e.max(dim=-1, keepdim=True).values + log_alpha(alpha).unsqueeze(-1)
    valid = e >= threshold
    b = beta.float().unsqueeze(-1)
    score = ((1.0 + b) * e - b * amateur_logits.float()).masked_fill(~valid, -math.inf)
    return score.argmax(dim=-1)
