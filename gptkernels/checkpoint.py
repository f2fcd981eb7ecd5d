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
SIGKILL) leaves every earlier checkpoint whole. A write that fails (disk full, file size limit) raises
:class:`gptkernels.cli.OutputWriteError` naming the file. Only the newest ``keep`` checkpoints are kept; the newest
is found by scanning the folder for ``ckpt_*.pt``.

Integrity: every checkpoint stores ``checksum``, a SHA-256 over all it holds (tensors' dtypes, shapes and bytes,
numbers, strings, keys), checked on every load, so a damaged file (a flipped bit on disk, a bad copy) is refused
with its name and the previous good checkpoint instead of loading changed weights. :func:`check_model_state`
checks a checkpoint's config and weight shapes against each other before any model is allocated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import random
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
FORMAT = "gptkernels-checkpoint"
VERSION = 2  # 2: with a checksum (version 1 files, written before it, load without one)
CHECKSUM_KEY = "checksum"


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


# torch.save's C++ writer reports a failed write() as a RuntimeError from its zip writer (inline_container.cc).
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")


def _is_write_failure(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno is not None  # a system call failed (not an error raised by our own checks)
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILURES)


@contextlib.contextmanager
def output_errors(path: str | Path) -> Iterator[None]:
    """Turn a failed write inside the block (``OSError``: disk full, file size limit, permissions; torch's
    zip-writer ``RuntimeError``) into :class:`gptkernels.cli.OutputWriteError` naming ``path``."""
    from .cli import OutputWriteError

    try:
        yield
    except OutputWriteError:
        raise
    except (OSError, RuntimeError) as e:
        if not _is_write_failure(e):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            reason += " (disk full or file size limit)"
        raise OutputWriteError(f"cannot write {path}: {reason}; files written before are unchanged") from e


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask alone must set it to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, write: Any) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then make it ``path`` in one rename.

    Readers (and a crash at any point) see either the old file or the complete new one, never a partial one.
    A failed write raises :class:`gptkernels.cli.OutputWriteError` naming ``path``; the temporary file is removed.
    """
    path = Path(path)
    folder = path.parent
    with output_errors(path):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
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
    state.pop(CHECKSUM_KEY, None)
    state[CHECKSUM_KEY] = state_checksum(state)
    if folder.is_dir():
        _remove_stale_temps(folder)
    path = atomic_torch_save(state, folder / checkpoint_name(step))
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the newest intact one of an output folder (``weights_only=True``).

    Every file is checked against its checksum. A damaged file named directly is a ``ValueError`` naming it and
    the previous good checkpoint of its folder; in a folder, a damaged newest file is skipped with a warning
    that names both. Returns the state dict with ``path`` (the file loaded, as a string) added.
    """
    p = Path(path)
    candidates = list(reversed(list_checkpoints(p))) if p.is_dir() else [resolve_checkpoint(p)]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in folder {p}")
    errors = []
    for i, c in enumerate(candidates):
        state, problem = _read_verified(c, map_location)
        if state is not None:
            state["path"] = str(c)
            return state
        errors.append(f"{c.name}: {problem}")
        if len(candidates) > 1 and i + 1 < len(candidates):
            warnings.warn(
                f"skipping unreadable checkpoint {c}: {problem}; trying the previous one, {candidates[i + 1].name}",
                stacklevel=2,
            )
    hint = ""
    if not p.is_dir():
        good = previous_good_checkpoint(candidates[0])
        hint = f"; the previous good checkpoint is {good}" if good else "; no earlier good checkpoint beside it"
    raise ValueError(f"cannot load a checkpoint from {p}: " + "; ".join(errors) + hint)


