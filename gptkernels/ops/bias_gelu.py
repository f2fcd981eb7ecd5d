"""Bias + tanh-GELU (GPT-2's MLP activation): PyTorch reference, Triton kernels, launchers, registration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import use_triton

# ---------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


# ---------------------------------------------------------------------------------------------------------
# Triton kernels and launchers: TODO(issue 4)
# ---------------------------------------------------------------------------------------------------------


def _bias_gelu_triton(x, bias):
    raise NotImplementedError("Triton bias+GELU kernel not written yet")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, *, backend: str | None = None) -> torch.Tensor:
    """``gelu_tanh(x + bias)``.

    Args:
        x: (..., N) pre-activation without bias (the output of ``x @ W.T``).
        bias: (N,) or None.
    Returns:
        (..., N), the dtype of ``x``.
    """
    if use_triton("bias_gelu", x.device, backend):
        return _bias_gelu_triton(x, bias)
    return bias_gelu_reference(x, bias)
