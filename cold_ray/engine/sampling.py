"""Token selection for one step: plain rows from full logits, CoLD pairs from the expert's
full logits and the amateur's logits at the expert's plausible tokens only (docs/design.md §1).

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
over [rows, V] and no sort: top-k and top-p keep a draw only if it lies in their set (one
pass counts and sums the likelier tokens), redrawing the few that do not.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cold_ray.decoding import GREEDY_TEMPERATURE, ColdParams, SamplingParams
from cold_ray.kernels import LoraBackend

FAILED = -1  # the token of a row that cannot be sampled (its scores are not finite)
_FP32_MAX = torch.finfo(torch.float32).max
_REDRAWS = 32  # top-k/top-p redraws before a row's set is cut exactly with a sort
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

    def __post_init__(self):
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    def uniform(self, step: int, draw: int = 0) -> float:
        """The uniform in (0, 1] for draw number `draw` of output token number `step`
        (top-p may redraw). SplitMix64 of (mix(seed), step, draw); 24 bits, exact in fp32."""
        s, rest = 0, self.seed
        while True:  # fold seeds wider than 64 bits
            s = _mix64(s ^ (rest & _M64))
            rest >>= 64
            if not rest:
                break
        h = _mix64((s + (step + 1) * _GOLDEN) & _M64)
        if draw:
            h = _mix64(h ^ ((draw * _GOLDEN) & _M64))
        return ((h >> 40) + 1) / (1 << 24)


def new_sampler_state(params: SamplingParams) -> SeedState | None:
    """The sampling state a request stores: None when it decodes greedily, else its own
    seed or a fresh random one. It has no device: the same state serves CPU, CUDA and NPU."""
    if params.greedy:
        return None
    return SeedState(params.seed if params.seed is not None else secrets.randbits(64))


RowRandomness = SeedState | torch.Generator | None


def _uniform(rng: RowRandomness, step: int | None, draw: int) -> float:
    if isinstance(rng, SeedState):
        if step is None:
            raise ValueError("a SeedState needs the index of the token being drawn (steps)")
        return rng.uniform(step, draw)
    if isinstance(rng, torch.Generator):  # a host generator draws one host scalar: any device
        if rng.device.type != "cpu":
            raise ValueError(f"generators must be CPU generators, got one on {rng.device}")
        return 1.0 - float(torch.rand((), generator=rng))  # (0, 1]
    return 1.0 - float(torch.rand(()))  # an unseeded row without state: any draw will do


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
    of most likely tokens whose renormalised mass reaches top_p); cuts are by value, so
    tokens tied with the last one kept are kept too. `rngs[i]` is a SeedState (then
    `steps[i]` is needed) or a CPU generator.
    """
    rows, k = scores.shape
    if not (len(params) == len(rngs) == rows) or (steps is not None and len(steps) != rows):
        raise ValueError(
            f"scores has {rows} rows but params/rngs/steps have "
            f"{len(params)}/{len(rngs)}/{len(steps) if steps is not None else '-'}"
        )
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:  # greedy: the argmax is NaN or infinite exactly when the maximum is
        picks = scores.argmax(dim=-1, keepdim=True)
        failed = ~torch.isfinite(scores.gather(1, picks))[:, 0]
        picks = picks[:, 0] if ids is None else ids.gather(1, picks)[:, 0]
        return picks.masked_fill(failed, FAILED).tolist()
    failed = ~torch.isfinite(scores.amax(dim=-1))
    greedy = [i for i, p in enumerate(params) if p.greedy]
    picks = torch.empty(rows, dtype=torch.int64, device=scores.device)
    if greedy:
        picks[greedy] = _take(scores, greedy).argmax(dim=-1)
    if sampled:
        rows_scores = _take(scores, sampled)

        def uniform(row: int, n: int, i: list[int] = sampled) -> float:
            return _uniform(rngs[i[row]], steps[i[row]] if steps is not None else None, n)

        mine = rows_scores is not scores  # a copy: draw may overwrite it
        picks[sampled] = draw(rows_scores, [params[i] for i in sampled], uniform, overwrite=mine)
    if ids is not None:
        picks = ids.gather(1, picks.unsqueeze(1)).squeeze(1)
    return picks.masked_fill(failed, FAILED).tolist()


