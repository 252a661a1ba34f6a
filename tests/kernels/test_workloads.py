"""The shared adapter-mix generator (cold_ray.benchmarks.workloads) used by tests, benchmarks, Locust."""

from __future__ import annotations

from collections import Counter

import pytest

from cold_ray.benchmarks.workloads import MIX_KINDS, adapter_mix


@pytest.mark.parametrize("kind", MIX_KINDS)
def test_shape_range_and_determinism(kind: str) -> None:
    mix = adapter_mix(kind, 37, 6, seed=4)
    assert len(mix) == 37 and all(isinstance(k, int) for k in mix)
    assert all(-1 <= k < 6 for k in mix)
    assert mix == adapter_mix(kind, 37, 6, seed=4)
    assert adapter_mix(kind, 0, 6) == []


def test_kinds() -> None:
    assert adapter_mix("all_base", 5, 3) == [-1] * 5
    assert len(set(adapter_mix("identical", 9, 8, seed=1))) == 1
    assert adapter_mix("distinct", 5, 8) == [0, 1, 2, 3, 4]
    assert adapter_mix("distinct", 5, 3) == [0, 1, 2, 0, 1]
    inter = adapter_mix("interleaved_base", 9, 4, seed=2)
    assert inter[1::2] == [-1] * 4 and all(k >= 0 for k in inter[::2])
    assert len(set(adapter_mix("uniform", 200, 8, seed=3))) == 8
    counts = Counter(adapter_mix("zipf", 2000, 8, seed=5))
    assert counts[0] > counts[1] > counts[7] > 0


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown adapter mix 'skewed'"):
        adapter_mix("skewed", 4, 2)
    with pytest.raises(ValueError, match="num_adapters >= 1, got 0"):
        adapter_mix("uniform", 4, 0)
    with pytest.raises(ValueError, match="rows must be >= 0, got -1"):
        adapter_mix("uniform", -1, 2)
