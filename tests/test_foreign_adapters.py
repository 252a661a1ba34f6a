"""Adapters trained elsewhere: one that declares its base by hub id is served from a model
folder of another name by `cold-ray adapters add --model DIR` and `cold-ray eval --model DIR`
with no flags, its warning shown; one whose shapes do not fit is refused, naming the layer."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from cold_ray.cli import main

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _foreign(src, dst, base=HUB_ID):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _misfit(src, dst):
    """An adapter for a model with a wider hidden size: lora_A of q_proj does not fit."""
    shutil.copytree(src, dst)
    t = load_file(dst / "adapter_model.safetensors")
    key = next(k for k in t if "layers.1.self_attn.q_proj.lora_A" in k)
    t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] * 2)
    save_file(t, dst / "adapter_model.safetensors")
    return dst


def test_foreign_adapter_adds_and_evaluates_without_flags(
    tmp_path, tiny_llama, tiny_adapters, capsys
):
    model = tmp_path / "models" / "smollm2"  # the same weights under another folder name
    shutil.copytree(tiny_llama, model)
    adapter = _foreign(tiny_adapters[0], tmp_path / "from-the-hub")
    reg = ["--registry", str(tmp_path / "reg.sqlite")]

    rc = main(["adapters", "add", "hub", str(adapter), "--model", str(model), "--json", *reg])
    out = capsys.readouterr()
    assert rc == 0, out.err
    record = json.loads(out.out)
    assert record["base_model"] == HUB_ID
    (warning,) = record["warnings"]
    assert repr(HUB_ID) in warning and "'smollm2'" in warning
    rc = main(["adapters", "show", "hub", *reg])
    assert rc == 0 and "check that it was trained on these weights" in capsys.readouterr().out

    data = tmp_path / "task.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"{i} + 1 =", "answer": f"#### {i + 1}"}) + "\n"
            for i in range(2)
        )
    )
    common = [
        "--data",
        str(data),
        "--model",
        str(model),
        "--max-model-len",
        "200",
        "--max-rows",
        "4",
        "--max-tokens",
        "2",
        "--json",
        "--no-progress",
    ]
    for by in (str(adapter), "hub"):  # a folder, then the registry entry
        rc = main(["eval", "--adapter", by, *common, *reg])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert "warning:" in out.err and HUB_ID in out.err
        results = json.loads(out.out)["results"]
        assert [r["mode"] for r in results] == ["greedy", "cold", "base_greedy"]


def test_misfit_adapter_is_refused_naming_the_layer(tmp_path, tiny_llama, tiny_adapters, capsys):
    adapter = _misfit(tiny_adapters[0], tmp_path / "misfit")
    rc = main(
        [
            "adapters",
            "add",
            "bad",
            str(adapter),
            "--model",
            str(tiny_llama),
            "--registry",
            str(tmp_path / "reg.sqlite"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "layer 1 q_proj" in err and "do not fit the base layer" in err
    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"question": "1 + 1 =", "answer": "#### 2"}) + "\n")
    rc = main(
        [
            "eval",
            "--adapter",
            str(adapter),
            "--data",
            str(data),
            "--model",
            str(tiny_llama),
            "--max-model-len",
            "200",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "layer 1 q_proj" in err
