"""The demo task is deterministic and self-consistent; the training script saves an adapter the
engine accepts (fp16 PEFT format)."""

import re

import pytest
import torch
from safetensors.torch import load_file

from cold_ray.adapters.demo_task import extract_answer, format_prompt, make_split
from cold_ray.adapters.peft import load_peft_adapter
from cold_ray.adapters.train_demo import main as train_main
from cold_ray.model.loader import read_model_args


def test_splits_are_deterministic_and_disjoint():
    assert make_split("train", 20) == make_split("train", 20)
    assert make_split("test", 5) == make_split("test", 50)[:5]
    train = {it["question"] for it in make_split("train", 2000)}
    for split in ("validation", "test"):
        assert not train & {it["question"] for it in make_split(split, 200)}
    with pytest.raises(ValueError, match="split must be one of"):
        make_split("dev", 3)


def test_worked_answers_are_correct():
    for it in make_split("validation", 300):
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", it["answer"])
        assert 1 <= len(steps) <= 3  # 2-3 drawn; a subtraction from 1 is skipped
        value = None
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert value is None or a == value  # each step starts from the previous result
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and c >= 0
            value = c
        assert extract_answer(it["answer"]) == value
        assert it["question"] in format_prompt(it["question"])
    assert extract_answer("so #### 1,234 apples") == 1234
    assert extract_answer("no answer line") is None


def test_training_script_saves_an_fp16_adapter_the_engine_accepts(tmp_path, tiny_llama):
    out = tmp_path / "demo"
    train_main(
        [
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--rank",
            "4",
            "--model",
            str(tiny_llama),
            "--base-name",
            "tiny-llama",
        ]
    )
    tensors = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    adapter = load_peft_adapter(out, read_model_args(tiny_llama), max_rank=4)
    assert adapter.rank == 4 and len(adapter.target_modules) == 7
    assert adapter.base_model == "tiny-llama"
