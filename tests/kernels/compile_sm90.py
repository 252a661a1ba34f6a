"""Compile every Triton kernel for sm_90 without a GPU (exit 0 ok, 3 = cannot check here).

Run as `python -m tests.kernels.compile_sm90` with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except Exception as e:  # no triton, or no NVIDIA backend in this triton build
        print(f"cannot compile for CUDA here: {e}")
        return 3

    from cold_ray.kernels import triton_kernels as tk

    target = GPUTarget("cuda", 90, 32)

    def compile_(fn, sig: dict[str, str], consts: dict) -> None:
        src = ASTSource(fn=JITFunction(fn), signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=target)
        if not compiled.asm.get("cubin"):
            raise RuntimeError(f"{fn.__name__}: no cubin")
        print(f"{fn.__name__} {sig.get('x_ptr') or sig.get('b_ptr') or sig.get('e_ptr')}: ok")

    i32 = "i32"
    for dt in ("fp32", "fp16", "bf16"):
        compile_(
            tk._shrink_kernel,
            {
                "x_ptr": f"*{dt}",
                "a_ptr": f"*{dt}",
                "idx_ptr": "*i64",
                "ws_ptr": "*fp32",
                "d_in": i32,
                "rank": i32,
                "k_per_split": i32,
                "stride_xm": i32,
                "stride_as": i32,
                "stride_ar": i32,
                "stride_ws": i32,
                "stride_wm": i32,
                "BLOCK_R": "constexpr",
                "BLOCK_K": "constexpr",
            },
            {"BLOCK_R": 64, "BLOCK_K": 128},
        )
        compile_(
            tk._expand_kernel,
            {
                "ws_ptr": "*fp32",
                "b_ptr": f"*{dt}",
                "idx_ptr": "*i64",
                "scale_ptr": "*fp32",
                "y_ptr": f"*{dt}",
                "d_out": i32,
                "rank": i32,
                "stride_ws": i32,
                "stride_wm": i32,
                "stride_bs": i32,
                "stride_bn": i32,
                "stride_ym": i32,
                "SPLIT_K": "constexpr",
                "BLOCK_R": "constexpr",
                "BLOCK_N": "constexpr",
            },
            {"SPLIT_K": 4, "BLOCK_R": 16, "BLOCK_N": 256},
        )
        compile_(
            tk._cold_full_kernel,
            {
                "e_ptr": f"*{dt}",
                "a_ptr": f"*{dt}",
                "log_alpha_ptr": "*fp32",
                "beta_ptr": "*fp32",
                "tok_ptr": "*i64",
                "score_ptr": "*fp32",
                "vocab": i32,
                "stride_e": i32,
                "stride_a": i32,
                "stride_s": i32,
                "WRITE_SCORES": "constexpr",
                "BLOCK_V": "constexpr",
            },
            {"WRITE_SCORES": dt == "fp32", "BLOCK_V": 1024},
        )
        compile_(
            tk._cold_restricted_kernel,
            {
                "e_ptr": f"*{dt}",
                "ids_ptr": "*i64",
                "mask_ptr": "*u8",
                "h_ptr": f"*{dt}",
                "w_ptr": f"*{dt}",
                "beta_ptr": "*fp32",
                "tok_ptr": "*i64",
                "score_ptr": "*fp32",
                "n_cand": i32,
                "hidden": i32,
                "stride_e": i32,
                "stride_ids": i32,
                "stride_mask": i32,
                "stride_h": i32,
                "stride_w": i32,
                "stride_s": i32,
                "BLOCK_C": "constexpr",
                "BLOCK_H": "constexpr",
            },
            {"BLOCK_C": 32, "BLOCK_H": 256},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
