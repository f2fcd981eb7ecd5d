"""Functional ops. Each runs its Triton kernel or its PyTorch reference (see ``_backend``)."""

from ._backend import count_launches, env_backend, use_triton, why_not_triton
from .attention import attention, attention_dropout_mask, attention_reference, dropout_rate, dropout_seed
from .bias_gelu import bias_gelu, bias_gelu_reference
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .layer_norm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference

__all__ = [
    "add_layer_norm",
    "add_layer_norm_reference",
    "attention",
    "attention_dropout_mask",
    "attention_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "count_launches",
    "dropout_rate",
    "dropout_seed",
    "env_backend",
    "layer_norm",
    "layer_norm_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "use_triton",
    "why_not_triton",
]
