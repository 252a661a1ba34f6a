"""The README's two commands (run, test) are what CI runs, verbatim: `.ci/run` installs exactly
what the run command installs before it serves, and runs exactly the test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_ci_runs_the_readme_commands_verbatim():
    run, test = _quick_start_commands()[:2]
    assert run.endswith(" && serve run deployments/cold.yaml") and ".[test]" not in run
    install = run.removesuffix(" && serve run deployments/cold.yaml")
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n    {install}\n" in ci
    assert "serve run deployments/cold.yaml" in ci
    assert f"\n    {test}\n" in ci
    assert ci.index(install) < ci.index(test)  # served before the test extra is installed
