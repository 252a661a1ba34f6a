"""No import name of this repository can shadow an installed distribution.

`serve run` and pytest put the checkout first on `sys.path`, so a top-level `kernels/` with an
`__init__.py` was imported instead of Hugging Face's `kernels` as soon as transformers began
to depend on it. The class: any top-level module or package of the repository whose name an
installed distribution, or a dependency that a resolution may bring, also provides.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = "cold-ray"
_EXTENSION = re.compile(r"^([A-Za-z_]\w*)\.(py|pyc|so|pyd|abi3\.so|cpython-[^.]*\.so)$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _files(root: Path) -> list[Path]:
    """The repository's files, relative to `root`: what git tracks or would (build outputs
    and venvs are not the repository's); every file where `root` is no git checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        return [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    return [Path(line) for line in listed.stdout.splitlines() if (root / line).exists()]


def importable_top_level(root: Path) -> dict[str, str]:
    """{name: what} for each `import name` that `root` satisfies when it is on sys.path: a
    module file, a package (`__init__.py`), or a namespace portion (a folder holding Python
    files anywhere below; a folder of C sources or YAML imports nothing)."""
    found = {}
    for path in sorted(_files(root)):
        top = path.parts[0]
        if top.startswith("."):
            continue
        m = _EXTENSION.match(top)
        if len(path.parts) == 1 and m:
            found[m.group(1)] = f"module {top}"
        elif len(path.parts) > 1 and top.isidentifier():
            if path.parts[1] == "__init__.py":
                found[top] = f"package {top}/"
            elif path.suffix == ".py":
                found.setdefault(top, f"namespace folder {top}/ (holds Python files)")
    return found


def _requirement_names(dist: str, seen: set[str]) -> None:
    """`dist` and every distribution it may require (all extras), installed or not."""
    seen.add(_normalise(dist))
    try:
        requires = md.requires(dist) or []
    except md.PackageNotFoundError:
        return
    for req in requires:
        name = _normalise(re.split(r"[\s\[<>=!~;(@]", req.strip(), maxsplit=1)[0])
        if name and name not in seen:
            _requirement_names(name, seen)


def reserved_names() -> dict[str, set[str]]:
    """{import name: distributions} for names other projects own: the top-level names of every
    installed distribution, and the names of cold-ray's dependencies (a distribution's name is
    its usual import name, and an unlocked install may bring one that is not installed here)."""
    owners: dict[str, set[str]] = {}
    for name, dists in md.packages_distributions().items():
        for d in dists:
            owners.setdefault(name, set()).add(d)
    deps: set[str] = set()
    _requirement_names(PROJECT, deps)
    for d in deps:
        owners.setdefault(d, set()).add(d)
    return {
        name: dists
        for name, dists in owners.items()
        if not {_normalise(d) for d in dists} & {_normalise(PROJECT)}
    }


def clashes(root: Path, reserved: dict[str, set[str]]) -> list[str]:
    return [
        f"{what} shadows {', '.join(sorted(reserved[name]))}"
        for name, what in importable_top_level(root).items()
        if name in reserved
    ]


def test_no_top_level_name_of_the_repository_shadows_a_distribution():
    assert clashes(REPO, reserved_names()) == []


def test_only_the_package_and_the_tests_are_importable_from_the_checkout():
    """Every importable module lives under cold_ray/ (pyproject's `include = ["cold_ray*"]`);
    native sources, YAMLs and docs sit in folders that import nothing."""
    assert set(importable_top_level(REPO)) == {"cold_ray", "tests"}


def test_the_check_finds_a_folder_named_like_an_installed_distribution(tmp_path):
    reserved = reserved_names()
    # direct dependencies: pyyaml provides `yaml`; torch provides `torch`
    assert "yaml" in reserved and "torch" in reserved
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "__init__.py").write_text("")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "ops").mkdir()
    (tmp_path / "torch" / "ops" / "x.py").write_text("")
    (tmp_path / "numpy.py").write_text("")
    (tmp_path / "gguf").mkdir()  # native sources only: nothing to import
    (tmp_path / "gguf" / "k.c").write_text("int x;")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "__init__.py").write_text("")
    found = clashes(tmp_path, reserved)
    assert len(found) == 3, found
    assert found[0].startswith("module numpy.py shadows numpy"), found
    assert found[1].startswith("namespace folder torch/"), found
    assert found[2].startswith("package yaml/ shadows") and "pyyaml" in found[2].lower(), found


def test_a_dependency_reserves_its_name_before_it_is_installed():
    """transformers 5.25 began to require `kernels`: a name a newer resolution brings counts
    even where the installed versions do not have it yet."""
    deps: set[str] = set()
    _requirement_names(PROJECT, deps)
    assert {"torch", "transformers", "ray", "pyyaml", "safetensors"} <= deps
    reserved = reserved_names()
    assert "cold_ray" not in reserved and "transformers" in reserved
