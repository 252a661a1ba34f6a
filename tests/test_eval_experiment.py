"""The CoLD-quality experiment: the base-9 task, the training batches, and the whole pipeline
(train → dev choice → test → JSON + PNG) on the tiny random model."""

import json

import pytest
import torch

from cold_ray.eval import base9
from cold_ray.eval.experiment import ExperimentConfig, format_table, run
from cold_ray.eval.experiment_train import TrainConfig, answer_loss, left_pad


def test_base9_conversion_and_carry():
    assert base9.to_base(0) == "0" and base9.to_base(80) == "88" and base9.to_base(81) == "100"
    assert all(base9.from_base(base9.to_base(v)) == v for v in range(2000))
    assert not base9.has_carry("34", "44")  # 78: same digits in base 9 and 10
    assert base9.has_carry("5", "4") and base9.has_carry("108", "88")
    assert not base9.has_carry("100", "88")
    assert base9.item("57", "38") == {"question": "57 + 38", "answer": "106", "decimal": "95"}
    assert base9.first_number(" 106 in base 9 is 87") == "106"
    assert base9.first_number(" none") is None


def test_base9_splits_disjoint_seeded_and_prior_always_wrong():
    sizes = {"test": 200, "dev": 100, "train": 800}
    splits = base9.make_splits(sizes)
    assert splits == base9.make_splits(sizes)
    assert {k: len(v) for k, v in splits.items()} == sizes
    # test items do not depend on the other splits' sizes
    assert base9.make_splits({"test": 200, "dev": 5, "train": 0})["test"] == splits["test"]
    pairs = {k: {frozenset(it["question"].split(" + ")) for it in v} for k, v in splits.items()}
    assert sum(len(p) for p in pairs.values()) == 1100  # no pair twice, within or across
    for it in splits["test"] + splits["dev"] + splits["train"]:
        a, b = it["question"].split(" + ")
        assert base9.from_base(it["answer"]) == base9.from_base(a) + base9.from_base(b)
        assert it["answer"] != it["decimal"] == str(int(a) + int(b))
        assert set(a + b + it["answer"]) <= set("012345678")


def test_left_pad_labels_cover_answers_only():
    rows = [([5, 6, 7], [8, 9, 2]), ([5, 6], [9, 2])]
    ids, mask, labels = left_pad(rows, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 2], [0, 0, 5, 6, 9, 2]]
    assert mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert labels.tolist() == [[8, 9, 2], [-100, 9, 2]]


def test_answer_loss_matches_full_logits(tiny_llama):
    """Logits at the last K+1 positions give the same loss as the full forward."""
    from tests.helpers import hf_model

    model = hf_model(tiny_llama)
    ids, mask, labels = left_pad([([5, 6, 7], [8, 9, 2]), ([5, 6], [9, 2])], pad_id=1)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        k = labels.shape[1]
        ref = torch.nn.functional.cross_entropy(
            full[:, -k - 1 : -1].reshape(-1, full.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        torch.testing.assert_close(answer_loss(model, ids, mask, labels), ref)


def test_pipeline_on_tiny_model(tiny_llama, tmp_path):
    config = ExperimentConfig(
        out=tmp_path / "exp",
        model=str(tiny_llama),
        n_test=6,
        n_dev=4,
        n_latency=2,
        alphas=(0.1,),
        betas=(0.5, 1.0),
        max_rows=8,
        rounds=2,
        train=TrainConfig(checkpoints=(2, 1), batch_size=2, warmup=1, rank=4),
    )
    results = run(config)
    assert json.loads((tmp_path / "exp" / "results.json").read_text()) == json.loads(
        json.dumps(results)
    )
    assert (tmp_path / "exp" / "accuracy.png").stat().st_size > 0
    assert list(results["checkpoints"]) == ["1", "2"]
    assert results["base"]["n"] == 6
    for c in results["checkpoints"].values():
        assert (c["cold"]["alpha"], c["cold"]["beta"]) == (c["dev"]["alpha"], c["dev"]["beta"])
        assert c["dev"]["n"] == 4 and len(c["dev"]["grid"]) == 2
        p = c["paired"]
        assert p["both_correct"] + p["only_a"] + p["only_b"] + p["neither"] == 6
        assert p["only_a"] - p["only_b"] == c["greedy"]["correct"] - c["cold"]["correct"]
        for mode in ("greedy", "cold"):
            r = c[mode]
            assert r["n"] == 6 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
            assert 0 < r["mean_output_tokens"] <= base9.TASK.max_tokens
            assert r["latency_s_per_item"] > 0 and r["wall_s_per_item_batched"] > 0
    lines = (tmp_path / "exp" / "outputs" / "step-1.jsonl").read_text().splitlines()
    assert len(lines) == 12
    assert "| 2 |" in format_table(results)

    # Run again afresh: the checkpoints are reused (no retraining), the tokens are the same.
    weights = tmp_path / "exp" / "adapters" / "step-2" / "adapter_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = run(config, fresh=True)
    assert weights.stat().st_mtime_ns == mtime
    for steps, c in results["checkpoints"].items():
        for mode in ("greedy", "cold"):
            assert again["checkpoints"][steps][mode]["correct"] == c[mode]["correct"]
    # Without `fresh`, figures of the same configuration are kept, also for a shorter list.
    shorter = ExperimentConfig(
        **{
            **config.__dict__,
            "train": TrainConfig(checkpoints=(1,), batch_size=2, warmup=1, rank=4),
        }
    )
    kept = run(shorter)
    assert kept["checkpoints"] == again["checkpoints"] and kept["base"] == again["base"]
    # eval_only trains nothing: a step count with no saved checkpoint is left out.
    longer = ExperimentConfig(
        **{
            **config.__dict__,
            "eval_only": True,
            "train": TrainConfig(checkpoints=(1, 2, 3), batch_size=2, warmup=1, rank=4),
        }
    )
    assert list(run(longer)["checkpoints"]) == ["1", "2"]
    assert not (tmp_path / "exp" / "adapters" / "step-3").exists()


def test_config_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_latency 10 exceeds n_test 5"):
        ExperimentConfig(out=tmp_path, n_test=5, n_latency=10)
    with pytest.raises(ValueError, match="checkpoints must be positive"):
        TrainConfig(checkpoints=(0, 5))
