"""Drop-in modules backed by the fused ops.

Each module has the constructor and state dict of the PyTorch layer it replaces, plus a ``kernels``
attribute ("auto" | "triton" | "torch") passed to the ops; changing it never changes the parameters, so a
model trained with one setting loads and runs with another.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import KERNEL_CHOICES


def _check_kernels(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    return kernels


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the last dimension, computed by the fused kernel."""

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-5,
        bias: bool = True,
        *,
        kernels: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, bias=bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"LayerNorm normalises the last dimension only, got shape {self.normalized_shape}")
        self.kernels = _check_kernels(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.kernels)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = x + residual`` and ``self(s)`` fused; returns ``(s, normed)``."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, backend=self.kernels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernels={self.kernels!r}"


class LinearGELU(nn.Linear):
    """``gelu_tanh(x @ W.T + b)``: an ``nn.Linear`` whose bias add is fused into the activation."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, kernels: str = "auto", device=None, dtype=None
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.kernels = _check_kernels(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.bias_gelu(F.linear(x, self.weight), self.bias, backend=self.kernels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernels={self.kernels!r}"


class KVCache:
    """Keys and values of one attention layer for incremental decoding, preallocated to ``max_len``."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, *, device, dtype) -> None:
        self.k = torch.empty(batch, n_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) new keys/values; return views of everything cached so far."""
        end = self.length + k.shape[-2]
        if end > self.k.shape[-2]:
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.k.shape[-2]}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """GPT-2's multi-head causal self-attention (``c_attn`` → fused attention → ``c_proj``)."""

    def __init__(
        self, emb_dim: int, n_heads: int, dropout: float = 0.0, qkv_bias: bool = True, *, kernels: str = "auto"
    ) -> None:
        super().__init__()
        if emb_dim % n_heads != 0:
            raise ValueError(f"emb_dim ({emb_dim}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.head_dim = emb_dim // n_heads
        self.dropout = dropout
        self.kernels = _check_kernels(kernels)
        self.c_attn = nn.Linear(emb_dim, 3 * emb_dim, bias=qkv_bias)
        self.c_proj = nn.Linear(emb_dim, emb_dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, C) → (B, T, C). With ``kv_cache``, x holds only the new positions."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, nh, T_cached, hs)
        p = self.dropout if self.training else 0.0
        y = ops.attention(q, k, v, causal=True, dropout_p=p, scale=1.0 / math.sqrt(self.head_dim), backend=self.kernels)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class LMHeadLoss(nn.Module):
    """Mean cross-entropy of ``hidden @ weight.T`` without materialising the (tokens × vocab) logits."""

    def __init__(self, ignore_index: int = -100, *, kernels: str = "auto") -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.kernels = _check_kernels(kernels)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (..., C), weight (V, C), targets (...) int64 → scalar fp32 loss."""
        return ops.linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), self.ignore_index, backend=self.kernels
        )


def set_kernels(module: nn.Module, kernels: str) -> None:
    """Switch every gptkernels layer inside ``module`` to ``kernels`` ("auto" | "triton" | "torch")."""
    _check_kernels(kernels)
    for m in module.modules():
        if isinstance(m, LayerNorm | LinearGELU | CausalSelfAttention | LMHeadLoss):
            m.kernels = kernels


__all__ = ["CausalSelfAttention", "KVCache", "LMHeadLoss", "LayerNorm", "LinearGELU", "set_kernels"]
