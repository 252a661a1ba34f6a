"""Triton backend: launchers for the kernels in `triton_kernels.py`, with checks before launch.

Auto-picked on CUDA (upstream triton) and on Ascend NPUs without vllm-ascend (triton-ascend).
On CPU it runs only under `TRITON_INTERPRET=1` (tests, on small shapes).
"""

from __future__ import annotations

import os

import torch

from cold_ray.kernels import reference
from cold_ray.kernels.contrastive import ColdStep, plausible_candidates
from cold_ray.kernels.dispatch import LoraBackend, LoraBatch
from cold_ray.kernels.triton_kernels import kernels

MAX_TILE = 8192  # elements per [BLOCK_R, BLOCK_K] / [BLOCK_N, BLOCK_R] register tile


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class TritonBackend(LoraBackend):
    name = "triton"
    graph_safe = True  # each program reads its row's slot on the device; -1 rows return

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        if self.device.type == "cpu" and not _interpreting():
            raise RuntimeError(
                "the triton LoRA backend needs a CUDA/NPU device; on CPU it runs only under "
                "TRITON_INTERPRET=1 (tests). Use lora_backend 'grouped' on CPU."
            )
        # Programs to aim for when splitting K in shrink: a few per SM / AI core.
        if self.device.type == "cuda":
            self._programs = 4 * torch.cuda.get_device_properties(self.device).multi_processor_count
        elif self.device.type == "npu":
            self._programs = 64
        else:  # interpreter: every program costs milliseconds, do not split
            self._programs = 1
        # CoLD scores unfused (no FMA), as torch computes them, so near-ties break the same way.
        # Only CUDA's options are known to take the flag; Ascend/interpreter use their default.
        self._cold_opts = {"enable_fp_fusion": False} if self.device.type == "cuda" else {}

    def _check_device(self, **tensors: torch.Tensor) -> None:
        # Kernels take raw pointers: a tensor on the wrong device would be read as garbage.
        for name, t in tensors.items():
            if t.device.type != self.device.type:
                raise ValueError(
                    f"{name} is on {t.device}, expected the backend's device {self.device}"
                )

    def split_k(self, rows: int, d_in: int, block_k: int) -> int:
        """How many K-splits shrink uses: enough programs to fill the device, >= 2 blocks each."""
        blocks = _cdiv(d_in, block_k)
        want = _cdiv(self._programs, max(rows, 1))
        return max(1, min(want, blocks // 2))

    # -- LoRA ---------------------------------------------------------------------------------
    def _shrink_ws(
        self, x: torch.Tensor, A: torch.Tensor, batch: LoraBatch, zero: bool, split_k: int | None
    ) -> torch.Tensor:  # ws: [split_k, rows, r] fp32
        rows, d_in = x.shape
        rank = A.shape[1]
        block_r = _pow2(rank)
        block_k = max(16, min(512, MAX_TILE // block_r, _pow2(d_in)))
        split = split_k if split_k is not None else self.split_k(rows, d_in, block_k)
        k_per_split = max(1, _cdiv(_cdiv(d_in, split), block_k)) * block_k  # whole blocks
        split = max(1, _cdiv(d_in, k_per_split))  # rounding to blocks may leave fewer splits
        alloc = torch.zeros if zero else torch.empty
        ws = alloc(split, rows, rank, dtype=torch.float32, device=x.device)
        if rows and batch.plan != "none":
            kernels().shrink[(rows, split)](
                x,
                A,
                batch.idx,
                ws,
                d_in,
                rank,
                k_per_split,
                x.stride(0),
                A.stride(0),
                A.stride(1),
                ws.stride(0),
                ws.stride(1),
                BLOCK_R=block_r,
                BLOCK_K=block_k,
            )
        return ws

    def _expand_ws(
        self, ws: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, batch: LoraBatch, y
    ) -> None:
        rows, d_out = y.shape
        rank = B.shape[2]
        block_r = _pow2(rank)
        block_n = max(16, min(256, MAX_TILE // block_r, _pow2(d_out)))
        if rows == 0 or batch.plan == "none":
            return
        scale = scale if scale.stride(0) == 1 else scale.contiguous()  # read as scale_ptr + slot
        kernels().expand[(rows, _cdiv(d_out, block_n))](
            ws,
            B,
            batch.idx,
            scale,
            y,
            d_out,
            rank,
            ws.stride(0),
            ws.stride(1),
            B.stride(0),
            B.stride(1),
            y.stride(0),
            SPLIT_K=ws.shape[0],
            BLOCK_R=block_r,
            BLOCK_N=block_n,
        )

    def _shrink(self, x, A, batch: LoraBatch, split_k: int | None = None) -> torch.Tensor:
        """`split_k` forces the K-split (default: the heuristic)."""
        self._check_device(x=x, A=A, idx=batch.idx)
        ws = self._shrink_ws(x, A, batch, zero=True, split_k=split_k)
        return ws[0] if ws.shape[0] == 1 else ws.sum(0)

    def _expand(self, t, B, scale, batch: LoraBatch, y) -> None:
        self._check_device(t=t, B=B, scale=scale, y=y, idx=batch.idx)
        self._expand_ws(t.float().unsqueeze(0), B, scale, batch, y)

    def _lora_delta(self, x, A, B, scale, batch: LoraBatch, y, split_k: int | None = None):
        """Shrink into an fp32 workspace, then expand into y (two launches, no other ops)."""
        self._check_device(x=x, A=A, B=B, scale=scale, y=y, idx=batch.idx)
        ws = self._shrink_ws(x, A, batch, zero=False, split_k=split_k)
        self._expand_ws(ws, B, scale, batch, y)

    def _contrastive_full(self, expert_logits, amateur_logits, alpha, beta, with_scores):
        """Fused over full logits: one program per row, no [rows, V] temporaries."""
        self._check_device(expert_logits=expert_logits, amateur_logits=amateur_logits)
        e, a = _unit_stride(expert_logits), _unit_stride(amateur_logits)
        rows, vocab = e.shape
        log_alpha = reference.log_alpha(alpha).contiguous()  # torch's log: threshold bit-equal
        beta = beta.float().contiguous()
        tokens = torch.empty(rows, dtype=torch.int64, device=e.device)
        scores = torch.empty(
            rows if with_scores else 1, vocab, dtype=torch.float32, device=e.device
        )
        if rows:
            block_v = (
                min(1024, _pow2(vocab)) if self.device.type != "cpu" else min(4096, _pow2(vocab))
            )
            kernels().cold_full[(rows,)](
                e,
                a,
                log_alpha,
                beta,
                tokens,
                scores,
                vocab,
                e.stride(0),
                a.stride(0),
                scores.stride(0),
                WRITE_SCORES=with_scores,
                BLOCK_V=block_v,
                **self._cold_opts,
            )
        return ColdStep(tokens, None, scores if with_scores else None)

    def _contrastive_restricted(self, expert_logits, amateur_hidden, lm_head, alpha, beta):
        """The amateur head fused at the candidate tokens (no [rows, K, H] gather)."""
        self._check_device(
            expert_logits=expert_logits, amateur_hidden=amateur_hidden, lm_head=lm_head
        )
        e, h, w = _unit_stride(expert_logits), _unit_stride(amateur_hidden), _unit_stride(lm_head)
        ids, mask = plausible_candidates(e, alpha)  # [rows, K], as the reference's
        rows, n_cand = ids.shape
        ids = ids.contiguous()
        mask_u8 = mask.contiguous().view(torch.uint8)
        beta = beta.float().contiguous()
        tokens = torch.empty(rows, dtype=torch.int64, device=e.device)
        scores = torch.empty(rows, n_cand, dtype=torch.float32, device=e.device)
        if rows:
            hidden = h.shape[1]
            block_c = min(32, _pow2(n_cand))
            block_h = max(16, min(1024, MAX_TILE // block_c, _pow2(hidden)))
            kernels().cold_restricted[(rows,)](
                e,
                ids,
                mask_u8,
                h,
                w,
                beta,
                tokens,
                scores,
                n_cand,
                hidden,
                e.stride(0),
                ids.stride(0),
                mask_u8.stride(0),
                h.stride(0),
                w.stride(0),
                scores.stride(0),
                BLOCK_C=block_c,
                BLOCK_H=block_h,
                **self._cold_opts,
            )
        return ColdStep(tokens, ids, scores)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim with stride 1; copy only when a caller passes otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()
