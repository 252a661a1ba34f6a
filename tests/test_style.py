"""The formatter and linter own the layout: the tree is as `ruff format` writes it, `ruff check`
finds nothing, and no line opts out of the formatter."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or pytest.fail("ruff is in the test extra; install .[test]")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_the_tree_is_formatted_and_lint_free():
    formatted = _ruff("format", "--check", ".")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    linted = _ruff("check", ".")
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_no_line_opts_out_of_the_formatter():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    marker = "fmt: " + "skip"  # written in two parts so that this file does not match itself
    hits = [f for f in tracked if marker in (ROOT / f).read_text(encoding="utf-8")]
    assert not hits, f"{marker!r} in {hits}"
