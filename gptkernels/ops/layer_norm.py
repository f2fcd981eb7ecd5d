"""LayerNorm and residual-add + LayerNorm: PyTorch reference, Triton kernels, launchers, registration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import use_triton

# ---------------------------------------------------------------------------------------------------------
# Reference (the CPU path and the test oracle)
# ---------------------------------------------------------------------------------------------------------


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels and launchers: TODO(issue 4)
# ---------------------------------------------------------------------------------------------------------


def _layer_norm_triton(x, weight, bias, eps):
    raise NotImplementedError("Triton LayerNorm kernel not written yet")


def _add_layer_norm_triton(x, residual, weight, bias, eps):
    raise NotImplementedError("Triton add+LayerNorm kernel not written yet")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5, *, backend: str | None = None
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` (any leading shape), statistics in fp32.

    Args:
        x: (..., N) activations, fp32/fp16/bf16.
        weight: (N,) scale. bias: (N,) shift or None.
        eps: added to the variance.
        backend: "auto" | "triton" | "torch" or None (the ``GPTKERNELS_BACKEND`` default).
    Returns:
        (..., N), the dtype of ``x``.
    """
    if use_triton("layer_norm", x.device, backend):
        return _layer_norm_triton(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and ``layer_norm(s)`` in one pass; returns ``(s, normed)``, both shaped like ``x``."""
    if use_triton("add_layer_norm", x.device, backend):
        return _add_layer_norm_triton(x, residual, weight, bias, eps)
    return add_layer_norm_reference(x, residual, weight, bias, eps)
