"""The compiled panel GEMM kernel over panel-laid weights (`kernels/cpu_gemm.py`): numerics
against an fp64 reference, the layout, invariance to the batch, the register block and the
threads, huge-page memory, and its place in the engine."""

import gc
from pathlib import Path

import pytest
import torch

from cold_ray.config import EngineConfig
from cold_ray.engine import EngineCore
from cold_ray.kernels import cpu_gemm
from tests.helpers import NO_COMPILER, compiler_present

kernel = cpu_gemm.load()
needs_kernel = pytest.mark.skipif(not compiler_present(), reason=NO_COMPILER)


def _case(seed, rows, k, out, bias=True):
    gen = torch.Generator().manual_seed(seed)
    w, x = torch.randn(out, k, generator=gen), torch.randn(rows, k, generator=gen)
    return w, x, (torch.randn(out, generator=gen) if bias else None)


def _panels(w):
    return cpu_gemm.to_panels([w])[0]


def test_panels_lay_out_sixteen_output_features_per_panel_in_one_buffer():
    w, _, _ = _case(0, 1, 23, 48)
    v, _, _ = _case(1, 1, 700, 2048)  # 5.5 MiB: the buffer spans several huge pages
    panels, skipped, fp64, more = cpu_gemm.to_panels(
        [w, torch.randn(40, 8), torch.randn(32, 8, dtype=torch.float64), v]
    )
    assert skipped is None and fp64 is None  # 40 features: not whole panels; not fp32
    assert panels.shape == (3, 23, 16) and panels.is_contiguous()
    for p, k, j in [(0, 0, 0), (1, 5, 3), (2, 22, 15)]:
        assert panels[p, k, j] == w[16 * p + j, k]
    assert torch.equal(more.transpose(1, 2).reshape(2048, 700), v)
    # one buffer, back to back, each weight's panels 64-byte aligned
    assert more.untyped_storage().data_ptr() == panels.untyped_storage().data_ptr()
    assert more.data_ptr() == panels.data_ptr() + 4 * w.numel() and panels.data_ptr() % 64 == 0


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, 64, 301])  # blocks, remainders
@pytest.mark.parametrize("k, out", [(23, 16), (64, 96), (576, 48), (1536, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64_reference(rows, k, out, bias):
    w, x, b = _case(rows + k, rows, k, out, bias)
    got = kernel(x, _panels(w), b)
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    # fp32 sums of k products in another order: errors grow like sqrt(k) · eps · |x||w|
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6 * k**0.5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_batch_the_block_or_the_threads():
    """Bit for bit: a row alone, in a block, in a 17-row call and in a prefill-sized call of
    300 rows (several chunks of rows) gets the same output, at every register block of rows
    and on 1-4 threads."""
    w, x, b = _case(1, 300, 575, 96)  # odd in-features: the k tail too
    panels = _panels(w)
    batch = kernel(x, panels, b)
    for i in (0, 7, 16, 150, 299):
        assert torch.equal(kernel(x[i : i + 1], panels, b)[0], batch[i]), i
    assert torch.equal(kernel(x[8:16], panels, b), batch[8:16])
    assert torch.equal(kernel(x[3:20], panels, b), batch[3:20])
    for block in range(1, 9):
        for threads in (1, 2, 3, 4):
            other = kernel.with_blocking(row_block=block).with_threads(threads)
            assert torch.equal(other(x, panels, b), batch), (block, threads)
            assert torch.equal(other(x[5:22], panels, b), batch[5:22]), (block, threads)


@needs_kernel
def test_refuses_inputs_it_was_not_built_for():
    w, x, b = _case(2, 2, 32, 32)
    panels = _panels(w)
    with pytest.raises(ValueError, match="fp32"):
        kernel(x.double(), panels, b)
    with pytest.raises(ValueError, match=r"\[rows, 32\]"):  # in features not the weight's
        kernel(x[:, :16], panels, b)
    with pytest.raises(ValueError, match="bias of 32"):
        kernel(x, panels, b[:16])


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "never"


def _huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_huge_page_memory_is_aligned_writable_and_outlives_its_mapping():
    t = cpu_gemm.huge_page_empty(3 * 2**20)  # 12 MiB of fp32
    gc.collect()  # nothing but the tensor holds the mapping
    assert t.numel() == 3 * 2**20 and t.dtype == torch.float32
    t.fill_(2.0)
    assert float(t.sum()) == 6 * 2**20
    if hasattr(__import__("mmap"), "MADV_HUGEPAGE"):
        assert t.data_ptr() % cpu_gemm.HUGE_PAGE == 0
    if _thp_mode() in ("always", "madvise"):  # the kernel honours the advice on this machine
        assert _huge_kib(t.data_ptr()) >= 2048
    small = cpu_gemm.huge_page_empty(100)  # under one huge page: plain torch memory
    assert small.numel() == 100


def test_huge_page_memory_falls_back_to_torch_when_mapping_fails(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(cpu_gemm.mmap, "mmap", refuse)
    t = cpu_gemm.huge_page_empty(2**20)
    assert t.numel() == 2**20 and t.dtype == torch.float32
    assert float(t.fill_(1.0).sum()) == 2**20


def _core(path, **config):
    return EngineCore(EngineConfig(model=str(path), max_rows=4, max_model_len=32, **config))


@needs_kernel
def test_engine_keeps_one_copy_of_the_base_weights_in_panels(tiny_llama):
    """Every projection is served from its panels alone (no row-major weight, no oneDNN
    copy); the LM head is the embedding it is tied to, read by rows."""
    model = _core(tiny_llama).model
    for layer in model.lora_linears():
        assert layer.panels is not None and isinstance(layer.gemm, cpu_gemm.PanelGemmKernel)
        assert layer.weight.numel() == 0 and layer.packed is None
    assert model.gemm is not None and model.lm_packed is None
    hidden = torch.randn(3, model.args.hidden_size)
    assert torch.equal(model.logits(hidden), kernel.by_rows(hidden, model.embed_tokens))
    off = _core(tiny_llama, cpu_gemm_kernel=False).model.layers[0].mlp.down_proj
    assert off.panels is None and off.packed is not None
    assert off.weight.numel() > 0  # small_batch_weights: the row-major copy for 1-2 rows


@needs_kernel
def test_engine_runs_the_kernels_on_num_threads(tiny_llama):
    threads = torch.get_num_threads()
    try:
        model = _core(tiny_llama, num_threads=2).model
        layer = model.layers[0]
        assert layer.mlp.down_proj.gemm.threads == model.gemm.threads == 2  # LM head too
        assert layer.self_attn.decode_kernel.threads == layer.rowwise.threads == 2
    finally:
        torch.set_num_threads(threads)


def _lora_case(seed, rows, k, rank, out, slots=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen)
    A, B = torch.randn(slots, rank, k, generator=gen), torch.randn(slots, out, rank, generator=gen)
    return x, A, B, torch.randn(rows, out, generator=gen)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 32])
@pytest.mark.parametrize(
    "k, rank, out", [(23, 8, 16), (64, 24, 40), (576, 48, 960), (1536, 16, 576)]
)
def test_lora_matches_fp64_reference(rows, k, rank, out):
    """Ranks with and without a tail beyond whole 16-lane vectors, outputs with and without a
    tail beyond whole 16-output blocks."""
    x, A, B, y = _lora_case(rows * rank, rows + 2, k, rank, out)  # rows [1, 1 + rows) of slot 2
    want = y.double()
    want[1 : 1 + rows] += 0.7 * (x[1 : 1 + rows].double() @ A[2].double().T) @ B[2].double().T
    kernel.lora(x, A, B, 2, 0.7, y, 1, 1 + rows)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-6 * (k * rank) ** 0.5)


@needs_kernel
def test_lora_row_results_do_not_depend_on_the_batch_or_the_threads():
    x, A, B, y = _lora_case(5, 19, 576, 48, 960)
    batch = y.clone()
    kernel.lora(x, A, B, 1, 0.5, batch, 0, 19)
    for i in (0, 3, 4, 18):
        alone = y.clone()
        kernel.lora(x, A, B, 1, 0.5, alone, i, i + 1)
        assert torch.equal(alone[i], batch[i]), i
    for threads in (2, 3):
        many = y.clone()
        kernel.with_threads(threads).lora(x, A, B, 1, 0.5, many, 0, 19)
        assert torch.equal(many, batch), threads


@needs_kernel
def test_lora_refuses_what_it_cannot_take():
    x, A, B, y = _lora_case(6, 33, 32, 16, 32)
    with pytest.raises(ValueError, match="up to 32 rows"):
        kernel.lora(x, A, B, 0, 1.0, y, 0, 33)
    x, A, B, y = _lora_case(6, 5, 32, 16, 32)
    for slot, start, end in ((3, 0, 1), (-1, 0, 1), (0, 4, 6), (0, 2, 2)):  # outside the buffers
        with pytest.raises(ValueError, match=f"rows \\[{start}, {end}\\) of x .* slot {slot} "):
            kernel.lora(x, A, B, slot, 1.0, y, start, end)
    with pytest.raises(ValueError, match="rank up to 1024"):
        kernel.lora(x, torch.zeros(1, 1025, 32), torch.zeros(1, 32, 1025), 0, 1.0, y, 0, 1)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel.lora(x, A.transpose(1, 2).contiguous().transpose(1, 2), B, 0, 1.0, y, 0, 1)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel.lora(x.double(), A, B, 0, 1.0, y, 0, 1)


@needs_kernel
@pytest.mark.parametrize(
    "idx, rank",
    [
        ([0], 24),
        ([-1], 24),
        ([2, 2], 24),
        ([1, -1], 24),
        ([-1, 0, 0, -1], 24),
        ([0, -1, 1, -1], 24),
        ([2, 0, 2, 1], 24),
        ([0, 1, 0, 1, 2], 24),
        ([0, -1, 1, -1, 0, -1, 2, -1], 24),  # 4 of 8 interleaved
        ([1, 1, 1, 1, -1, -1, 0, 0, 0, 0, 0], 24),  # runs 4 + 5
        ([2] * 16 + [-1] * 16, 24),  # 16 CoLD pairs' experts
        ([0] * 33, 24),  # a run beyond 32 rows
        ([0, -1], 1056),
    ],
)
def test_grouped_backend_with_the_kernel_matches_the_reference(idx, rank):
    """Runs, gather and base-only plans; a run of 33 rows, 5 interleaved adapter rows, and a
    fused rank over the kernel's 1024 (e.g. q/k/v at max_lora_rank 352), fall back to BLAS.
    Base rows stay untouched, bit for bit."""
    from cold_ray.kernels import select_backend

    gen = torch.Generator().manual_seed(len(idx))
    rows, slots = len(idx), 3
    x = torch.randn(rows, 64, generator=gen)
    A = torch.randn(slots, rank, 64, generator=gen) / rank**0.5
    B = torch.randn(slots, 48, rank, generator=gen)
    scale, y = torch.tensor([0.5, 2.0, 0.25]), torch.randn(rows, 48, generator=gen)
    grouped, reference = select_backend("grouped"), select_backend("reference")
    assert grouped.use_cpu_kernel(kernel) and not reference.use_cpu_kernel(kernel)
    got, want = y.clone(), y.clone()
    grouped.lora_delta(x, A, B, scale, grouped.prepare(idx), got)
    reference.lora_delta(x, A, B, scale, reference.prepare(idx), want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    base = torch.tensor(idx) < 0
    assert torch.equal(got[base], y[base])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 17])
