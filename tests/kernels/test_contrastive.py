"""The dispatched contrastive step equals reference.contrastive_greedy (docs/design.md §1), and the
candidate-restricted amateur head picks the same tokens as the full one."""

from __future__ import annotations

import math

import pytest
import torch

from cold_ray.kernels import reference, select_backend
from tests.kernels.kernel_checks import make_cold_case

# (rows, V, H): V=1 and odd V included; rows up to 32.
CASES = [(1, 1, 8), (1, 7, 5), (4, 1000, 48), (9, 4099, 33), (32, 500, 16), (3, 49152, 16)]


@pytest.fixture(params=["reference", "grouped"])
def backend(request):
    return select_backend(request.param)


def _cases():
    for n, (rows, vocab, hidden) in enumerate(CASES):
        yield f"rows={rows} V={vocab} H={hidden}", make_cold_case(rows, vocab, hidden, seed=n)


def test_full_equals_reference_greedy(backend) -> None:
    for what, c in _cases():
        want = reference.contrastive_greedy(c.expert, c.amateur, c.alpha, c.beta)
        step = backend.contrastive_full(c.expert, c.amateur, c.alpha, c.beta)
        assert step.tokens.tolist() == want.tolist(), what
        assert (
            backend.contrastive_greedy(c.expert, c.amateur, c.alpha, c.beta).tolist()
            == want.tolist()
        )


def test_restricted_amateur_gives_the_same_tokens_as_full(backend) -> None:
    for what, c in _cases():
        full = reference.contrastive_greedy(c.expert, c.amateur, c.alpha, c.beta)
        step = backend.contrastive_restricted(c.expert, c.hidden, c.lm_head, c.alpha, c.beta)
        assert step.tokens.tolist() == full.tolist(), what
        # Scores at the candidates equal the full scores at those ids; padding is -inf.
        full_scores = backend.contrastive_full(
            c.expert, c.amateur, c.alpha, c.beta, with_scores=True
        ).scores
        want = full_scores.gather(1, step.ids)
        real = torch.isfinite(step.scores)
        torch.testing.assert_close(step.scores[real], want[real], rtol=1e-5, atol=1e-4)
        assert torch.isinf(want[~real]).all(), what


def test_scores_are_masked_on_expert_logits(backend) -> None:
    c = make_cold_case(5, 300, 16, seed=7)
    step = backend.contrastive_full(c.expert, c.amateur, c.alpha, c.beta, with_scores=True)
    e = c.expert
    valid = e >= e.max(-1, keepdim=True).values + torch.log(c.alpha).unsqueeze(-1)
    b = c.beta.unsqueeze(-1)
    want = torch.where(valid, (1 + b) * e - b * c.amateur, -math.inf)
    assert torch.equal(step.scores, want)


def test_test_data_is_not_vacuous() -> None:
    """CoLD must change some tokens versus expert-greedy, or the tests above prove little."""
    changed = 0
    for _, c in _cases():
        cold = reference.contrastive_greedy(c.expert, c.amateur, c.alpha, c.beta)
        changed += int((cold != c.expert.argmax(-1)).sum())
    assert changed >= 8


def test_beta_zero_and_alpha_one_reduce_to_expert_greedy(backend) -> None:
    c = make_cold_case(6, 2000, 24, seed=3)
    greedy = c.expert.argmax(-1).tolist()
    zero, one = torch.zeros(6), torch.ones(6)
    assert backend.contrastive_full(c.expert, c.amateur, c.alpha, zero).tokens.tolist() == greedy
    assert backend.contrastive_full(c.expert, c.amateur, one, c.beta).tokens.tolist() == greedy
    r = backend.contrastive_restricted(c.expert, c.hidden, c.lm_head, one, c.beta)
    assert r.tokens.tolist() == greedy


