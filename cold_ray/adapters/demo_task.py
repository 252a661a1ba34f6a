"""A seeded synthetic task for the demo adapter: multi-step arithmetic word problems.

Each item is `{"question": str, "answer": str}` where the answer is a short worked solution
ending in `#### N` (GSM8K convention). Splits are deterministic and disjoint by seed, so the
training script and the evaluation reuse exactly the same data:

    from cold_ray.adapters.demo_task import make_split, format_prompt, extract_answer
    items = make_split("test", 50)
    prompt = format_prompt(items[0]["question"])   # what the model sees
    target = items[0]["answer"]                      # what it should write after the prompt
    extract_answer(generated_text) == extract_answer(target)
"""

from __future__ import annotations

import random
import re

SPLITS = {"train": 1, "validation": 2, "test": 3}  # seed offsets: the splits never overlap
_SEED = 20240607

_NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dan",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Ivy",
    "Jack",
    "Lena",
    "Max",
    "Nora",
    "Omar",
    "Pia",
    "Sam",
    "Tara",
    "Theo",
    "Uma",
    "Zoe",
]
_ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "books",
    "coins",
    "stamps",
    "shells",
    "cards",
    "balloons",
    "eggs",
]

INSTRUCTION = (
    "Solve the math word problem step by step, then give the final answer on its own line "
    "as '#### <number>'."
)
_ANSWER_RE = re.compile(r"####\s*(-?[\d,]+)")


def format_prompt(question: str) -> str:
    """The prompt used for both training and evaluation; the answer follows it directly."""
    return f"{INSTRUCTION}\nQuestion: {question}\nAnswer:"


def extract_answer(text: str) -> int | None:
    """The integer after the first `####` in `text`, or None when there is none."""
    m = _ANSWER_RE.search(text)
    if m is None:
        return None
    try:
        return int(m.group(1).replace(",", ""))
    except ValueError:
        return None


def _problem(rng: random.Random) -> dict:
    """One problem of 2–3 steps over small numbers; every intermediate value stays >= 0.

    (A subtraction drawn when the value is 1 is skipped, so a few problems have one step
    fewer; kept as is because the committed demo adapter was trained on exactly this data.)"""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friend = rng.choice([n for n in _NAMES if n != name])
    value = rng.randint(3, 20)
    sentences = [f"{name} has {value} {item}."]
    work = []
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(["add", "sub", "mul", "give"] if value <= 30 else ["add", "sub", "give"])
        if op == "add":
            n = rng.randint(2, 15)
            sentences.append(
                rng.choice(
                    [
                        f"{name} buys {n} more {item}.",
                        f"{friend} gives {name} {n} {item}.",
                        f"{name} finds {n} more {item}.",
                    ]
                )
            )
            new, step = value + n, f"{value} + {n} = {value + n}"
        elif op == "mul":
            n = rng.randint(2, 4)
            times = {2: "doubles", 3: "triples", 4: "quadruples"}[n]
            sentences.append(f"Then {name} {times} the number of {item}.")
            new, step = value * n, f"{value} * {n} = {value * n}"
        else:
            if value < 2:
                continue
            n = rng.randint(1, min(value - 1, 12))
            sentences.append(
                f"{name} gives {n} {item} to {friend}."
                if op == "give"
                else rng.choice([f"{name} loses {n} {item}.", f"{name} uses {n} {item}."])
            )
            new, step = value - n, f"{value} - {n} = {value - n}"
        work.append(step)
        value = new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = " ".join(w + "." for w in work) + f"\n#### {value}"
    return {"question": question, "answer": answer}


def make_split(split: str, n: int, seed: int = _SEED) -> list[dict]:
    """`n` problems of `split` ('train', 'validation' or 'test'); the same every call."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed * 10 + SPLITS[split])
    return [_problem(rng) for _ in range(n)]
