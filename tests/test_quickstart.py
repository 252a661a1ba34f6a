"""The README's two commands (run, test) are what CI runs: `.ci/run` reads them out of the
README, installs with the lock CI tested, serves from the run command's install before the
test extra exists, and also serves from the newest resolution (the same command, unlocked)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def _ci_reads(stage: str) -> str:
    """What `.ci/run`'s own extraction gives (the function it runs, not a copy of it)."""
    script = (ROOT / ".ci" / "run").read_text()
    start = script.index("readme_command() {")
    body = script[start : script.index("\n}\n", start) + 3]
    out = subprocess.run(
        ["bash", "-c", f"{body}\nreadme_command {stage}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_ci_runs_the_readme_commands_verbatim():
    run, test = _quick_start_commands()[:2]
    assert _ci_reads("run") == run and _ci_reads("test") == test
    assert run.endswith(" && serve run deployments/cold.yaml") and ".[test]" not in run
    assert " -c constraints.txt -e . " in run and ' -c constraints.txt -e ".[test]"' in test
    # torch first, alone: nothing may resolve another torch build before it
    assert run.index("pip install torch==2.13.0") < run.index("constraints.txt")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "for stage in run newest wheel test; do" in ci  # `.ci/run` alone runs all four
    assert all(f"stage_{stage}() {{" in ci for stage in ("run", "newest", "wheel", "test"))


def test_the_lock_pins_what_ci_tested_and_leaves_torch_to_the_user():
    lines = [
        ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and ln[0] != "#"
    ]
    pins = dict(ln.split("==", 1) for ln in lines)
    assert all("==" in ln for ln in lines), lines
    assert "torch" not in pins and "cold-ray" not in pins and "cold_ray" not in pins
    # every runtime dependency and the test tools are pinned
    names = {n.lower().replace("_", "-") for n in pins}
    assert {"ray", "transformers", "pydantic", "safetensors", "gguf", "pytest", "psycopg"} <= names