def test_exact_ties_pick_the_lowest_token_id(backend) -> None:
    vocab, hidden = 20, 4
    expert = torch.zeros(2, vocab)
    expert[:, [13, 5, 9]] = 3.0  # three tied maxima
    lm_head = torch.zeros(vocab, hidden)
    h = torch.ones(2, hidden)
    alpha, beta = torch.full((2,), 0.5), torch.full((2,), 0.5)
    full = backend.contrastive_full(expert, h @ lm_head.T, alpha, beta).tokens
    restricted = backend.contrastive_restricted(expert, h, lm_head, alpha, beta).tokens
    assert full.tolist() == [5, 5] and restricted.tolist() == [5, 5]


def test_fast_candidates_equal_the_reference() -> None:
    from cold_ray.kernels.contrastive import plausible_candidates

    for _, c in _cases():
        ids, mask = plausible_candidates(c.expert, c.alpha)
        ref_ids, ref_mask = reference.plausible_candidates(c.expert, c.alpha)
        assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


def test_flat_distribution_many_candidates(backend) -> None:
    """alpha ~ 0 makes every token plausible: the restricted step falls back to the full head
    (the gather would be larger than it) and still matches."""
    c = make_cold_case(3, 300, 16, seed=11)
    alpha = torch.full((3,), 1e-30)
    full = reference.contrastive_greedy(c.expert, c.amateur, alpha, c.beta)
    step = backend.contrastive_restricted(c.expert, c.hidden, c.lm_head, alpha, c.beta)
    assert step.ids.shape == (3, 300)
    assert step.tokens.tolist() == full.tolist()


def test_alpha_below_fp32_makes_every_finite_token_plausible(backend) -> None:
    """alpha = 1e-300 rounds to 0 in fp32 (ln = -inf): every finite logit is plausible, an
    -inf logit is not, and a +inf logit cannot make the threshold NaN."""
    from cold_ray.kernels.contrastive import plausible_candidates

    c = make_cold_case(3, 300, 16, seed=12)
    alpha = torch.full((3,), 1e-300)
    assert alpha[0] == 0.0  # the case under test: fp32 underflow
    step = backend.contrastive_restricted(c.expert, c.hidden, c.lm_head, alpha, c.beta)
    assert step.ids.shape == (3, 300) and torch.isfinite(step.scores).all()
    tiny = reference.contrastive_greedy(c.expert, c.amateur, torch.full((3,), 1e-30), c.beta)
    assert step.tokens.tolist() == tiny.tolist()  # any alpha below e^-(logit range): same set
    full = backend.contrastive_full(c.expert, c.amateur, alpha, c.beta, with_scores=True)
    assert torch.isfinite(full.scores).all() and torch.equal(full.tokens, step.tokens)

    e = c.expert.clone()
    e[0, 5] = -math.inf
    e[1, 7] = math.inf
    ids, mask = plausible_candidates(e, alpha)
    ref_ids, ref_mask = reference.plausible_candidates(e, alpha)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    counts = mask.sum(-1).tolist()
    assert counts == [299, 1, 300]
    assert 5 not in ids[0][mask[0]].tolist() and ids[1, 0] == 7


def test_nan_logits_give_no_candidates_not_an_error(backend) -> None:
    """A row whose expert logits are NaN has no plausible token (all -inf scores, K >= 1);
    the other rows decode exactly as without it."""
    c = make_cold_case(4, 500, 16, seed=13)
    want = backend.contrastive_restricted(c.expert, c.hidden, c.lm_head, c.alpha, c.beta).tokens
    e = c.expert.clone()
    e[2] = math.nan
    step = backend.contrastive_restricted(e, c.hidden, c.lm_head, c.alpha, c.beta)
    assert torch.isneginf(step.scores[2]).all()
    keep = [0, 1, 3]
    assert step.tokens[keep].tolist() == want[keep].tolist()
    every = torch.full_like(c.expert, math.nan)  # no row has a candidate: K is still 1
    step = backend.contrastive_restricted(every, c.hidden, c.lm_head, c.alpha, c.beta)
    assert step.ids.shape == (4, 1) and torch.isneginf(step.scores).all()