def _read_verified(path: Path, map_location: Any = "cpu") -> tuple[dict[str, Any] | None, str | None]:
    """(state, None) for an intact checkpoint file, else (None, what is wrong)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged file, or one that is not ours
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None, "not a gptkernels training checkpoint"
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is None:
        if state.get("version") == 1:
            return state, None  # written before checksums existed
        return None, "damaged: it has no checksum"
    if stored != state_checksum(state):
        return None, "damaged: its contents do not match the checksum stored in it (a changed byte on disk?)"
    return state, None


def previous_good_checkpoint(path: str | Path) -> Path | None:
    """The newest intact checkpoint of ``path``'s folder older than ``path`` (checked by loading it), or None."""
    path = Path(path)
    older = [c for c in list_checkpoints(path.parent) if c.name != path.name]
    m = CKPT_RE.match(path.name)
    if m:
        older = [c for c in older if int(CKPT_RE.match(c.name).group(1)) < int(m.group(1))]
    for c in reversed(older):
        if _read_verified(c)[0] is not None:
            return c
    return None


def state_checksum(state: Any) -> str:
    """``sha256:<hex>`` over everything in ``state``: dict keys and values in order of their keys, sequences in
    order, tensors' dtypes, shapes and bytes, and the type and ``repr`` of every number and string."""
    h = hashlib.sha256()
    _feed(h, state)
    return "sha256:" + h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the bytes themselves, not a copy
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, list | tuple):  # one tag: a tuple may come back from a file as either
        h.update(f"L{len(obj)}:".encode())
        for item in obj:
            _feed(h, item)
    else:
        text = repr(obj)
        h.update(f"S{type(obj).__name__}{len(text)}:{text}".encode())


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


# A checkpoint whose tensors add up to more than this is refused before anything is allocated (gpt2-xl: 6.2 GB).
MAX_MODEL_BYTES = 1 << 40


def check_model_state(state: dict[str, Any], label: str | None = None) -> Any:
    """The :class:`GPTConfig` of a loaded checkpoint, after checking that its ``model`` weights are exactly what
    that config builds (names and shapes, on the meta device: nothing is allocated), so a checkpoint without a
    config, with an impossible one, or with weights of another model is one ``ValueError`` naming the file."""
    from .config import GPTConfig
    from .model import GPT

    where = label or state.get("path") or "checkpoint"
    cfg_dict, weights = state.get("config"), state.get("model")
    if not isinstance(cfg_dict, dict):
        raise ValueError(f"{where}: no model config in the checkpoint; it cannot be loaded as a model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{where}: no model weights (a 'model' dict of tensors) in the checkpoint")
    try:
        cfg = GPTConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad model config: {e}") from None
    # From the config alone first: even on the meta device, a billion layers would take forever to build.
    c = cfg
    n_params = (c.vocab_size * (1 if c.tie_embeddings else 2) + c.context_length) * c.emb_dim
    n_params += c.n_layers * (12 * c.emb_dim**2 + 13 * c.emb_dim)
    if n_params * 4 > MAX_MODEL_BYTES:
        gb = n_params * 4 / 1e9
        raise ValueError(f"{where}: the config describes a model of {gb:,.0f} GB in fp32; refusing to build it")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = [f"{k} {got[k]} (config: {expected[k]})" for k in expected if k in got and got[k] != expected[k]]
    if missing or extra or wrong:
        parts = [f"missing {', '.join(missing[:3])}"] if missing else []
        parts += [f"unexpected {', '.join(extra[:3])}"] if extra else []
        parts += [f"shape of {', '.join(wrong[:3])}"] if wrong else []
        raise ValueError(f"{where}: the weights do not match the checkpoint's config: " + "; ".join(parts))
    return cfg


def model_from_state(state: dict[str, Any], device: Any = "cpu", kernels: str | None = None):
    """Build the :class:`GPT` of a loaded checkpoint dict, weights loaded, in eval mode (checked first by
    :func:`check_model_state`)."""
    from .model import GPT

    cfg = check_model_state(state)
    if kernels is not None:
        cfg = dataclasses.replace(cfg, kernels=kernels)  # validated like every field
    model = GPT(cfg)
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
    "check_model_state",
    "checkpoint_name",
    "get_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "model_from_state",
    "output_errors",
    "previous_good_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_rng_state",
    "state_checksum",
    "tokenizer_from_state",
]
