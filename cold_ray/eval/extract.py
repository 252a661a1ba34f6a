"""Answer extraction: turn a model's text (or a gold answer) into a comparable answer string.

An extractor is any `Callable[[str], str | None]`; `None` means "no answer found" and always
counts as wrong. Built-ins:

- `gsm8k`:  the number after the first `#### ` (GSM8K convention), else the last number in
            the text; numbers are normalised (`1,000` → `1000`, `18.00` → `18`, `$5` → `5`).
- `last_number`: the last number, ignoring any `####` marker.
- `choice`: a multiple-choice letter A–J: `Answer: C`, `the answer is (C)`, a leading `C.` /
            `(C)` / lone `C`, else a lone `(C)` anywhere.

A user's own extractor is named as `package.module:function` (see `get_extractor`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

Extractor = Callable[[str], str | None]

# A number with proper thousands grouping (1,234,567) or plain digits, optional decimals.
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUM_RE = re.compile(rf"(?<![\w.])\$?({_NUM})")
_HASH_RE = re.compile(rf"####\s*\$?\s*({_NUM})")

_LETTERS = "ABCDEFGHIJ"
_CHOICE_PATTERNS = [
    # "Answer: C", "answer is (C)", "correct answer is C." — the most explicit forms first
    re.compile(rf"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*\(?([{_LETTERS}])\)?(?![A-Za-z])"),
    re.compile(rf"^\s*\(?([{_LETTERS}])(?:[.):]|\s*$)"),  # text starts with "C." "(C)" "C"
    re.compile(rf"\(([{_LETTERS}])\)"),  # "(C)" anywhere
]


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of a number, or None when `text` is not one."""
    try:
        value = Decimal(text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def last_number(text: str) -> str | None:
    matches = _NUM_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def gsm8k(text: str) -> str | None:
    """`#### N` when present (the first one), else the last number in the text."""
    m = _HASH_RE.search(text)
    if m is not None:
        return normalize_number(m.group(1))
    return last_number(text)


def choice(text: str) -> str | None:
    """A multiple-choice letter, or None when the text names none clearly."""
    for pattern in _CHOICE_PATTERNS:
        m = pattern.search(text)
        if m is not None:
            return m.group(1).upper()
    return None


BUILTINS: dict[str, Extractor] = {"gsm8k": gsm8k, "last_number": last_number, "choice": choice}


def get_extractor(name: str) -> Extractor:
    """A built-in by name, or `module:function` imported from the user's code."""
    if name in BUILTINS:
        return BUILTINS[name]
    if ":" not in name:
        raise ValueError(
            f"unknown extractor {name!r}: expected one of {sorted(BUILTINS)} "
            "or 'package.module:function'"
        )
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import extractor {name!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"extractor {name!r} is not callable")
    return fn


def guess_extractor(gold_answers: list[str]) -> str:
    """'choice' when every gold answer is a single letter A–J, else 'gsm8k'."""
    letters = [a.strip() for a in gold_answers]
    if letters and all(len(a) == 1 and a.upper() in _LETTERS for a in letters):
        return "choice"
    return "gsm8k"
