"""Triton kernels: BGMV shrink/expand and the fused CoLD contrastive step.

One source for CUDA (upstream `triton`) and Ascend NPUs (`triton-ascend`, which installs as the
same top-level `triton` package — never both in one environment). Only portable primitives are
used: loads/stores, elementwise math, `tl.sum/max/min` reductions — no `tl.dot`, no atomics,
so split-K partial sums go to a workspace that `expand` reduces in a fixed order
(deterministic). Everything accumulates in fp32 (`.to(tl.float32)` after each load), which is
also what keeps fp16/bf16 right under `TRITON_INTERPRET=1`.

The functions are plain Python here and decorated by `kernels()` on first use, so the
interpreter switch (`TRITON_INTERPRET=1`, read by `triton.jit`) may be set any time before the
first launch. Wrappers with checks and "Semantics:" blocks live in `triton_backend.py`.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import triton
import triton.language as tl


def _shrink_kernel(
    x_ptr,  # x: [rows, in]
    a_ptr,  # A: [slots, r, in], last dim contiguous
    idx_ptr,  # idx: [rows] int64, -1 = no adapter
    ws_ptr,  # ws: [split_k, rows, r] fp32 partial sums
    d_in,
    rank,
    k_per_split,  # multiple of BLOCK_K
    stride_xm,
    stride_as,
    stride_ar,
    stride_ws,
    stride_wm,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (row, split): ws[split, row, :] = x[row, K_split] @ A[idx[row], :, K_split].T."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(idx_ptr + row)
    if slot < 0:  # base row: nothing to compute, nothing written
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(0, k_per_split, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < d_in
        xv = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        av = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    tl.store(ws_ptr + split * stride_ws + row * stride_wm + offs_r, acc, mask=r_mask)


def _expand_kernel(
    ws_ptr,  # ws: [split_k, rows, r] fp32 (shrink partial sums)
    b_ptr,  # B: [slots, out, r], last dim contiguous
    idx_ptr,  # idx: [rows] int64
    scale_ptr,  # scale: [slots]
    y_ptr,  # y: [rows, out], updated in place
    d_out,
    rank,
    stride_ws,
    stride_wm,
    stride_bs,
    stride_bn,
    stride_ym,
    SPLIT_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (row, n-block): y[row, n] += scale[k] * (sum_s ws[s, row]) @ B[k, n].T."""
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(idx_ptr + row)
    if slot < 0:  # base row: y is never read or written, so it stays bit-identical
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: deterministic split-K reduction
        t += tl.load(ws_ptr + s * stride_ws + row * stride_wm + offs_r, mask=r_mask, other=0.0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    b_tile = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :]
    bv = tl.load(b_tile, mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(bv * t[None, :], axis=1) * tl.load(scale_ptr + slot).to(tl.float32)
    y_ptrs = y_ptr + row.to(tl.int64) * stride_ym + offs_n
    yv = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (yv + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


def _cold_full_kernel(
    e_ptr,  # expert logits: [rows, V]
    a_ptr,  # amateur logits: [rows, V]
    log_alpha_ptr,  # [rows] fp32, ln(alpha) computed by torch (bit-equal threshold)
    beta_ptr,  # [rows]
    tok_ptr,  # out: [rows] int64
    score_ptr,  # out: [rows, V] fp32 (only if WRITE_SCORES)
    vocab,
    stride_e,
    stride_a,
    stride_s,
    WRITE_SCORES: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Program (row,): two passes over V — expert max, then masked score + running argmax."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    e_row = e_ptr + row * stride_e
    a_row = a_ptr + row * stride_a
    run_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + offs
        ev = tl.load(e_row + v, mask=v < vocab, other=float("-inf")).to(tl.float32)
        run_max = tl.maximum(run_max, ev)
    threshold = tl.max(run_max, axis=0) + tl.load(log_alpha_ptr + row)
    b = tl.load(beta_ptr + row).to(tl.float32)
    best = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    best_id = tl.zeros((BLOCK_V,), dtype=tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + offs
        m = v < vocab
        ev = tl.load(e_row + v, mask=m, other=float("-inf")).to(tl.float32)
        av = tl.load(a_row + v, mask=m, other=0.0).to(tl.float32)
        score = (1.0 + b) * ev - b * av
        score = tl.where(m & (ev >= threshold), score, float("-inf"))  # mask on EXPERT logits
        if WRITE_SCORES:
            tl.store(score_ptr + row * stride_s + v, score, mask=m)
        better = score > best  # strict: each lane keeps its first (lowest-id) maximum
        best = tl.where(better, score, best)
        best_id = tl.where(better, v, best_id)
    top = tl.max(best, axis=0)
    tok = tl.min(tl.where(best == top, best_id, vocab), axis=0)
    tl.store(tok_ptr + row, tok.to(tl.int64))


def _cold_restricted_kernel(
    e_ptr,  # expert logits: [rows, V]
    ids_ptr,  # candidate ids: [rows, K] int64
    mask_ptr,  # candidate is real: [rows, K] uint8
    h_ptr,  # amateur hidden: [rows, H]
    w_ptr,  # lm_head: [V, H], last dim contiguous
    beta_ptr,  # [rows]
    tok_ptr,  # out: [rows] int64
    score_ptr,  # out: [rows, K] fp32
    n_cand,
    hidden,
    stride_e,
    stride_ids,
    stride_mask,
    stride_h,
    stride_w,
    stride_s,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (row,): amateur logit at each candidate (K dots of length H), score, argmax."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.load(beta_ptr + row).to(tl.float32)
    big: tl.constexpr = 0x3FFFFFFFFFFFFFFF
    best = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
    best_id = tl.full((BLOCK_C,), big, dtype=tl.int64)
    for c0 in range(0, n_cand, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < n_cand
        ids = tl.load(ids_ptr + row * stride_ids + c, mask=cm, other=0).to(tl.int64)
        real = tl.load(mask_ptr + row * stride_mask + c, mask=cm, other=0) != 0
        ev = tl.load(e_ptr + row * stride_e + ids, mask=cm, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            hm = hh < hidden
            hv = tl.load(h_ptr + row * stride_h + hh, mask=hm, other=0.0).to(tl.float32)
            w_tile = w_ptr + ids[:, None] * stride_w + hh[None, :]
            wv = tl.load(w_tile, mask=cm[:, None] & hm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wv * hv[None, :], axis=1)
        score = tl.where(cm & real, (1.0 + b) * ev - b * acc, float("-inf"))
        tl.store(score_ptr + row * stride_s + c, score, mask=cm)
        cid = tl.where(cm, ids, big)
        better = (score > best) | ((score == best) & (cid < best_id))  # ties: lowest token id
        best = tl.where(better, score, best)
        best_id = tl.where(better, cid, best_id)
    top = tl.max(best, axis=0)
    tl.store(tok_ptr + row, tl.min(tl.where(best == top, best_id, big), axis=0))


@functools.cache
def kernels() -> SimpleNamespace:
    """The jit-decorated kernels, built once (honours TRITON_INTERPRET at that moment)."""
    return SimpleNamespace(
        shrink=triton.jit(_shrink_kernel),
        expand=triton.jit(_expand_kernel),
        cold_full=triton.jit(_cold_full_kernel),
        cold_restricted=triton.jit(_cold_restricted_kernel),
    )