@pytest.mark.parametrize("k, out", [(5, 7), (64, 96), (577, 1001)])
def test_row_major_product_matches_fp64_reference(rows, k, out):
    """The LM head's product over the row-major embedding: output and k tails included."""
    w, x, _ = _case(rows * k, rows, k, out, bias=False)
    torch.testing.assert_close(
        kernel.by_rows(x, w).double(), x.double() @ w.double().T, rtol=1e-5, atol=2e-6 * k**0.5
    )


@needs_kernel
def test_row_major_product_does_not_depend_on_the_batch_the_block_or_the_threads():
    w, x, _ = _case(3, 33, 577, 1001, bias=False)
    batch = kernel.by_rows(x, w)
    for i in (0, 16, 32):
        assert torch.equal(kernel.by_rows(x[i : i + 1], w)[0], batch[i]), i
    for rows in (1, 2, 3, 4):
        for cols in (1, 2, 3, 4):
            for threads in (1, 3):
                other = kernel.with_blocking(dot_rows=rows, dot_cols=cols).with_threads(threads)
                assert torch.equal(other.by_rows(x, w), batch), (rows, cols, threads)


@needs_kernel
def test_row_major_product_refuses_what_it_cannot_take():
    w, x, _ = _case(4, 2, 32, 48, bias=False)
    with pytest.raises(ValueError, match="row-major GEMM kernel"):
        kernel.by_rows(x.double(), w)
    with pytest.raises(ValueError, match="row-major GEMM kernel"):
        kernel.by_rows(x, w[:, :16])
    with pytest.raises(ValueError, match="row-major GEMM kernel"):
        kernel.by_rows(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match="dot_rows must be one of"):
        kernel.with_blocking(dot_rows=5)
