"""Fused LM head + cross-entropy: PyTorch reference, Triton kernels, launchers, registration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import use_triton

# ---------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels and launchers: TODO(issue 4)
# ---------------------------------------------------------------------------------------------------------


def _linear_cross_entropy_triton(hidden, weight, targets, ignore_index):
    raise NotImplementedError("Triton linear+cross-entropy kernel not written yet")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` without holding the logits whole.

    Args:
        hidden: (N, C) final hidden states. weight: (V, C) LM-head (tied embedding) weight.
        targets: (N,) int64 class ids; ``ignore_index`` entries do not count.
    Returns:
        scalar fp32 loss, the mean over counted targets (like ``F.cross_entropy``).
    """
    if use_triton("linear_cross_entropy", hidden.device, backend):
        return _linear_cross_entropy_triton(hidden, weight, targets, ignore_index)
    return linear_cross_entropy_reference(hidden, weight, targets, ignore_index)
