"""Log-likelihood of continuations given contexts, batched: the one scoring loop under multiple choice and lm-eval.

Each request is ``(context_ids, continuation_ids)``. Sequences are cut from the left to the model's context
length (plus the one token that is only a target), sorted longest first, padded on the right and run in
batches; causal attention means the padding never changes a real position's logits. Only the continuation's
positions are read, so the result is exactly the sum of ``log p(token | everything before it)`` over the
continuation, as Hugging Face's ``HFLM._loglikelihood_tokens`` computes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    device: Any = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[float, bool]]:
    """``(sum of log-probabilities, greedy)`` of every continuation given its context.

    Args:
        model: a :class:`gptkernels.GPT`, called as ``model(x)`` for (B, T, vocab) logits.
        requests: ``(context_ids, continuation_ids)`` pairs; the context needs at least one token (use the
            end-of-text id for "no context"), the continuation at least one and at most ``context_length``.
        batch_size: sequences per forward pass.
        device: where to run (default: the model's device).
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (None: fp32).
        progress: called as ``progress(requests_done, requests_total)``.
    Returns:
        One ``(logprob, greedy)`` per request, in order: ``logprob`` is in nats (a float64 sum of fp32
        log-softmax values); ``greedy`` is True when every continuation token is the argmax.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    ctx_len = model.config.context_length
    rows: list[tuple[list[int], list[int]]] = []  # (input ids, continuation ids: the last inputs' targets)
    for i, (context, continuation) in enumerate(requests):
        context, continuation = [int(t) for t in context], [int(t) for t in continuation]
        if not context:
            raise ValueError(f"request {i}: the context is empty; start it with the end-of-text token")
        if not continuation:
            raise ValueError(f"request {i}: the continuation is empty (nothing to score)")
        if len(continuation) > ctx_len:
            raise ValueError(
                f"request {i}: the continuation has {len(continuation)} tokens, more than the context length {ctx_len}"
            )
        whole = (context + continuation)[-(ctx_len + 1) :]
        rows.append((whole[:-1], continuation))

    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: little padding per batch
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = len(rows[batch[0]][0])
            x = torch.zeros(len(batch), width, dtype=torch.long)  # right padding: never seen by real positions
            for r, i in enumerate(batch):
                x[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            with amp:
                logits = model(x.to(device))  # (B, width, vocab)
            for r, i in enumerate(batch):
                inp, continuation = rows[i]
                n = len(continuation)
                logp = logits[r, len(inp) - n : len(inp)].float().log_softmax(-1)  # (n, vocab)
                target = torch.tensor(continuation, device=logp.device)
                total = float(logp.gather(-1, target[:, None]).double().sum())
                results[i] = (total, bool((logp.argmax(-1) == target).all()))
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return results


__all__ = ["score_continuations"]
