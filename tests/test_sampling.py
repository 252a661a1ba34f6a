"""The sampler draws from the exact softmax/top-k/top-p distribution, reproducibly and batch
invariantly, on any device, and hostile values fail or degrade only their own row."""

from __future__ import annotations

import math

import pytest
import torch

from cold_ray.decoding import ColdParams, SamplingParams
from cold_ray.engine.sampling import (
    FAILED,
    SeedState,
    cold_select,
    new_sampler_state,
    sample_rows,
)
from cold_ray.kernels import select_backend
from tests.kernels.kernel_checks import make_cold_case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N_DRAWS = 40_000
# Total-variation bound between empirical and exact distributions over <= 8 tokens: the
# expected TV at 40k draws is ~0.006; 0.02 is > 5 standard errors away from it.
TV_BOUND = 0.02
# Chi-square bound: the 0.9999 quantile for 7 degrees of freedom (29.9); looser for fewer.
CHI2_BOUND = 30.0


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def exact_probs(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampling row must follow, in float64 with a full sort.

    softmax(scores / T); top-k keeps tokens >= the k-th largest; top-p keeps the smallest set
    of most likely tokens whose renormalised mass reaches top_p (ties with its last kept).
    """
    z = scores.double() / p.temperature
    keep = torch.isfinite(z)
    if 0 < p.top_k < z.numel():
        keep &= z >= z.sort(descending=True).values[p.top_k - 1]
    probs = torch.where(keep, torch.softmax(z.masked_fill(~keep, -math.inf), 0), 0.0)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        last = int((sorted_p.cumsum(0) < p.top_p).sum())  # first index reaching top_p
        keep &= probs >= sorted_p[last]
        probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


def draw_many(scores_row: torch.Tensor, p: SamplingParams, n: int, device, steps=None):
    """n draws of one row: n rows in one batch, each its own seed (or one seed, n steps)."""
    scores = scores_row.to(device).expand(n, -1).contiguous()
    if steps is None:
        rngs, steps = [SeedState(s) for s in range(n)], [0] * n
    else:
        rngs = [SeedState(7)] * n
    return torch.tensor(sample_rows(scores, None, [p] * n, rngs, steps))


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    freq = counts / counts.sum()
    assert (counts[probs == 0] == 0).all(), f"{what}: drew a token of probability 0"
    tv = 0.5 * (freq - probs).abs().sum().item()
    live = probs > 0
    expected = probs[live] * counts.sum()
    chi2 = ((counts[live] - expected) ** 2 / expected).sum().item()
    assert tv < TV_BOUND and chi2 < CHI2_BOUND, f"{what}: TV {tv:.4f}, chi2 {chi2:.1f}"


ROW = torch.tensor([2.0, 1.5, 0.3, -math.inf, 1.0, -0.7, 0.9, -2.0])
PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=1.5, top_k=5, top_p=0.8),
    SamplingParams(temperature=1e30),  # uniform over the finite tokens
    SamplingParams(temperature=1e300),  # beyond fp32: the same
]


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_draws_follow_the_exact_distribution(p, device):
    tokens = draw_many(ROW, p, N_DRAWS, device)
    assert_follows(tokens, exact_probs(ROW, p), f"{p} across seeds")


def test_one_seed_over_many_steps_follows_the_distribution(device):
    p = SamplingParams(temperature=0.8, top_p=0.9)
    tokens = draw_many(ROW, p, N_DRAWS, device, steps=list(range(N_DRAWS)))
    assert_follows(tokens, exact_probs(ROW, p), "one seed, consecutive steps")


def test_top_p_over_a_wide_flat_row_follows_the_exact_distribution(device):
    """Rows whose top-p set holds hundreds or thousands of tokens (where a draw is often
    rejected and redrawn): nothing outside the set is drawn, and mass within it is right."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(4, 5000, generator=g) * torch.tensor([0.3, 1.0, 2.0, 4.0])[:, None]
    for row, q in zip(rows, (0.95, 0.5, 0.9, 0.2)):
        p = SamplingParams(temperature=1.0, top_p=q)
        probs = exact_probs(row, p)
        tokens = draw_many(row, p, 20_000, device)
        assert (probs[tokens] > 0).all(), f"{p}: drew a token outside the top-p set"
        # group the set into 8 bins of equal mass (by rank) and compare bin frequencies
        order = probs.argsort(descending=True)
        bin_of = torch.empty(5000, dtype=torch.long)
        bin_of[order] = (probs[order].cumsum(0) * 8).clamp(max=7.999).long()
        binned = torch.zeros(8, dtype=torch.float64).index_add_(0, bin_of, probs)
        assert_follows(bin_of[tokens], binned, f"{p} binned")


@pytest.mark.parametrize("rounds", [0, 1])
def test_exact_cut_after_the_redraws_follows_the_distribution(rounds, device, monkeypatch):
    """The sort that ends a long run of rejected draws keeps the same distribution."""
    import cold_ray.engine.sampling as sampling

    monkeypatch.setattr(sampling, "_REDRAWS", rounds)
    g = torch.Generator().manual_seed(9)
    row = torch.randn(300, generator=g) * 2
    for p in (
        SamplingParams(top_p=0.3),
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=7),
        SamplingParams(top_k=40, top_p=0.8, temperature=0.7),
    ):
        probs = exact_probs(row, p)
        tokens = draw_many(row, p, 20_000, device)
        order = probs.argsort(descending=True)
        bin_of = torch.empty(300, dtype=torch.long)
        bin_of[order] = (probs[order].cumsum(0) * 8).clamp(max=7.999).long()
        binned = torch.zeros(8, dtype=torch.float64).index_add_(0, bin_of, probs)
        assert (probs[tokens] > 0).all()
        assert_follows(bin_of[tokens], binned, f"{p}, {rounds} redraws")


