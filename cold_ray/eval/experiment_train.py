"""PEFT LoRA training for the CoLD experiment, with checkpoints at several step counts.

One run at a constant learning rate (after a short linear warm-up) saves the adapter after
each step count asked for, so the checkpoint at N steps is exactly what a run of N steps
with this schedule would give. The loss covers only the answer tokens and the closing EOS;
rows are left-padded so every answer ends at the last position, and the LM head runs only
on the last few positions (the prompt's logits would be thrown away: on a 150k-token
vocabulary they cost a quarter of the forward).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cold_ray.adapters.train_demo import save_fp16
from cold_ray.model.args import TARGET_MODULES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    checkpoints: tuple[int, ...] = (25, 50, 100, 200)
    batch_size: int = 8
    lr: float = 5e-4
    warmup: int = 10
    rank: int = 16
    seed: int = 0
    log_every: int = 5

    def __post_init__(self):
        if not self.checkpoints or any(s < 1 for s in self.checkpoints):
            raise ValueError(f"checkpoints must be positive step counts, got {self.checkpoints}")
        if self.batch_size < 1 or self.rank < 1:
            raise ValueError(
                f"batch_size and rank must be >= 1, got {self.batch_size}, {self.rank}"
            )

    @property
    def steps(self) -> int:
        return max(self.checkpoints)


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS): the answer follows the prompt after one space."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    target = tokenizer.encode(" " + answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids, target


def left_pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """(ids [B, T], attention mask [B, T], labels [B, K]): labels are the last K tokens of
    each row (answers, right-aligned), -100 where a row's answer is shorter than K."""
    width = max(len(p) + len(a) for p, a in rows)
    k = max(len(a) for _, a in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), k), -100)
    for i, (p, a) in enumerate(rows):
        seq = p + a
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
        labels[i, k - len(a) :] = torch.tensor(a)
    return ids, mask, labels


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """Mean cross-entropy of the answer tokens; logits only at the K+1 last positions."""
    k = labels.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=k + 1).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )


def train_checkpoints(
    model_dir: Path,
    items: list[dict],
    prompt: Callable[[str], str],
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    base_name: str = "model",
) -> dict[int, Path]:
    """Train one LoRA on `items` ({question, answer}) and save it at each checkpoint step as
    `out_dir/step-N` (PEFT format, fp16 weights). Already-saved checkpoints are kept; the
    run starts only when one is missing. Returns {steps: folder}."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = {s: Path(out_dir) / f"step-{s}" for s in sorted(config.checkpoints)}
    if all((f / "adapter_config.json").exists() for f in folders.values()):
        return folders
    need = config.steps * config.batch_size
    if len(items) < need:
        raise ValueError(
            f"{config.steps} steps of batch {config.batch_size} need {need} "
            f"training items, got {len(items)}"
        )
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=2 * config.rank,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    data = [encode(tokenizer, prompt(it["question"]), it["answer"]) for it in items[:need]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup))
    )
    model.train()
    t0 = time.perf_counter()
    for step in range(1, config.steps + 1):
        batch = data[(step - 1) * config.batch_size : step * config.batch_size]
        loss = answer_loss(model, *left_pad(batch, pad))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % config.log_every == 0 or step == 1:
            log.info(
                "step %d/%d loss %.4f elapsed %.0fs",
                step,
                config.steps,
                loss.item(),
                time.perf_counter() - t0,
            )
        if step in folders:
            save_fp16(model, folders[step], base_name)
            log.info("saved %s", folders[step])
    return folders
