"""A counterfactual task for the CoLD experiment: addition in base 9.

Each item is `{"question": "57 + 38", "answer": "106", "decimal": "95"}`: two base-9
numbers of 2–3 digits whose sum needs at least one carry. A language model's prior for
"57 + 38" is the decimal sum (95), and on these items that prior is always wrong: with no
column summing to 9 or more, base 9 and base 10 agree, and the lowest column that does
(≥ 9) writes a different digit in the two bases. `decimal` keeps the prior's answer, so a
run can measure how often the base model gives it (strong) rather than the base-9 answer.

Splits are seeded and never share an unordered pair of operands (so `38 + 57` in train
cannot give away `57 + 38` in test):

    from cold_ray.eval.base9 import make_splits, TASK
    splits = make_splits({"train": 3200, "dev": 150, "test": 300})
    TASK.prompt(splits["test"][0]["question"])   # what the model sees
"""

from __future__ import annotations

import random
import re

from cold_ray.eval.harness import Task

BASE = 9
SEED = 20251207


def to_base(value: int, base: int = BASE) -> str:
    if value < 0:
        raise ValueError(f"value must be >= 0, got {value}")
    digits = ""
    while True:
        value, d = divmod(value, base)
        digits = str(d) + digits
        if value == 0:
            return digits


def from_base(text: str, base: int = BASE) -> int:
    return int(text, base)


def has_carry(a: str, b: str, base: int = BASE) -> bool:
    """True when some column of a + b sums to `base` or more (then base 9 ≠ base 10)."""
    a, b = a.zfill(len(b)), b.zfill(len(a))
    return any(int(x) + int(y) >= base for x, y in zip(a, b))


def prompt(question: str) -> str:
    """The convention stated in the prompt itself: the base model is told, and still errs."""
    return f"In base 9 (digits 0-8): {question} ="


_FIRST_NUMBER = re.compile(r"-?\d+")


def first_number(text: str) -> str | None:
    """The first run of digits of the text (the answer comes first; what follows is noise)."""
    m = _FIRST_NUMBER.search(text)
    return m.group(0) if m else None


TASK = Task("base9", prompt, first_number, stop=("\n",), max_tokens=8)


def _operand(rng: random.Random) -> str:
    digits = rng.choice((2, 3))
    return to_base(rng.randint(BASE ** (digits - 1), BASE**digits - 1))


def item(a: str, b: str) -> dict:
    total = to_base(from_base(a) + from_base(b))
    return {"question": f"{a} + {b}", "answer": total, "decimal": str(int(a) + int(b))}


def make_splits(sizes: dict[str, int], seed: int = SEED) -> dict[str, list[dict]]:
    """Disjoint splits drawn in the order given from one seeded stream: an unordered pair of
    operands lands in at most one split, and only pairs with a carry are kept."""
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    rng = random.Random(seed)
    seen: set[frozenset[str]] = set()
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        rows: list[dict] = []
        while len(rows) < n:
            a, b = _operand(rng), _operand(rng)
            key = frozenset((a, b))
            if key in seen or not has_carry(a, b):
                continue
            seen.add(key)
            rows.append(item(a, b))
        out[split] = rows
    return out
