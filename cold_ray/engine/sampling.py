"""Token selection for one step: plain rows from full logits, CoLD pairs from the expert's
full logits and the amateur's logits at the expert's plausible tokens only (DESIGN §1).

Sampling is one batched pass over the sampled rows ([rows, K] tensor ops, no loop per row)
that cannot be poisoned by a request's values:
- temperature is clamped to [GREEDY_TEMPERATURE, fp32 max] after the row maximum is
  subtracted, so scores stay <= 0 and finite-safe; top_k >= K means "off"; top_p keeps at
  least the top token;
- a row with no finite maximum (NaN anywhere, +inf, or -inf everywhere) gets FAILED instead of
  an exception, so the caller fails that request alone.

Randomness is counter-based: the uniform that drives row r's draw is a hash of (the request's
seed, the index of the token being drawn), computed on the host. It needs no generator on the
scores' device, so sampling works unchanged on CPU, CUDA and NPU; and since a row's draw
depends only on its own scores and its own (seed, step), a seeded request's tokens do not
depend on its row position or on the other rows of the batch.
The draw is an inverse-CDF lookup on the row's cumulative weights in token order (one
`cumsum` + `searchsorted`), so a batch of 32 rows over a 49k vocabulary costs a few passes
over [rows, V] — no sort unless a row asks for top-p, and then a `topk` of 64 candidates
(widened only for rows whose top-p mass lies beyond them).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cold_ray.decoding import GREEDY_TEMPERATURE, ColdParams, SamplingParams
from cold_ray.kernels import LoraBackend

FAILED = -1  # the token of a row that cannot be sampled (its scores are not finite)
_FP32_MAX = torch.finfo(torch.float32).max
_TOP_P_WIDTHS = (64, 1024)  # topk widths tried for top-p before sorting the whole row
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


class SamplingError(RuntimeError):
    """A request's next token could not be chosen; fails that request only."""

    def __init__(self, message: str | None = None):
        super().__init__(
            message
            or "the model produced no finite score for this request's next token "
            "(NaN or infinite logits); its decoding cannot continue"
        )


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijective 64-bit hash (Steele et al. 2014)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class SeedState:
    """A request's randomness: its seed; the token index counts the draws. No device, no
    hidden state, so a draw can be recomputed and never depends on the batch."""

    seed: int

    def uniform(self, step: int) -> float:
        """The uniform in (0, 1] that drives the draw of output token number `step`.

        SplitMix64 stream number mix(seed), element step+1; 24 bits, exact in fp32.
        """
        s, rest = 0, self.seed
        while True:  # fold seeds wider than 64 bits
            s = _mix64(s ^ (rest & _M64))
            rest >>= 64
            if not rest:
                break
        h = _mix64((s + (step + 1) * _GOLDEN) & _M64)
        return ((h >> 40) + 1) / (1 << 24)


def new_sampler_state(params: SamplingParams) -> SeedState | None:
    """The sampling state a request stores: None when it decodes greedily, else its own
    seed or a fresh random one. It has no device: the same state serves CPU, CUDA and NPU."""
    if params.greedy:
        return None
    return SeedState(params.seed if params.seed is not None else secrets.randbits(64))


RowRandomness = SeedState | torch.Generator | None


def _uniform(rng: RowRandomness, step: int | None) -> float:
    if isinstance(rng, SeedState):
        if step is None:
            raise ValueError("a SeedState needs the index of the token being drawn (steps)")
        return rng.uniform(step)
    if isinstance(rng, torch.Generator):  # a host generator draws one host scalar: any device
        if rng.device.type != "cpu":
            raise ValueError(f"generators must be CPU generators, got one on {rng.device}")
        return 1.0 - float(torch.rand((), generator=rng))  # (0, 1]
    return float(torch.rand(())) or 1.0  # an unseeded row without state: any draw will do


def sample_rows(
    scores: torch.Tensor,  # [rows, K] fp32, -inf = not allowed
    ids: torch.Tensor | None,  # [rows, K] token id of each column, None = column is the id
    params: Sequence[SamplingParams],
    rngs: Sequence[RowRandomness],
    steps: Sequence[int] | None = None,  # index of the token being drawn, per row
) -> list[int]:
    """One token per row; FAILED for a row whose scores have no finite maximum.

    Greedy rows (temperature < GREEDY_TEMPERATURE) take the argmax (first column on ties).
    Sampling rows draw from softmax(scores / T) cut by top-k, then by top-p (the smallest set
    of most likely tokens whose renormalised mass reaches top_p; tokens tied with its last
    one are kept too), using `rngs[i]` — a SeedState (needs `steps[i]`) or a CPU generator.
    """
    rows, k = scores.shape
    if not (len(params) == len(rngs) == rows) or (steps is not None and len(steps) != rows):
        raise ValueError(
            f"scores has {rows} rows but params/rngs/steps have "
            f"{len(params)}/{len(rngs)}/{len(steps) if steps is not None else '-'}"
        )
    picks = scores.argmax(dim=-1)
    failed = ~torch.isfinite(scores.amax(dim=-1))
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows_scores = scores if len(sampled) == rows else scores[sampled]
        u = [_uniform(rngs[i], steps[i] if steps is not None else None) for i in sampled]
        cols = draw(rows_scores, [params[i] for i in sampled], u)
        if len(sampled) == rows:
            picks = cols
        else:
            picks[torch.tensor(sampled, device=scores.device)] = cols
    if ids is not None:
        picks = ids.gather(1, picks.unsqueeze(1)).squeeze(1)
    return picks.masked_fill(failed, FAILED).tolist()


