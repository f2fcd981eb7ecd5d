"""Causal flash attention with dropout: PyTorch reference, Triton kernels, launchers, registration."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import use_triton

# ---------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------


def causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(tq, tk) bool, True where query i may see key j; aligned to the end when tq < tk (KV-cache decoding)."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    return j <= i


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    dropout_p: float = 0.0,
    scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Materialising attention, the oracle for the kernel.

    ``dropout_mask`` (B, H, Tq, Tk) bool, True = kept, replaces random dropout so that tests can compare the
    kernel with the reference under the same mask; kept probabilities are scaled by ``1 / (1 - dropout_p)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return p @ v


def attention_torch(q, k, v, causal: bool, dropout_p: float, scale: float | None) -> torch.Tensor:
    """The fast PyTorch path: SDPA, with an explicit end-aligned mask when q is shorter than k."""
    tq, tk = q.shape[-2], k.shape[-2]
    if not causal or tq == tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and tq > 1, scale=scale)
    mask = causal_mask(tq, tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels and launchers: TODO(issue 4)
# ---------------------------------------------------------------------------------------------------------


def _attention_triton(q, k, v, causal, dropout_p, scale):
    raise NotImplementedError("Triton attention kernel not written yet")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    dropout_p: float = 0.0,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, flash style.

    Args:
        q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tq <= Tk (the causal mask is aligned to the end).
        causal: mask future keys. dropout_p: attention dropout (pass 0.0 in eval).
        scale: softmax scale, default 1/sqrt(D).
    Returns:
        (B, H, Tq, D), the dtype of ``q``.
    """
    if use_triton("attention", q.device, backend):
        return _attention_triton(q, k, v, causal, dropout_p, scale)
    return attention_torch(q, k, v, causal, dropout_p, scale)
