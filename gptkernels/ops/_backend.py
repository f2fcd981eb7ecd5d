"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

``GPTKERNELS_BACKEND=auto|triton|torch`` (default ``auto``) sets the process-wide choice; an op's
``backend=`` argument (what ``GPTConfig.kernels`` passes down) overrides it unless it is ``"auto"``.

- ``torch``: always the PyTorch reference.
- ``triton``: always the kernel; fails loudly if it cannot run (no triton, or a CPU tensor without
  ``TRITON_INTERPRET=1``).
- ``auto``: the kernel on CUDA tensors, and on CPU tensors when Triton's interpreter is on; otherwise the
  reference.

Every kernel launcher calls :func:`record` so that tests can prove the kernel ran, not the reference.
Nothing here touches a GPU at import time.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")

_launches: collections.Counter[str] = collections.Counter()


def env_backend() -> str:
    value = os.environ.get("GPTKERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"GPTKERNELS_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def triton_available() -> bool:
    from ._triton import HAS_TRITON

    return HAS_TRITON


def interpreter_on() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (decided when gptkernels was imported)."""
    from ._triton import INTERPRETED

    return INTERPRETED


def why_not_triton(device: torch.device) -> str | None:
    """The reason the Triton kernels cannot run on ``device``, or None when they can."""
    if not triton_available():
        return "triton is not installed (it installs on Linux x86-64)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_on():
            return None
        return (
            "tensors are on the CPU and Triton's interpreter is off "
            "(set TRITON_INTERPRET=1 before importing gptkernels to run the kernels on the CPU)"
        )
    return f"Triton kernels do not run on device type {device.type!r}"


def use_triton(op: str, device: torch.device, backend: str | None = None) -> bool:
    """Decide whether ``op`` runs its Triton kernel for tensors on ``device``."""
    choice = backend if backend not in (None, "auto") else env_backend()
    if choice not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return False
    reason = why_not_triton(device)
    if choice == "triton" and reason is not None:
        raise RuntimeError(f"{op}: backend 'triton' was requested but cannot run: {reason}")
    return reason is None


def record(kernel: str) -> None:
    """Count one launch of ``kernel`` (called by every launcher)."""
    _launches[kernel] += 1


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter[str]]:
    """Yield a Counter of the kernel launches made inside the ``with`` block."""
    before = collections.Counter(_launches)
    result: collections.Counter[str] = collections.Counter()
    try:
        yield result
    finally:
        result.update(_launches - before)