def draw(scores: torch.Tensor, params: Sequence[SamplingParams], u: Sequence[float]):
    """Sample one column per row of `scores` [rows, K] with the uniforms `u` (in (0, 1]).

    Semantics (exact arithmetic):
        z = (scores - max(scores)) / clamp(T, GREEDY_TEMPERATURE, fp32 max)
        z = z where z >= threshold(z, top_k, top_p) else -inf
        w = exp(z); col = min{ j : sum(w[:j+1]) >= u * sum(w) }
    Returns [rows] int64 columns; a row with no finite maximum gives an arbitrary column
    (the caller masks it).
    """
    rows, k = scores.shape
    device = scores.device
    peak = scores.amax(dim=-1, keepdim=True)
    peak = peak.masked_fill(~torch.isfinite(peak), 0.0)
    temps = [min(max(p.temperature, GREEDY_TEMPERATURE), _FP32_MAX) for p in params]
    temp = torch.tensor(temps, dtype=torch.float32, device=device).unsqueeze(1)
    z = torch.sub(scores.float(), peak).div_(temp)  # <= 0; the peak is 0, -inf stays -inf
    top_k = [p.top_k if 0 < p.top_k < k else k for p in params]  # k = off
    cut = [i for i, p in enumerate(params) if top_k[i] < k or p.top_p < 1.0]
    if cut:
        zc = z[cut]
        thr = _thresholds(zc, [top_k[i] for i in cut], [params[i].top_p for i in cut])
        z[cut] = zc.masked_fill(zc < thr, -math.inf)
    w = z.exp_().cumsum_(dim=-1)  # [rows, K] non-decreasing; w[:, -1] >= 1 (the peak's weight)
    target = torch.tensor(u, dtype=torch.float32, device=device).unsqueeze(1) * w[:, -1:]
    return torch.searchsorted(w, target).squeeze(1).clamp_max_(k - 1)


def _thresholds(z: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Per-row lowest z kept by top-k, then by top-p on the renormalised rest; -inf keeps all.

    Thresholds are values, so tokens tied with the k-th (or with top-p's last) are kept too.
    z: [rows, K] (max 0 on finite rows), top_k: K = off, top_p: 1.0 = off -> [rows, 1]
    """
    rows, k = z.shape
    device = z.device
    thr_k = torch.full((rows, 1), -math.inf, device=device)
    k_rows = [i for i in range(rows) if top_k[i] < k]
    if k_rows:
        vals = z[k_rows].topk(max(top_k[i] for i in k_rows), dim=-1).values  # sorted desc
        kth = torch.tensor([top_k[i] - 1 for i in k_rows], device=device).unsqueeze(1)
        thr_k[k_rows] = vals.gather(1, kth)
    todo = [i for i in range(rows) if top_p[i] < 1.0]
    if not todo:
        return thr_k
    thr = thr_k.clone()
    zp = z[todo]
    total = zp.masked_fill(zp < thr_k[todo], -math.inf).exp_().sum(dim=-1, keepdim=True)
    goal = torch.zeros(rows, 1, device=device)  # the mass top-p must reach, per row
    goal[todo] = torch.tensor([top_p[i] for i in todo], device=device).unsqueeze(1) * total
    for width in sorted({min(w, k) for w in (*_TOP_P_WIDTHS, k)}):
        # the `width` largest z of each row still looking for its cut, and their mass
        v = z[todo].topk(width, dim=-1).values  # [len(todo), width], sorted descending
        mass = v.masked_fill(v < thr_k[todo], -math.inf).exp_().cumsum_(dim=-1)
        at = torch.searchsorted(mass, goal[todo])  # first position reaching it: [len(todo), 1]
        cut = v.gather(1, at.clamp_max(width - 1))
        thr[todo] = torch.maximum(thr_k[todo], cut)
        if width == k:
            break
        todo = [i for i, short in zip(todo, (at[:, 0] >= width).tolist()) if short]
        if not todo:
            break
    return thr


def cold_select(
    backend: LoraBackend,
    lm_head: torch.Tensor,  # [V, hidden]
    expert_logits: torch.Tensor,  # [pairs, V]
    amateur_hidden: torch.Tensor,  # [pairs, hidden]
    cold: Sequence[ColdParams],
    params: Sequence[SamplingParams],
    rngs: Sequence[RowRandomness],
    steps: Sequence[int] | None = None,
) -> list[int]:
    """Contrastive step for CoLD pairs; the amateur LM head runs only on candidate tokens.

    Greedy pairs take the kernel's token (lowest id among tied maxima); sampled pairs draw
    over the candidates' contrastive scores. FAILED where a pair has no finite score.
    """
    device = expert_logits.device
    alpha = torch.tensor([c.alpha for c in cold], device=device)
    beta = torch.tensor([c.beta for c in cold], device=device)
    step = backend.contrastive_restricted(expert_logits, amateur_hidden, lm_head, alpha, beta)
    if all(p.greedy for p in params):
        failed = ~torch.isfinite(step.scores.amax(dim=-1))
        return step.tokens.masked_fill(failed, FAILED).tolist()
    sampled = sample_rows(step.scores, step.ids, params, rngs, steps)
    picks = step.tokens.tolist()
    return [s if not p.greedy or s == FAILED else t for t, s, p in zip(picks, sampled, params)]