def test_greedy_rows_take_the_argmax_and_hostile_values_stay_finite(device):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 300, generator=g).to(device)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1e-40),  # below GREEDY_TEMPERATURE: greedy
        SamplingParams(temperature=1.0, top_p=1e-12),  # keeps only the top token
        SamplingParams(temperature=1e-5, top_k=1),  # smallest sampling temperature
        SamplingParams(temperature=100.0, top_k=1),
        SamplingParams(temperature=3.0, top_k=1, top_p=0.5),
    ]
    assert params[1].greedy and not params[3].greedy
    rngs = [new_sampler_state(p) for p in params]
    got = sample_rows(scores, None, params, rngs, [0] * 6)
    assert got == scores.argmax(-1).tolist()
    # large logits at small temperatures: exp must never see a positive exponent
    big = scores * 1e4
    params = [SamplingParams(temperature=t) for t in (1e-5, 1e-3, 0.5, 1.0, 2.0, 1e30)]
    got = sample_rows(big, None, params, [SeedState(i) for i in range(6)], [0] * 6)
    assert got[:5] == big.argmax(-1).tolist()[:5] and FAILED not in got


def test_top_k_beyond_the_vocabulary_is_off(device):
    scores = ROW.to(device).expand(500, -1).contiguous()
    rngs, steps = [SeedState(s) for s in range(500)], [3] * 500
    off = sample_rows(scores, None, [SamplingParams(top_k=0)] * 500, rngs, steps)
    huge = sample_rows(scores, None, [SamplingParams(top_k=10**9)] * 500, rngs, steps)
    assert off == huge and len(set(off)) > 3


