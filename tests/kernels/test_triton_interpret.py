"""Triton kernels under TRITON_INTERPRET=1 (set in conftest) on small shapes, fp32/fp16 only.

The interpreter computes bf16 arithmetic wrongly (docs/design.md §9); the kernels convert every
load to fp32, and bf16 is left to GPU runs. The last test compiles every kernel for sm_90
(PTX + cubin via the bundled ptxas, no GPU needed; `python -m tests.kernels.compile_sm90`)
so codegen errors surface on CPU CI too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cold_ray.benchmarks.workloads import MIX_KINDS
from cold_ray.kernels import reference, select_backend
from cold_ray.kernels.dispatch import triton_importable
from tests.helpers import NO_TRITON
from tests.kernels.kernel_checks import (
    assert_base_rows_untouched,
    assert_close,
    make_case,
    make_cold_case,
)

pytestmark = pytest.mark.skipif(not triton_importable(), reason=NO_TRITON)

DTYPES = [torch.float32, torch.float16]
SHAPES = [(1, 1, 16, 16), (5, 7, 33, 47), (12, 16, 64, 96), (9, 64, 40, 24), (3, 33, 600, 20)]


@pytest.fixture(scope="module")
def triton_backend():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before the first kernel launch")
    return select_backend("triton", "cpu")


@pytest.mark.parametrize("mix", MIX_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_delta_matches_reference(triton_backend, dtype: torch.dtype, mix: str) -> None:
    for n, (rows, rank, d_in, d_out) in enumerate(SHAPES):
        case = make_case(rows, rank, d_in, d_out, dtype, mix, seed=n)
        batch = triton_backend.prepare(case.idx)
        for split_k in (None, 3):
            y = case.y.clone()
            triton_backend.lora_delta(case.x, case.A, case.B, case.scale, batch, y, split_k=split_k)
            what = f"triton lora_delta split_k={split_k} {case.describe()}"
            assert_close(y, case.expected(), dtype, what)
            assert_base_rows_untouched(y, case, what)


@pytest.mark.parametrize("backend", ["triton", "gather_bmm"])
def test_graph_batch_gives_the_planned_result(triton_backend, backend) -> None:
    """A captured step's metadata (`graph_batch`: the device index alone, every row counted
    active, any slot in use) gives what the host-planned batch gives, base rows untouched."""
    impl = triton_backend if backend == "triton" else select_backend(backend, "cpu")
    for n, (rows, rank, d_in, d_out) in enumerate(SHAPES):
        case = make_case(rows, rank, d_in, d_out, torch.float32, "interleaved_base", seed=80 + n)
        y = case.y.clone()
        batch = impl.graph_batch(case.idx, case.A.shape[0])
        impl.lora_delta(case.x, case.A, case.B, case.scale, batch, y)
        assert_close(y, case.expected(), torch.float32, f"{backend} graph_batch {case.describe()}")
        assert_base_rows_untouched(y, case, f"{backend} graph_batch {case.describe()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_and_expand_match_reference(triton_backend, dtype: torch.dtype) -> None:
    for n, (rows, rank, d_in, d_out) in enumerate(SHAPES):
        case = make_case(rows, rank, d_in, d_out, dtype, "interleaved_base", seed=50 + n)
        batch = triton_backend.prepare(case.idx)
        t_ref = reference.shrink(case.x, case.A, case.idx)
        for split_k in (1, 2):
            t = triton_backend.shrink(case.x, case.A, batch, split_k=split_k)
            assert_close(t, t_ref, dtype, f"triton shrink split_k={split_k} {case.describe()}")
            assert torch.equal(t[case.idx < 0], torch.zeros_like(t[case.idx < 0]))
        y, y_ref = case.y.clone(), case.y.clone()
        triton_backend.expand(t_ref, case.B, case.scale, batch, y)
        reference.expand(t_ref, case.B, case.idx, case.scale, y_ref)
        assert_close(y, y_ref, dtype, f"triton expand {case.describe()}")
        assert_base_rows_untouched(y, case, "triton expand")


def test_contrastive_kernels_match_reference(triton_backend) -> None:
    for n, (rows, vocab, hidden) in enumerate([(1, 1, 4), (3, 7, 5), (5, 1000, 24), (2, 4099, 40)]):
        c = make_cold_case(rows, vocab, hidden, seed=n)
        want = reference.contrastive_greedy(c.expert, c.amateur, c.alpha, c.beta)
        full = triton_backend.contrastive_full(
            c.expert, c.amateur, c.alpha, c.beta, with_scores=True
        )
        assert full.tokens.tolist() == want.tolist()
        torch_full = select_backend("reference").contrastive_full(
            c.expert, c.amateur, c.alpha, c.beta, with_scores=True
        )
        assert torch.equal(full.scores, torch_full.scores)
        restricted = triton_backend.contrastive_restricted(
            c.expert, c.hidden, c.lm_head, c.alpha, c.beta
        )
        assert restricted.tokens.tolist() == want.tolist()
        torch_restricted = select_backend("reference").contrastive_restricted(
            c.expert, c.hidden, c.lm_head, c.alpha, c.beta
        )
        assert torch.equal(restricted.ids, torch_restricted.ids)
        torch.testing.assert_close(restricted.scores, torch_restricted.scores, rtol=1e-5, atol=1e-4)
        # fp16 logits and head: the kernels load and convert, tokens still match the oracle.
        half = triton_backend.contrastive_full(c.expert.half(), c.amateur.half(), c.alpha, c.beta)
        want_half = reference.contrastive_greedy(c.expert.half(), c.amateur.half(), c.alpha, c.beta)
        assert half.tokens.tolist() == want_half.tolist()


def test_contrastive_ties_pick_lowest_token_id(triton_backend) -> None:
    expert = torch.zeros(2, 20)
    expert[:, [13, 5, 9]] = 3.0
    lm_head, h = torch.zeros(20, 4), torch.ones(2, 4)
    alpha, beta = torch.full((2,), 0.5), torch.full((2,), 0.5)
    full = triton_backend.contrastive_full(expert, h @ lm_head.T, alpha, beta)
    restricted = triton_backend.contrastive_restricted(expert, h, lm_head, alpha, beta)
    assert full.tokens.tolist() == [5, 5] and restricted.tokens.tolist() == [5, 5]


def test_kernels_compile_for_sm90() -> None:
    """Codegen check without a GPU, in a fresh process (the interpreter patches triton.language
    in this one): lower every kernel to a cubin for an H100 target."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_sm90"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_contrastive_restricted_many_candidates(triton_backend) -> None:
    c = make_cold_case(2, 300, 16, seed=11)
    alpha = torch.full((2,), 1e-30)
    full = reference.contrastive_greedy(c.expert, c.amateur, alpha, c.beta)
    step = triton_backend.contrastive_restricted(c.expert, c.hidden, c.lm_head, alpha, c.beta)
    assert step.tokens.tolist() == full.tolist()
