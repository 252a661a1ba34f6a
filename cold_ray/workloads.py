"""One generator of adapter mixes, shared by kernel tests, benchmarks and Locust scenarios.

`adapter_mix(kind, rows, num_adapters, seed)` returns a list of adapter slot numbers per row
(-1 = base model, no adapter), reproducible from the seed. Plain Python: no torch or numpy,
so a Locust process can import it cheaply.

Kinds (after punica's `get_lora_lens`, plus the two base-row patterns CoLD produces):
- identical:        every row uses one adapter (picked by the seed);
- distinct:         row i uses adapter i (cycling when rows > num_adapters);
- uniform:          each row draws an adapter uniformly;
- zipf:             each row draws adapter k with probability ~ 1 / (k + 1) ** zipf_s;
- all_base:         every row is -1;
- interleaved_base: CoLD pairs — even rows draw an adapter uniformly (expert), odd rows are -1
                    (amateur).
"""

from __future__ import annotations

import random

MIX_KINDS = ("identical", "distinct", "uniform", "zipf", "all_base", "interleaved_base")


def adapter_mix(
    kind: str, rows: int, num_adapters: int, seed: int = 0, *, zipf_s: float = 1.5
) -> list[int]:
    """Adapter slot per row for a mix `kind` (see module docstring); -1 = base model."""
    if kind not in MIX_KINDS:
        raise ValueError(f"unknown adapter mix {kind!r}; expected one of {list(MIX_KINDS)}")
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if kind == "all_base":
        return [-1] * rows
    if num_adapters < 1:
        raise ValueError(f"mix {kind!r} needs num_adapters >= 1, got {num_adapters}")
    rng = random.Random(seed)
    if kind == "identical":
        return [rng.randrange(num_adapters)] * rows
    if kind == "distinct":
        return [i % num_adapters for i in range(rows)]
    if kind == "uniform":
        return [rng.randrange(num_adapters) for _ in range(rows)]
    if kind == "zipf":
        weights = [1.0 / (k + 1) ** zipf_s for k in range(num_adapters)]
        return rng.choices(range(num_adapters), weights=weights, k=rows)
    return [rng.randrange(num_adapters) if i % 2 == 0 else -1 for i in range(rows)]
