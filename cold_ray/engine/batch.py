"""Turn a step's plan into the model's `ForwardBatch`: every tensor of per-step metadata is
built here once (flat tokens, positions, KV slots, adapter indices, attention masks)."""

from __future__ import annotations

import torch

from cold_ray.engine.kv_cache import Row
from cold_ray.engine.scheduler import StepPlan
from cold_ray.kernels import LoraBackend
from cold_ray.model.llama import DecodeAttention, ForwardBatch, PrefillAttention


def build(
    plan: StepPlan, backend: LoraBackend, device, dtype: torch.dtype
) -> tuple[torch.Tensor, ForwardBatch, dict, dict]:
    """(tokens [N], batch, {row: index into the returned hidden states}, {chunk: index of the
    hidden state of its first token} for chunks whose request asks for prompt log-probs,
    whose every position is returned)."""
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    adapters: list[int] = []
    out_rows: dict[Row, int] = {}
    out_index: list[int] = []
    prompt_out: dict = {}

    for row in plan.decode:  # one token: the last one generated, at the next position
        out_rows[row] = len(out_index)
        out_index.append(len(tokens))
        tokens.append(row.request.output_ids[-1])
        positions.append(row.length)
        slots.append(row.slot)
        adapters.append(row.adapter_slot)
    num_decode = len(tokens)
    for chunk in plan.prefill:
        n = len(chunk.tokens)
        if chunk.row.request.params.prompt_logprobs is not None:
            prompt_out[chunk] = len(out_index)
            out_index += range(len(tokens), len(tokens) + n - 1)  # the last one follows
        tokens += chunk.tokens
        positions += range(chunk.start, chunk.start + n)
        slots += [chunk.row.slot] * n
        adapters += [chunk.row.adapter_slot] * n
        if chunk.ends_prompt or chunk in prompt_out:
            out_rows[chunk.row] = len(out_index)
            out_index.append(len(tokens) - 1)

    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    batch = ForwardBatch(
        positions=as_tensor(positions),
        slots=as_tensor(slots),
        # the host list: `prepare` plans on the host, so a device index would be read back
        lora=backend.prepare(adapters) if max(adapters) >= 0 else None,
        decode=_decode(plan.decode, device, dtype) if plan.decode else None,
        prefill=_prefill(plan, num_decode, device, dtype) if plan.prefill else None,
        out_index=as_tensor(out_index),
    )
    return as_tensor(tokens), batch, out_rows, prompt_out


def additive(mask: torch.Tensor, device, dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as the additive float mask SDPA takes without a
    per-call conversion (0 where attended, -inf elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf")).to(device)


def _decode(rows: list[Row], device, dtype) -> DecodeAttention:
    """Slots in [0, S) without a decoding row attend position 0 (their output is dropped)."""
    slot_ids = [r.slot for r in rows]
    span_rows = max(slot_ids) + 1
    lengths = torch.zeros(span_rows, dtype=torch.int64)
    lengths[slot_ids] = torch.tensor([r.length for r in rows])
    span = int(lengths.max()) + 1
    mask = torch.arange(span) <= lengths.unsqueeze(1)  # the new token attends to itself
    in_order = slot_ids == list(range(len(rows)))
    return DecodeAttention(
        num=len(rows),
        span_rows=span_rows,
        slots=None if in_order else torch.tensor(slot_ids, device=device),
        mask=additive(mask.view(span_rows, 1, 1, span), device, dtype),
    )


def _prefill(plan: StepPlan, start: int, device, dtype) -> PrefillAttention:
    chunks = plan.prefill
    width = max(len(c.tokens) for c in chunks)
    span = max(c.start + len(c.tokens) for c in chunks)
    pad_index, unpad_index, flat = [], [], start
    for p, c in enumerate(chunks):
        n = len(c.tokens)
        pad_index.append([flat + min(i, n - 1) for i in range(width)])
        unpad_index += range(p * width, p * width + n)
        flat += n
    starts = torch.tensor([c.start for c in chunks]).view(-1, 1, 1)
    # query i of a chunk (position start + i) attends to positions <= start + i
    mask = torch.arange(span).view(1, 1, -1) <= starts + torch.arange(width).view(1, -1, 1)
    return PrefillAttention(
        start=start,
        slots=torch.tensor([c.row.slot for c in chunks], device=device),
        pad_index=torch.tensor(pad_index, device=device),
        unpad_index=torch.tensor(unpad_index, device=device),
        mask=additive(mask.unsqueeze(1), device, dtype),
        fresh=len(chunks) == 1 and chunks[0].start == 0,
    )
