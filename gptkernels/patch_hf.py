"""Swap gptkernels' fused layers into a Hugging Face ``GPT2LMHeadModel`` in place (as Liger-Kernel does).

What changes: every LayerNorm becomes :class:`gptkernels.nn.LayerNorm` (sharing the same parameters), the
MLP's ``c_fc`` bias + GELU runs through :func:`gptkernels.ops.bias_gelu`, attention runs through
:func:`gptkernels.ops.attention` (registered as a ``transformers`` attention implementation, so padding masks
fall back to PyTorch's SDPA), and in training mode with ``labels`` the LM head and the loss run through
:func:`gptkernels.ops.linear_cross_entropy`: the logits are then not materialised (``outputs.logits`` is None),
which is where the memory saving comes from. The patched ``forward`` takes every argument of the original (and
is the original outside that one case), so ``generate`` with masks, left padding and the cache is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Callable, Iterator
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


def _make_lm_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """A forward for the model's class-level ``original`` forward that takes exactly its arguments.

    In training mode with ``labels`` (what ``Trainer`` calls), the LM head and the loss run fused: the original
    forward runs with ``labels=None`` while the LM head only hands over its input, then
    :func:`gptkernels.ops.linear_cross_entropy` computes the loss and ``logits`` is None. Every other call is the
    original forward itself, so generation (attention masks, left padding, position ids, the cache) and
    evaluation give exactly the unpatched outputs. The signature is the original's: ``generate`` inspects it.
    """
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)  # a wrong argument fails as it would unpatched
        call = bound.arguments
        extra = call.setdefault(var_keyword, {}) if var_keyword else {}
        labels = call.get("labels")
        fused = (
            self.training
            and labels is not None
            and not call.get("logits_to_keep")
            and var_keyword is not None
            and not ({"shift_labels", "ignore_index"} & extra.keys())
        )
        if not fused:
            return original(*bound.args, **bound.kwargs)
        return_dict = extra.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        num_items = extra.get("num_items_in_batch")
        call["labels"] = None
        extra["return_dict"] = True
        with _head_input(self.lm_head) as captured:
            out = original(*bound.args, **bound.kwargs)
        hidden = captured[0]  # (B, T, C)
        # Implicit shift, as transformers' ForCausalLMLoss: position t predicts labels[t + 1].
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1).to(hidden.device)
        loss = ops.linear_cross_entropy(h, self.lm_head.weight, targets, backend=self.gptkernels_kernels)
        if num_items is not None:  # Trainer's gradient-accumulation normalisation: a sum over num_items
            loss = loss * (targets != -100).sum() / num_items
        result = type(out)(**{**{k: v for k, v in out.items() if k != "logits"}, "loss": loss})
        return result if return_dict else result.to_tuple()

    forward.gptkernels_patched = True
    return forward


@contextlib.contextmanager
def _head_input(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, ``head(x)`` records ``x`` and returns an empty (..., 0) tensor instead of the logits."""
    captured: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        captured.append(x)
        return x.new_empty(*x.shape[:-1], 0)

    had_own = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = record
    try:
        yield captured
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.forward


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
    if not getattr(model.forward, "gptkernels_patched", False):  # patched twice: keep the first wrapper
        model.forward = types.MethodType(_make_lm_forward(type(model).forward), model)
    return model