def draw(
    scores: torch.Tensor,  # [rows, K]
    params: Sequence[SamplingParams],
    uniform: Callable[[int, int], float],  # (row, draw number) -> (0, 1]
    overwrite: bool = False,  # scores may be used as working memory
) -> torch.Tensor:  # [rows] int64 columns
    """Sample one column per row; a row with no finite maximum gets an arbitrary column.

    Semantics (exact arithmetic):
        z = (scores - max(scores)) / clamp(T, GREEDY_TEMPERATURE, fp32 max)  # <= 0
        w = exp(z)
        S = { j : #(w > w_j) < top_k }                                  # top-k set
        S = { j in S : sum(w[S][w > w_j]) < top_p * sum(w[S]) }         # top-p set
        col ~ w restricted to S
    Drawing is an inverse-CDF lookup (col = first j with cumsum(w)[j] >= u * sum(w)). No
    sort: a draw from w is kept when it lies in S (one pass gives both the count and the
    mass of the likelier tokens), else the row draws again among tokens likelier than the
    rejected one, a superset of S, so the kept draw follows w on S exactly. A first draw
    lands in S with probability mass(S) (~top_p), so few rows redraw. Only rows with both
    top-k and top-p take a `topk`, for the top-k set's mass.
    """
    rows, k = scores.shape
    device = scores.device
    peak = scores.amax(dim=-1, keepdim=True)
    finite = torch.isfinite(peak)
    temps = [min(max(p.temperature, GREEDY_TEMPERATURE), _FP32_MAX) for p in params]
    temp = torch.tensor(temps, dtype=torch.float32, device=device).unsqueeze(1)
    z = scores.float()
    shift = peak.masked_fill(~finite, 0.0)
    z = (z.sub_(shift) if overwrite or z is not scores else z.sub(shift)).div_(temp)
    # Masks multiply weights (w * bool): on CPU ~3x cheaper than where / masked_fill. Big
    # buffers are few and reused (z becomes w in place; the cumsum and the membership
    # scratch share a per-thread buffer): fresh multi-MB allocations page-fault every call.
    top_k = [p.top_k if 0 < p.top_k < k else k for p in params]  # k = off
    both = [i for i, p in enumerate(params) if top_k[i] < k and p.top_p < 1.0]
    in_top_k = None
    if both:  # top-p renormalises within top-k: these rows need the top-k set's mass
        zk = _take(z, both)
        nth = torch.tensor([top_k[i] - 1 for i in both], device=device).unsqueeze(1)
        kth = zk.topk(max(top_k[i] for i in both), dim=-1).values.gather(1, nth)
        in_top_k = zk >= kth  # [len(both), K]
    w = z.exp_()  # [rows, K] in [0, 1], 1 at the peak
    if in_top_k is not None:
        wk = _take(w, both)
        wk.mul_(in_top_k)
        if wk is not w:
            w[both] = wk
    uniforms = [uniform(i, 0) for i in range(rows)]
    ok = finite[:, 0].tolist()
    todo = [i for i, p in enumerate(params) if (top_k[i] < k or p.top_p < 1.0) and ok[i]]
    if not todo:  # no cut: one exp, one cumsum, in place
        return _inverse_cdf(w, uniforms, in_place=True)[0]
    scratch = _scratch(w)
    cols, total = _inverse_cdf(torch.cumsum(w, dim=-1, out=scratch), uniforms, cumulative=True)
    # S = { j : #(w > w_j) < top_k  and  sum(w[w > w_j]) < top_p * sum(w) }
    limit = torch.tensor(top_k, dtype=torch.float32, device=device)  # k: no limit
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    goal = torch.where(top_p < 1.0, top_p * total, math.inf)
    for n in range(1, _REDRAWS + 1):
        wt = _take(w, todo)
        wx = wt.gather(1, cols[todo].unsqueeze(1))  # weight of each row's draw: [len(todo), 1]
        # mass of the likelier tokens = sum(relu(w - wx)) + wx * #(w > wx)
        excess = torch.sub(wt, wx, out=scratch[: len(todo)]).clamp_min_(0.0)
        mass = excess.sum(dim=-1)
        count = excess.sign_().sum(dim=-1)
        out = (count >= limit[todo]) | (mass + wx[:, 0] * count >= goal[todo])
        keep = [j for j, r in enumerate(out.tolist()) if r]
        todo = [todo[j] for j in keep]
        if not todo:
            return cols
        wt = w[todo]
        redraw = wt.mul_(wt > wx[keep])  # S lies strictly above every rejected draw
        cols[todo], _ = _inverse_cdf(redraw, [uniform(i, n) for i in todo], in_place=True)
    # Still unverified after many redraws (vanishingly rare): cut S exactly with a sort.
    wt = w[todo]
    ordered = wt.sort(dim=-1, descending=True).values
    by_mass = torch.searchsorted(ordered.cumsum(dim=-1), goal[todo].unsqueeze(1))
    last = torch.minimum(by_mass, (limit[todo].long() - 1).unsqueeze(1)).clamp_max_(k - 1)
    exact = wt.mul_(wt >= ordered.gather(1, last))
    cols[todo], _ = _inverse_cdf(exact, [uniform(i, _REDRAWS + 1) for i in todo], True)
    return cols


_local = threading.local()


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like `like`, reused by this thread's later calls (it
    keeps the largest size asked for: 6 MiB for 32 rows of a 49k vocabulary)."""
    buf = getattr(_local, "scratch", None)
    same = buf is not None and (buf.device, buf.dtype) == (like.device, like.dtype)
    if not same or buf.numel() < like.numel():
        buf = _local.scratch = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buf[: like.numel()].view(like.shape)


def _take(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows], without the copy when rows is every row in order."""
    return t if len(rows) == t.shape[0] and rows == list(range(t.shape[0])) else t[rows]


def _inverse_cdf(
    w: torch.Tensor, u: list[float], in_place: bool = False, cumulative: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """First column whose cumulative weight reaches u * total, per row, and the totals.

    w: [rows, K] >= 0 with a positive total on finite rows (already its cumsum when
    `cumulative`); u: rows values in (0, 1] -> cols [rows] int64, total [rows]
    """
    c = w if cumulative else w.cumsum_(dim=-1) if in_place else w.cumsum(dim=-1)
    total = c[:, -1]
    target = torch.tensor(u, dtype=c.dtype, device=c.device) * total
    cols = torch.searchsorted(c, target.unsqueeze(1)).squeeze(1)
    return cols.clamp_max_(c.shape[1] - 1), total.clone()


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
