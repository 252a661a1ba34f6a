"""Small, dependency-free statistics for accuracy comparisons.

- `wilson_ci(k, n)`: Wilson score interval for one accuracy.
- `mcnemar_exact(b, c)`: exact two-sided McNemar test on the discordant pairs of a paired
  comparison (equivalently a sign test: under H0 each discordant item is a fair coin).
- `paired_comparison(a, b)`: the whole paired summary of two modes on the same items, with a
  paired-bootstrap interval for the accuracy difference.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass


def wilson_ci(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (0, 1) when n = 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic, no overflow)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (1.0 when b + c = 0)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * binom_cdf_half(min(b, c), n))


@dataclass(frozen=True)
class PairedResult:
    """Mode B against mode A on the same n items."""

    n: int
    both_correct: int
    only_a: int  # A right, B wrong
    only_b: int  # B right, A wrong
    neither: int
    delta: float  # accuracy(B) - accuracy(A)
    delta_ci: tuple[float, float]  # paired bootstrap, 95%
    p_value: float  # exact McNemar, two-sided

    def to_dict(self) -> dict:
        d = asdict(self)
        d["delta_ci"] = list(self.delta_ci)
        return d


def paired_bootstrap_ci(
    diffs: list[int], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of per-item differences (each -1, 0 or +1)."""
    n = len(diffs)
    if n == 0:
        return (0.0, 0.0)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (lo, hi)


def paired_comparison(a: list[bool], b: list[bool], seed: int = 0) -> PairedResult:
    """Compare per-item correctness of two modes on the same items (same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same items: {len(a)} vs {len(b)}")
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = len(a)
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    return PairedResult(
        n=n,
        both_correct=both,
        only_a=only_a,
        only_b=only_b,
        neither=n - both - only_a - only_b,
        delta=(only_b - only_a) / n if n else 0.0,
        delta_ci=paired_bootstrap_ci(diffs, seed=seed),
        p_value=mcnemar_exact(only_a, only_b),
    )
