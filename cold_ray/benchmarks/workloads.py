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

import functools
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


# ---- shared-prefix prompts ------------------------------------------------------------------
# Workloads whose requests share a long prompt prefix (what a prefix cache is for), built from
# the demo adapter's task so that the adapter has something to do: 8-shot prompts with one
# fixed set of worked examples, and chat with one long system prompt. Seeded, plain Python.

PREFIX_KINDS = ("fewshot", "chat")

SYSTEM_PROMPT = (
    "You are Abacus, a patient and careful mathematics tutor for students aged ten to sixteen. "
    "Your job is to help the student solve arithmetic word problems and to make every step of "
    "the reasoning visible, so that the student can check it and learn from it.\n"
    "Rules for every answer:\n"
    "1. Read the whole problem before you start. Identify the quantity the question asks for "
    "and every number that changes it, in the order in which the story tells them.\n"
    "2. Work one operation at a time. Write each step as a short equation, for example "
    "'12 + 5 = 17.', and keep a running total. Never skip a step, even an easy one.\n"
    "3. Use only whole numbers unless the problem itself contains fractions or decimals. If "
    "something is given away, lost or used, subtract it; if something is bought, found or "
    "received, add it; if an amount doubles or triples, multiply.\n"
    "4. After the last step, check that the answer is reasonable: a count of objects can never "
    "be negative, and it should not be larger than everything that was ever added.\n"
    "5. End with the final answer alone on its own line, written as '#### <number>' with no "
    "units, no words and no punctuation after the number.\n"
    "Style: be brief and friendly. Do not repeat the problem back to the student, do not add "
    "stories, jokes or unrelated facts, and do not explain what an addition or a subtraction "
    "is unless the student asks. If the problem is ambiguous, state the reading you chose in "
    "one sentence and solve it under that reading. If the problem cannot be solved with the "
    "information given, say exactly which number is missing instead of guessing one.\n"
    "Safety: never ask the student for personal information, and keep every example about "
    "everyday objects such as apples, books, coins, marbles or stickers."
)


@functools.lru_cache(maxsize=8)
def fewshot_prefix(shots: int = 8) -> str:
    """The shared head of every few-shot prompt: the demo task's instruction and `shots` worked
    examples from its train split (GSM8K style, answers ending in `#### N`)."""
    from cold_ray.adapters.demo_task import INSTRUCTION, make_split

    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    examples = make_split("train", shots)
    return (
        INSTRUCTION
        + "\n"
        + "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
    )


@functools.lru_cache(maxsize=2)
def question_pool(size: int = 1000) -> tuple[str, ...]:
    """Questions that follow the shared prefix: the demo task's test split, never its train."""
    from cold_ray.adapters.demo_task import make_split

    return tuple(item["question"] for item in make_split("test", size))


def shared_prefix_request(kind: str, question: str, prefix: str) -> dict:
    """One request body of a shared-prefix workload: `{"prompt": str}` for `fewshot` (prefix +
    question), `{"messages": [...]}` for `chat` (system prompt `prefix` + the question)."""
    if kind == "fewshot":
        return {"prompt": f"{prefix}Question: {question}\nAnswer:"}
    if kind == "chat":
        return {
            "messages": [
                {"role": "system", "content": prefix},
                {"role": "user", "content": question},
            ]
        }
    raise ValueError(f"unknown shared-prefix workload {kind!r}; expected one of {PREFIX_KINDS}")


def shared_prefix_requests(kind: str, n: int, seed: int = 0, shots: int = 8) -> list[dict]:
    """`n` request bodies of workload `kind`, all with one shared prefix and distinct
    questions drawn (without replacement) from the test split by `seed`."""
    if n < 0 or n > 1000:
        raise ValueError(f"n must be between 0 and 1000, got {n}")
    prefix = fewshot_prefix(shots) if kind == "fewshot" else SYSTEM_PROMPT
    questions = random.Random(seed).sample(question_pool(), n)
    return [shared_prefix_request(kind, q, prefix) for q in questions]
