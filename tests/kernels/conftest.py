"""Kernel tests: Triton kernels run under the interpreter on CPU (set before their first use)."""

import os

# triton.jit reads this when the kernels are first decorated (lazily, at the first launch).
os.environ.setdefault("TRITON_INTERPRET", "1")
