"""The learning-rate schedule and the evaluation cadence, shared by both trainers."""

from __future__ import annotations

import math

FINAL_LR_FRACTION = 0.1  # the cosine ends at 10% of the peak learning rate


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warmup shrinks for short runs: at most 10% of the run."""
    return min(warmup_steps, int(0.1 * total_steps))


def default_eval_steps(total_steps: int) -> int:
    """Without --eval-steps: every 500 steps, but at least four evaluations (plus the one before training)."""
    return min(500, max(1, total_steps // 4))


def lr_factor(step: int, warmup: int, total: int, final: float = FINAL_LR_FRACTION) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear warmup, cosine down
    to ``final`` at ``total``, and ``final`` after it (a run extended past its planned end)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def plan_steps(n_windows: int, global_batch: int, num_epochs: int, max_steps: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: ``num_epochs`` passes, cut at ``max_steps`` (0: no cut)."""
    steps_per_epoch = n_windows // global_batch
    epoch_steps = num_epochs * steps_per_epoch
    return steps_per_epoch, (min(epoch_steps, max_steps) if max_steps else epoch_steps)
