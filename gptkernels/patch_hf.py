"""Swap gptkernels' fused layers into a Hugging Face ``GPT2LMHeadModel`` in place (as Liger-Kernel does).

What changes: every LayerNorm becomes :class:`gptkernels.nn.LayerNorm` (sharing the same parameters), the
MLP's ``c_fc`` bias + GELU runs through :func:`gptkernels.ops.bias_gelu`, attention runs through
:func:`gptkernels.ops.attention` (registered as a ``transformers`` attention implementation, so padding masks
fall back to PyTorch's SDPA), and with ``labels`` the LM head and the loss run through
:func:`gptkernels.ops.linear_cross_entropy`; in training mode the logits are then not materialised
(``outputs.logits`` is None), which is where the memory saving comes from.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from . import ops
from .nn import LayerNorm

IMPLEMENTATION = "gptkernels"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _attention_forward(
    module: torch.nn.Module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """``transformers`` attention interface: q, k, v (B, H, T, D) → ((B, T, H, D), no weights)."""
    kernels = getattr(module, "gptkernels_kernels", "auto")
    p = dropout if module.training else 0.0
    if attention_mask is None:
        out = ops.attention(query, key, value, causal=True, dropout_p=p, scale=scaling, backend=kernels)
    else:  # padding: the fused kernel handles causal masks only
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask[..., : key.shape[-2]]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=p, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    try:
        from transformers import AttentionInterface
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError("patch_hf_gpt2 needs transformers >= 4.48 (AttentionInterface)") from e
    AttentionInterface.register(IMPLEMENTATION, _attention_forward)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # None for plain causal: the fused path
    except ImportError:  # pragma: no cover - older transformers build the mask from the implementation name
        pass


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w, b = self.c_fc.weight, self.c_fc.bias  # Conv1D: (in, out)
    h = ops.bias_gelu(hidden_states @ w, b, backend=self.gptkernels_kernels)
    return self.dropout(self.c_proj(h))


def _lm_forward(self, input_ids=None, labels=None, num_items_in_batch=None, logits_to_keep=0, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    kwargs.pop("return_dict", None)
    out = self.transformer(input_ids, return_dict=True, **kwargs)
    hidden = out[0]  # (B, T, C)
    loss = logits = None
    if labels is not None:
        # Implicit shift: position t predicts labels[t + 1].
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1).to(hidden.device)
        loss = ops.linear_cross_entropy(h, self.lm_head.weight, targets, backend=self.gptkernels_kernels)
        if num_items_in_batch is not None:  # Trainer's gradient-accumulation normalisation
            loss = loss * (targets != -100).sum() / num_items_in_batch
    if labels is None or not self.training:
        keep = hidden if not logits_to_keep else hidden[:, -logits_to_keep:]
        logits = self.lm_head(keep)
    rest = {k: v for k, v in out.items() if k != "last_hidden_state"}
    return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, **rest)


def patch_hf_gpt2(model: torch.nn.Module, kernels: str = "auto") -> torch.nn.Module:
    """Swap the fused kernels into ``model`` (a ``transformers.GPT2LMHeadModel``) in place and return it.

    Parameters are shared, not copied: an optimizer built before the patch keeps working.
    """
    if type(model).__name__ != "GPT2LMHeadModel" or not hasattr(model, "transformer"):
        raise TypeError(f"patch_hf_gpt2 expects a transformers GPT2LMHeadModel, got {type(model).__name__}")
    act = getattr(model.config, "activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise ValueError(f"patch_hf_gpt2: the model's activation {act!r} is not GPT-2's tanh GELU")
    _register_attention()
    tr = model.transformer

    def swap(old: torch.nn.LayerNorm) -> LayerNorm:
        new = LayerNorm(old.normalized_shape[0], eps=old.eps, bias=old.bias is not None, kernels=kernels)
        new.weight, new.bias = old.weight, old.bias
        return new

    for block in tr.h:
        block.ln_1, block.ln_2 = swap(block.ln_1), swap(block.ln_2)
        block.attn.gptkernels_kernels = kernels
        block.mlp.gptkernels_kernels = kernels
        block.mlp.forward = types.MethodType(_mlp_forward, block.mlp)
    tr.ln_f = swap(tr.ln_f)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = IMPLEMENTATION
    model.gptkernels_kernels = kernels
    model.forward = types.MethodType(_lm_forward, model)
    return model