def test_rows_without_a_finite_score_fail_alone(device):
    g = torch.Generator().manual_seed(2)
    good = torch.randn(4, 50, generator=g)
    params = [
        SamplingParams(temperature=t, top_p=q) for t, q in ((1, 1), (0, 1), (2, 0.9), (0.7, 0.5))
    ]
    rngs = [SeedState(100 + i) for i in range(4)]
    alone = sample_rows(good.to(device), None, params, rngs, [5] * 4)
    bad_rows = torch.full((5, 50), -math.inf)
    bad_rows[1] = math.nan
    bad_rows[2, 3] = math.nan  # one NaN poisons its row
    bad_rows[3, 7] = math.inf
    bad_rows[4] = torch.randn(50, generator=g)
    bad_rows[4, 9] = math.nan
    scores = torch.cat([bad_rows[:2], good[:2], bad_rows[2:], good[2:]]).to(device)
    p_bad = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.2),
        SamplingParams(temperature=1e30),
    ]
    mixed_params = p_bad[:2] + params[:2] + p_bad[2:] + params[2:]
    mixed_rngs = [SeedState(1)] * 2 + rngs[:2] + [SeedState(2)] * 3 + rngs[2:]
    got = sample_rows(scores, None, mixed_params, mixed_rngs, [5] * 9)
    assert got[:2] == [FAILED, FAILED] and got[4:7] == [FAILED] * 3
    assert got[2:4] + got[7:] == alone, "a failing row changed its neighbours' tokens"


def test_seeded_draws_reproduce_and_do_not_depend_on_the_batch(device):
    """A seeded row's tokens are a function of its scores, params, seed and step only."""
    g = torch.Generator().manual_seed(3)
    target = torch.randn(1000, generator=g) * 3
    mine = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=42)
    want = [
        sample_rows(target[None].to(device), None, [mine], [new_sampler_state(mine)], [s])[0]
        for s in range(20)
    ]
    assert len(set(want)) > 5
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.3),
        SamplingParams(temperature=5.0, top_k=2),
        SamplingParams(),
    ]
    for trial in range(10):
        n = int(torch.randint(1, 9, (1,), generator=g))
        scores = torch.randn(n + 1, 1000, generator=g) * 3
        if trial % 3 == 0:
            scores[0] = math.nan  # a failing neighbour too
        at = int(torch.randint(0, n + 1, (1,), generator=g))
        order = list(range(1, n + 1))
        order.insert(at, 0)
        scores[0] = target
        params = [mine] + [others[i % 4] for i in range(n)]
        rngs = [SeedState(42)] + [
            SeedState(int(s)) for s in torch.randint(0, 99, (n,), generator=g)
        ]
        perm = torch.tensor(order)
        for step in range(20):
            got = sample_rows(
                scores[perm].to(device),
                None,
                [params[i] for i in order],
                [rngs[i] for i in order],
                [step] * (n + 1),
            )
            assert got[at] == want[step], f"trial {trial}: row {at} of {n + 1}, step {step}"


def test_seed_state_is_pinned_and_uniform():
    """The same seed gives the same stream in every release: pinned values, in (0, 1]."""
    s = SeedState(0)
    assert [s.uniform(i) for i in range(3)] == [s.uniform(i) for i in range(3)]
    assert s.uniform(0) == 0.883310854434967
    assert [SeedState(42).uniform(i) for i in range(3)] == [
        0.5961189270019531,
        0.16036540269851685,
        0.1663978099822998,
    ]
    assert SeedState(2**80 + 5).uniform(1) != SeedState(5).uniform(1)  # wide seeds fold, not cut
    assert s.uniform(0, draw=1) != s.uniform(0) and s.uniform(0, draw=1) != s.uniform(1)
    with pytest.raises(ValueError, match="seed must be"):
        SeedState(-1)
    us = torch.tensor([SeedState(seed).uniform(step) for seed in range(200) for step in range(100)])
    assert (us > 0).all() and (us <= 1).all()
    assert abs(us.mean().item() - 0.5) < 0.01 and abs(us.var().item() - 1 / 12) < 0.005
    hist = torch.histc(us, bins=20, min=0, max=1) / us.numel()
    assert (hist - 0.05).abs().max() < 0.006


def test_unseeded_requests_get_distinct_states_and_greedy_none():
    assert new_sampler_state(SamplingParams(temperature=0.0)) is None
    assert new_sampler_state(SamplingParams(seed=9)) == SeedState(9)
    a, b = new_sampler_state(SamplingParams()), new_sampler_state(SamplingParams())
    assert a.seed != b.seed


