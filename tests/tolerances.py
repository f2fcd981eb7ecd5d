"""The one tolerance table of the test suite.

Rule (flash-attention's): a kernel's max abs error against the float64 oracle may be at most
``2 x`` the error of the PyTorch reference run at the same precision, plus a floor per dtype that absorbs
harmless differences in accumulation order when PyTorch's own error is tiny.

| dtype    | floor  |
|----------|--------|
| float32  | 1e-5   |
| float16  | 1e-3   |
| bfloat16 | 8e-3   |

Values are scaled by the magnitude of the oracle (``floor * max(1, |oracle|.max())``).
bfloat16 is tested on CUDA only: Triton 3.9's CPU interpreter returns garbage from ``tl.dot`` on bfloat16.
"""

from __future__ import annotations

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_oracle(
    kernel: torch.Tensor, reference: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, name: str = "output"
) -> None:
    """``kernel`` and ``reference`` are the same computation at ``dtype``; ``oracle`` is it in float64."""
    assert kernel.shape == oracle.shape, f"{name}: shape {tuple(kernel.shape)} != oracle {tuple(oracle.shape)}"
    assert torch.isfinite(kernel).all(), f"{name}: kernel output has NaN/inf"
    scale = max(1.0, oracle.abs().max().item())
    ref_err = max_err(reference, oracle)
    ker_err = max_err(kernel, oracle)
    bound = 2.0 * ref_err + FLOOR[dtype] * scale
    assert ker_err <= bound, (
        f"{name} ({dtype}): kernel error {ker_err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"
    )
