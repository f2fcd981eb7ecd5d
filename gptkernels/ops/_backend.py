"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

``GPTKERNELS_BACKEND=auto|triton|torch`` (default ``auto``) sets the process-wide choice; an op's
``backend=`` argument (what ``GPTConfig.kernels`` passes down) overrides it unless it is ``"auto"``.

- ``torch``: always the PyTorch reference.
- ``triton``: always the kernel; fails loudly if it cannot run (no triton, or a CPU tensor without
  ``TRITON_INTERPRET=1``).
- ``auto``: the kernel on CUDA tensors, and on CPU tensors when Triton's interpreter is on; otherwise the
  reference. An input the kernel cannot take (a dtype or a shape outside its range: the op passes the reason)
  also runs the reference, with a once-per-reason warning; ``triton`` lets the kernel's checks refuse it.

Every kernel launcher calls :func:`record` so that tests can prove the kernel ran, not the reference.
Nothing here touches a GPU at import time.
"""

from __future__ import annotations

import collections
import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from . import _triton
from .utils import TENSOR_TYPES

BACKENDS = ("auto", "triton", "torch")

_launches: collections.Counter[str] = collections.Counter()
_noticed: set[tuple[str, str]] = set()


# os.environ.get costs ~0.6 µs (it encodes the key and decodes the value on every call), a tenth of an op's
# whole host budget: read the raw bytes of os.environ's own store when it is the real one (it is updated by
# every os.environ write, monkeypatch.setenv included), and parse each distinct value once.
_ENVIRON = os.environ
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("GPTKERNELS_BACKEND") if hasattr(os.environ, "encodekey") else None
_env_parsed: dict[Any, str] = {}


def env_backend() -> str:
    if os.environ is _ENVIRON and _ENV_STORE is not None and _ENV_KEY is not None:
        raw = _ENV_STORE.get(_ENV_KEY)
    else:
        raw = os.environ.get("GPTKERNELS_BACKEND")
    value = _env_parsed.get(raw)
    if value is None:
        text = raw.decode() if isinstance(raw, bytes) else raw
        value = (text or "auto").strip().lower() or "auto"
        if value not in BACKENDS:
            raise ValueError(f"GPTKERNELS_BACKEND must be one of {BACKENDS}, got {value!r}")
        _env_parsed[raw] = value
    return value


def triton_available() -> bool:
    return _triton.HAS_TRITON


def interpreter_on() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (decided when gptkernels was imported)."""
    return _triton.INTERPRETED


_DEVICE_TYPES: dict[torch.device, str] = {}


def device_type(device: torch.device) -> str:
    """``device.type``, which costs ~0.23 µs a read (a new str each time; the lookup here ~0.03 µs): every op
    call reads it."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


def why_not_triton(device: torch.device) -> str | None:
    """The reason the Triton kernels cannot run on ``device``, or None when they can."""
    kind = device_type(device)
    if not triton_available():
        return "triton is not installed (it installs on Linux x86-64)"
    if kind == "cuda":
        return None
    if kind == "cpu":
        if interpreter_on():
            return None
        return (
            "tensors are on the CPU and Triton's interpreter is off "
            "(set TRITON_INTERPRET=1 before importing gptkernels to run the kernels on the CPU)"
        )
    return f"Triton kernels do not run on device type {kind!r}"


def use_triton(op: str, device: torch.device, backend: str | None = None, unsupported: str | None = None) -> bool:
    """Decide whether ``op`` runs its Triton kernel for tensors on ``device``.

    ``unsupported``: why the kernel cannot take this particular input (e.g. rows wider than it holds), or None.
    With ``auto`` such an input runs the reference (one warning per op and reason); with ``triton`` this
    returns True and the kernel path's own checks raise their precise error.
    """
    choice = env_backend() if backend is None or backend == "auto" else backend
    if choice == "torch":
        return False
    if choice not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {choice!r}")
    reason = why_not_triton(device)
    if choice == "triton":
        if reason is not None:
            raise RuntimeError(f"{op}: backend 'triton' was requested but cannot run: {reason}")
        return True
    if reason is None and unsupported is not None:
        if (op, unsupported) not in _noticed:
            _noticed.add((op, unsupported))
            warnings.warn(f"{op}: running the PyTorch reference: {unsupported}", stacklevel=3)
        return False
    return reason is None


def is_eager(t: torch.Tensor) -> bool:
    """True in plain eager mode: not traced by torch.compile, no dispatch mode (make_fx, opcheck, fake
    tensors) and no torch.func transform active, and ``t`` a plain tensor (not a FakeTensor, FunctionalTensor
    or other subclass)."""
    return (
        type(t) in TENSOR_TYPES
        and not torch.compiler.is_compiling()
        and _current_dispatch_mode() is None
        and not torch._C._are_functorch_transforms_active()
    )


def eager_apply(function: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``function.apply`` without ``torch.autograd.Function.apply``'s Python layer, for the eager paths only.

    Each op is a ``torch.library`` custom op, which is what torch.compile and opcheck see. Eager calls on plain
    tensors skip it: its dispatch (schema parsing, autograd wrapper, redispatch) costs several times the rest of
    the call on the host. They run an ``autograd.Function`` with the same forward and backward instead, through
    this apply, or the launcher alone when nothing needs a gradient.

    ``Function.apply``'s Python layer binds default arguments (only with a separate ``setup_context``), unwraps
    dead functorch wrappers and routes functorch transforms; the eager paths have already ruled transforms out
    (:func:`is_eager`), and a tensor leaked from one has no storage, so the launch refuses it. That layer costs
    ~1.2 µs of the ~3 µs an apply costs.
    """
    return super(torch.autograd.Function, function).apply  # the C++ apply of torch._C._FunctionBase


def eager(op: Callable[..., Any], direct: Callable[..., Any], t: torch.Tensor) -> Callable[..., Any]:
    """``direct`` (the launcher) in eager mode, else the custom op ``op`` (traced by torch.compile): for backward
    kernels, whose autograd is handled by the caller. ``t``: one of the tensors they will be called with."""
    return direct if is_eager(t) else op


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
