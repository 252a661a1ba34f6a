"""Train the demo adapter: a PEFT LoRA on SmolLM2 for the synthetic arithmetic task.

    OMP_NUM_THREADS=1 python -m cold_ray.adapters.train_demo --out deployments/adapters/arith-demo
    OMP_NUM_THREADS=1 python -m cold_ray.adapters.train_demo --out DIR --eval-only --eval 50

Trains in fp32 on CPU (r=16 on all seven linear projections; ~200 steps of batch 8 take
≈ 20–25 min on 1 core) and saves PEFT format (adapter_config.json +
adapter_model.safetensors) with fp16 weights, so the rank-16 all-linear adapter is < 10 MB.
The loss covers only the answer tokens (and the closing EOS), never the prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import tempfile
import time
from pathlib import Path

import torch

from cold_ray.adapters.demo_task import extract_answer, format_prompt, make_split
from cold_ray.adapters.peft import CONFIG_FILE, WEIGHTS_FILE
from cold_ray.model.args import TARGET_MODULES
from cold_ray.model.loader import DEFAULT_MODEL_NAME, default_model_path

log = logging.getLogger("train_demo")


def encode(tokenizer, item: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) with the prompt masked out (-100)."""
    prompt = tokenizer.encode(format_prompt(item["question"]), add_special_tokens=False)
    answer = tokenizer.encode(" " + item["answer"], add_special_tokens=False)
    answer.append(tokenizer.eos_token_id)
    return prompt + answer, [-100] * len(prompt) + answer


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def save_fp16(model, out: Path, base_name: str) -> None:
    """Save PEFT format with fp16 weights and a portable base-model name (no local paths)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tensors = {
            k: v.to(torch.float16).contiguous()
            for k, v in load_file(str(Path(tmp) / WEIGHTS_FILE)).items()
        }
        cfg = json.loads((Path(tmp) / CONFIG_FILE).read_text())
    cfg["base_model_name_or_path"] = base_name
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def train(args: argparse.Namespace) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    model_path = Path(args.model) if args.model else default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    data = [encode(tokenizer, it) for it in make_split("train", args.steps * args.batch_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        ),
    )
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids, labels, mask = collate(
            data[step * args.batch_size : (step + 1) * args.batch_size], pad
        )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            log.info(
                "step %d/%d loss %.4f lr %.2e elapsed %.0fs",
                step + 1,
                args.steps,
                loss.item(),
                sched.get_last_lr()[0],
                time.perf_counter() - t0,
            )
    save_fp16(model, Path(args.out), args.base_name)
    size = (Path(args.out) / WEIGHTS_FILE).stat().st_size
    log.info("saved %s (%d bytes) in %.0fs", args.out, size, time.perf_counter() - t0)


def _last_int(text: str) -> int | None:
    nums = re.findall(r"-?\d+", text.replace(",", ""))
    return int(nums[-1]) if nums else None


def evaluate(
    adapter_dir: str | None, n: int, model: str | None = None, max_tokens: int = 64
) -> dict:
    """Accuracy on the first `n` test items: base model, adapter (greedy), adapter + CoLD.

    `strict` needs the `#### N` answer line; `lenient` takes the last integer of the output
    (fairer to a base model that never learned the format)."""
    from cold_ray.config import EngineConfig
    from cold_ray.engine import ColdParams, EngineCore, SamplingParams

    items = make_split("test", n)
    prompts = [format_prompt(it["question"]) for it in items]
    gold = [extract_answer(it["answer"]) for it in items]
    core = EngineCore(EngineConfig(model=model, max_rows=32, max_model_len=256))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    runs = {"base": (None, None)}
    if adapter_dir is not None:
        core.register_adapter("demo", adapter_dir)
        runs |= {"adapter": ("demo", None), "adapter_cold": ("demo", ColdParams())}
    result = {"n": n, "max_tokens": max_tokens}
    for label, (adapter, cold) in runs.items():
        t0 = time.perf_counter()
        outs = core.generate(prompts, params, adapter=adapter, cold=cold)
        texts = [o["text"] for o in outs]
        result[label] = {
            "strict": sum(extract_answer(t) == g for t, g in zip(texts, gold)) / n,
            "lenient": sum(
                _last_int(t.split("####")[-1] if "####" in t else t) == g
                for t, g in zip(texts, gold)
            )
            / n,
            "seconds": round(time.perf_counter() - t0, 1),
            "example": texts[0],
        }
        log.info("%s: %s", label, result[label])
    core.shutdown()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (PEFT format)")
    p.add_argument(
        "--eval",
        type=int,
        default=0,
        metavar="N",
        help="then report accuracy on N test items (base vs adapter vs CoLD)",
    )
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate --out")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--model", default=None, help="HF folder; default: SmolLM2-135M-Instruct")
    p.add_argument(
        "--base-name",
        default=f"HuggingFaceTB/{DEFAULT_MODEL_NAME}",
        help="base_model_name_or_path written into adapter_config.json",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if not args.eval_only:
        train(args)
    if args.eval:
        print(json.dumps(evaluate(args.out, args.eval, args.model), indent=2))


if __name__ == "__main__":
    main()
