"""Answer extraction, the paired statistics, and the tuner's decision rule (no model needed)."""

import math
import random

import pytest

from cold_ray.eval import extract
from cold_ray.eval.stats import binom_cdf_half, mcnemar_exact, paired_comparison, wilson_ci
from cold_ray.eval.tune import decide


@pytest.mark.parametrize(
    "text,want",
    [
        ("3 + 5 = 8. 8 * 2 = 16.\n#### 16", "16"),
        ("#### 1,000", "1000"),
        ("####-7", "-7"),
        ("#### $18.00", "18"),
        ("#### 2.50 dollars", "2.5"),
        ("first 3 then #### 4 then #### 5", "4"),  # the first marker wins
        ("So she has 12 apples left.", "12"),  # no marker: the last number
        ("10-3=7.", "7"),
        ("It costs $1,234.50 in total", "1234.5"),
        ("#### \nbut the answer is 9", "9"),  # empty marker: fall back to the last number
        ("1,2,3", "3"),  # a list, not a thousands-grouped number
        ("", None),
        ("no digits at all", None),
        ("####", None),
        ("\x00`O\ufffd garbage", None),
    ],
)
def test_gsm8k_extraction(text, want):
    assert extract.gsm8k(text) == want


@pytest.mark.parametrize(
    "text,want",
    [
        ("Answer: C", "C"),
        ("The answer is (B).", "B"),
        ("the correct answer is D because", "D"),
        ("A. Planetary days", "A"),
        ("(C)", "C"),
        ("C", "C"),
        ("I think it is (D) for sure", "D"),
        ("A man walks into a bar", None),  # an article is not a choice
        ("Answer: Apple", None),
        ("answer is a dog", None),
        ("", None),
        ("42", None),
    ],
)
def test_choice_extraction(text, want):
    assert extract.choice(text) == want


def test_extractor_lookup_and_guess():
    assert extract.get_extractor("gsm8k") is extract.gsm8k
    assert extract.get_extractor("cold_ray.eval.extract:choice") is extract.choice
    with pytest.raises(ValueError, match="unknown extractor 'nope'"):
        extract.get_extractor("nope")
    with pytest.raises(ValueError, match="cannot import"):
        extract.get_extractor("cold_ray.eval.extract:missing")
    assert extract.guess_extractor(["A", "c", " D"]) == "choice"
    assert extract.guess_extractor(["A", "#### 4"]) == "gsm8k"
    assert extract.normalize_number("007") == "7" and extract.normalize_number("x") is None


def test_wilson_known_values():
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_ci(61, 300)
    assert (lo, hi) == (pytest.approx(0.1616, abs=1e-4), pytest.approx(0.2525, abs=1e-4))
    assert wilson_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_ci(5, 4)


def test_mcnemar_exact_known_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)  # symmetric
    assert mcnemar_exact(5, 5) == 1.0  # capped
    assert binom_cdf_half(3, 3) == 1.0 and binom_cdf_half(-1, 3) == 0.0
    # large n stays exact: no float overflow in 2**n
    assert 0 < mcnemar_exact(400, 600) < 1e-9
    assert math.isclose(binom_cdf_half(1000, 2000), 0.5 + math.comb(2000, 1000) / 2**2001)


def test_paired_comparison_counts():
    a = [True, True, False, False, True, False]
    b = [True, False, True, True, True, False]
    p = paired_comparison(a, b)
    assert (p.both_correct, p.only_a, p.only_b, p.neither) == (2, 1, 2, 1)
    assert p.delta == pytest.approx(1 / 6)
    assert p.p_value == mcnemar_exact(1, 2)
    assert p.delta_ci[0] <= p.delta <= p.delta_ci[1]
    with pytest.raises(ValueError, match="same items"):
        paired_comparison(a, b[:-1])


def _vec(n, k, rng):
    v = [True] * k + [False] * (n - k)
    rng.shuffle(v)
    return v


def test_decide_keeps_only_significant_gains():
    greedy = [True] * 30 + [False] * 70
    strong = [True] * 30 + [True] * 25 + [False] * 45  # +25 items, none lost
    weak = [True] * 30 + [True] * 3 + [False] * 67  # +3: not significant
    worse = [False] * 5 + [True] * 20 + [False] * 75
    d = decide(greedy, {(0.1, 0.5): strong, (0.1, 1.0): weak, (0.3, 0.5): worse})
    assert d.cold_enabled and (d.alpha, d.beta) == (0.1, 0.5)
    assert [(t["alpha"], t["beta"]) for t in d.tried][0] == (0.1, 0.5)
    assert "kept" in d.reason and len(d.tried) == 3

    d = decide(greedy, {(0.1, 1.0): weak, (0.3, 0.5): worse})
    assert not d.cold_enabled and d.alpha is None and d.beta is None
    assert "not significant" in d.reason

    d = decide(greedy, {(0.1, 0.5): greedy})  # a tie is not a gain
    assert not d.cold_enabled and "not better" in d.reason

    d = decide(greedy, {(0.1, 0.5): strong}, min_gain=0.3)
    assert not d.cold_enabled and "below the required" in d.reason


def test_decide_bonferroni_over_the_grid():
    # +8/-0 of 100: p = 2/256 = 0.0078 alone, but 0.0078 * 9 > 0.05 over a 9-point grid
    greedy = [False] * 100
    gain = [True] * 8 + [False] * 92
    assert decide(greedy, {(0.1, 0.5): gain}).cold_enabled
    grid = {
        (a, b): (gain if (a, b) == (0.1, 0.5) else greedy)
        for a in (0.05, 0.1, 0.3)
        for b in (0.1, 0.5, 1.0)
    }
    d = decide(greedy, grid)
    assert not d.cold_enabled and d.tried[0]["p_bonferroni"] == pytest.approx(9 * 2 / 256)


def test_decide_never_keeps_a_setting_worse_than_greedy():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(5, 60)
        greedy = _vec(n, rng.randint(0, n), rng)
        cands = {(0.1, b): _vec(n, rng.randint(0, n), rng) for b in (0.1, 0.5, 1.0)}
        d = decide(greedy, cands, level=0.2)
        if d.cold_enabled:
            chosen = cands[(d.alpha, d.beta)]
            assert sum(chosen) > sum(greedy)
            assert sum(chosen) == max(sum(c) for c in cands.values())
            assert mcnemar_exact(*_discordant(greedy, chosen)) * len(cands) < 0.2
        else:
            assert d.alpha is None and d.beta is None


def _discordant(a, b):
    return (sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b)))
