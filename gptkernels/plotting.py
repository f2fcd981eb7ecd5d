"""The loss picture of a training run: train and validation loss against tokens seen."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (a line cut short by a crash is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_losses(metrics: str | Path | Iterable[dict[str, Any]], out_png: str | Path, title: str | None = None) -> Path:
    """Draw train loss (line) and validation loss (dots) against tokens seen into ``out_png``.

    ``metrics`` is a ``metrics.jsonl`` path or its rows: train rows carry ``tokens`` and ``train_loss``,
    evaluation rows ``tokens`` and ``val_loss``. Uses matplotlib's Agg canvas directly, so it never needs a
    display and never changes the process-wide backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics) if isinstance(metrics, str | Path) else list(metrics)
    train = [(r["tokens"], r["train_loss"]) for r in rows if "train_loss" in r and "tokens" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r and "tokens" in r]

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", markersize=5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title or "training loss")
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    if train or val:
        ax.legend()
    fig.tight_layout()
    from .checkpoint import atomic_write_bytes  # a crash mid-write leaves the previous picture

    return atomic_write_bytes(out_png, lambda f: fig.savefig(f, format="png"))


__all__ = ["plot_losses", "read_metrics"]
