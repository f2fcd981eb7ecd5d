"""Continuing a run from its newest checkpoint: which options come from it, and what a new command changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import check_model_state, latest_checkpoint, load_checkpoint
from ..cli import UsageError
from .config import FIELDS, MODEL_KEYS, NOT_STORED


def load_resume_state(out_dir: str | Path) -> dict[str, Any]:
    """The newest checkpoint of ``out_dir`` (with ``path``), or a one-line error."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file, not a folder")
    if latest_checkpoint(out) is None:
        raise UsageError(f"--resume: no checkpoint (ckpt_*.pt) in {out} to resume from")
    state = load_checkpoint(out)
    check_model_state(state)  # no config, or weights of another model: one line, before anything is built
    return state


def stored_options(state: dict[str, Any], preset_given: bool) -> dict[str, Any]:
    """The options a checkpoint was trained with; a preset named again drops the stored model sizes."""
    stored = {k: v for k, v in state.get("args", {}).items() if k in FIELDS and k not in NOT_STORED}
    if preset_given:
        stored = {k: v for k, v in stored.items() if k not in MODEL_KEYS}
    return stored


def overridden(options: dict[str, Any], state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{option: (stored value, new value)}`` for every stored option that ``options`` change."""
    stored = state.get("args", {})
    return {k: (stored[k], v) for k, v in options.items() if k in stored and k not in NOT_STORED and stored[k] != v}
