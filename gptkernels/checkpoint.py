"""Training checkpoints that survive a crash, and loading a trained model back.

A checkpoint is one ``torch.save`` file, ``ckpt_<step>.pt`` in the run's output folder, holding only tensors,
numbers, strings, lists and dicts, so that it loads with ``torch.load(weights_only=True)``:

- ``model``, ``optimizer``, ``scheduler``, ``scaler``: the state dicts;
- ``step``, ``epoch``, ``batch_index`` (position in the epoch's seeded permutation), ``tokens``;
- ``rng``: one dict per rank with the torch CPU, CUDA (when used), numpy and Python generator states;
- ``config`` (:class:`GPTConfig` as a dict), ``tokenizer`` (a spec for ``tokenizer_from_spec``), ``args``
  (the training options) and anything else the trainer adds.

Writes are atomic: the file is written under a temporary name in the same folder, flushed and fsynced, renamed
over the final name with ``os.replace`` and the folder fsynced, so a process killed at any moment (even with
SIGKILL) leaves every earlier checkpoint whole. Only the newest ``keep`` checkpoints are kept; the newest is
found by scanning the folder for ``ckpt_*.pt``.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
FORMAT = "gptkernels-checkpoint"
VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:06d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest first (by step). Temporary files of interrupted writes are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    ckpts = list_checkpoints(folder)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest checkpoint of a training output folder."""
    p = Path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in folder {p}")
        return latest
    if not p.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {p}")
    return p


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, write: Any) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then make it ``path`` in one rename.

    Readers (and a crash at any point) see either the old file or the complete new one, never a partial one.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write_bytes(path, lambda f: torch.save(obj, f))


def _remove_stale_temps(folder: Path) -> None:
    # Left behind only when a process was killed mid-write; never a complete checkpoint.
    for p in folder.glob(".ckpt_*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


def save_checkpoint(folder: str | Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (which must hold ``step``) as ``folder/ckpt_<step>.pt``; keep the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    folder = Path(folder)
    step = int(state["step"])
    state = {"format": FORMAT, "version": VERSION, **state}
    if folder.is_dir():
        _remove_stale_temps(folder)
    path = atomic_torch_save(state, folder / checkpoint_name(step))
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the newest loadable one of an output folder (``weights_only=True``).

    Returns the state dict with ``path`` (the file loaded, as a string) added.
    """
    p = Path(path)
    candidates = list(reversed(list_checkpoints(p))) if p.is_dir() else [resolve_checkpoint(p)]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in folder {p}")
    errors = []
    for c in candidates:
        try:
            state = torch.load(c, map_location=map_location, weights_only=True)
        except Exception as e:  # a damaged file: fall back to the previous checkpoint of the folder
            errors.append(f"{c.name}: {type(e).__name__}: {e}")
            if len(candidates) > 1:
                warnings.warn(f"skipping unreadable checkpoint {c}: {e}", stacklevel=2)
            continue
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            errors.append(f"{c.name}: not a gptkernels training checkpoint")
            continue
        state["path"] = str(c)
        return state
    raise ValueError(f"cannot load a checkpoint from {p}: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------------------
# Random number generator states, as tensors and numbers (weights_only-loadable)
# ---------------------------------------------------------------------------------------------------------


def get_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """The torch CPU, CUDA (of ``device``, when it is a CUDA device), numpy and Python generator states."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss_next},
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------------------
# A trained model back from a checkpoint
# ---------------------------------------------------------------------------------------------------------


def model_from_state(state: dict[str, Any], device: Any = "cpu", kernels: str | None = None):
    """Build the :class:`GPT` of a loaded checkpoint dict, weights loaded, in eval mode."""
    from .config import GPTConfig
    from .model import GPT

    cfg = dict(state["config"])
    if kernels is not None:
        cfg["kernels"] = kernels
    model = GPT(GPTConfig.from_dict(cfg))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def tokenizer_from_state(state: dict[str, Any]):
    from .tokenizer import get_tokenizer, tokenizer_from_spec

    spec = state.get("tokenizer")
    return tokenizer_from_spec(spec) if spec is not None else get_tokenizer("gpt2")


def load_model(path: str | Path, device: Any = "cpu", kernels: str | None = None):
    """``(model, tokenizer)`` from a checkpoint file or a training output folder (its newest checkpoint).

    ``kernels`` overrides the setting stored in the checkpoint ("auto" | "triton" | "torch").
    """
    state = load_checkpoint(path, map_location="cpu")
    return model_from_state(state, device=device, kernels=kernels), tokenizer_from_state(state)


__all__ = [
    "atomic_torch_save",
    "atomic_write_bytes",
    "checkpoint_name",
    "get_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "model_from_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_rng_state",
    "tokenizer_from_state",
]