def test_a_cpu_generator_drives_rows_on_any_device(device):
    """A torch.Generator on the host also works: it supplies the row's uniform, so the
    scores' device never meets it."""
    scores = ROW.to(device).expand(2, -1).contiguous()
    p = [SamplingParams(temperature=1.0)] * 2
    runs = [
        sample_rows(scores, None, p, [torch.Generator().manual_seed(s) for s in (1, 2)])
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="needs the index of the token"):
        sample_rows(scores, None, p, [SeedState(1)] * 2)


def test_cold_select_greedy_is_the_kernel_token_and_sampling_stays_plausible(device):
    backend = select_backend("grouped", device)
    c = make_cold_case(6, 2000, 24, seed=4)
    expert, hidden, head = c.expert.to(device), c.hidden.to(device), c.lm_head.to(device)
    cold = [ColdParams(float(a), float(b)) for a, b in zip(c.alpha, c.beta)]
    greedy = [SamplingParams(temperature=0.0)] * 6
    want = backend.contrastive_restricted(
        expert, hidden, head, c.alpha.to(device), c.beta.to(device)
    )
    got = cold_select(backend, head, expert, hidden, cold, greedy, [None] * 6)
    assert got == want.tokens.tolist()
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, seed=1)] * 3
    rngs = [new_sampler_state(p) for p in mixed]
    draws = [
        cold_select(backend, head, expert, hidden, cold, mixed, rngs, [s] * 6) for s in range(30)
    ]
    for i in range(6):
        tokens = {d[i] for d in draws}
        plausible = set(want.ids[i][torch.isfinite(want.scores[i])].tolist())
        assert tokens <= plausible, f"pair {i} drew an implausible token"
        if mixed[i].greedy:
            assert tokens == {want.tokens[i].item()}


def test_cold_select_with_hostile_alpha_and_nan_pairs(device):
    backend = select_backend("grouped", device)
    c = make_cold_case(4, 500, 16, seed=6)
    expert, hidden, head = c.expert.to(device), c.hidden.to(device), c.lm_head.to(device)
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=3)] * 2
    rngs = [new_sampler_state(p) for p in params]
    cold = [
        ColdParams(1e-300, 0.5),
        ColdParams(1e-300, 1.0),
        ColdParams(0.1, 0.5),
        ColdParams(0.5, 2.0),
    ]
    alone = cold_select(backend, head, expert, hidden, cold, params, rngs, [0] * 4)
    assert all(0 <= t < 500 for t in alone)
    poisoned = expert.clone()
    poisoned[1] = math.nan  # e.g. an adapter whose weights overflowed
    poisoned[2] = math.nan
    got = cold_select(backend, head, poisoned, hidden, cold, params, rngs, [0] * 4)
    assert got == [alone[0], FAILED, FAILED, alone[3]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws():
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(32, 49152, generator=g) * 4
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(),
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=40, temperature=0.7),
    ] * 8
    rngs = [new_sampler_state(p) if p.greedy else SeedState(i) for i, p in enumerate(params)]
    cpu = sample_rows(scores, None, params, rngs, [1] * 32)
    cuda = sample_rows(scores.cuda(), None, params, rngs, [1] * 32)
    # identical up to an fp32 rounding of the cumulative weights landing on a draw's boundary
    assert sum(a != b for a, b in zip(cpu, cuda)) <= 1


def test_the_callers_scores_are_left_untouched(device):
    g = torch.Generator().manual_seed(10)
    scores = torch.randn(5, 400, generator=g).to(device)
    before = scores.clone()
    for params in (
        [SamplingParams(top_p=0.5, top_k=20)] * 5,  # every row sampled
        [SamplingParams(temperature=0.0), SamplingParams(top_p=0.5)] * 2 + [SamplingParams()],
    ):
        sample_rows(scores, None, params, [SeedState(1)] * 5, [0] * 5)
        assert torch.equal(scores, before)
