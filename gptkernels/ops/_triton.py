"""Import Triton when it is installed, and stand-ins when it is not.

Triton installs on Linux x86-64 only; elsewhere the package must still import and run the PyTorch
references. The stand-ins let the op modules define their ``@triton.jit`` kernels unconditionally; the
kernels are never launched without Triton because :func:`gptkernels.ops._backend.use_triton` says no.

Triton decides at decoration time whether ``@triton.jit`` builds a compiled or an interpreted kernel, so
``TRITON_INTERPRET=1`` must be set before ``gptkernels`` is imported; ``INTERPRETED`` records the choice.
"""

from __future__ import annotations

import os
import re
from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton does not install
    HAS_TRITON = False

    class _StubTriton:
        @staticmethod
        def jit(fn: Any = None, **_: Any) -> Any:
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_: Any, **__: Any) -> Any:
            return lambda f: f

        @staticmethod
        def heuristics(*_: Any, **__: Any) -> Any:
            return lambda f: f

        @staticmethod
        def Config(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - mirrors triton.Config
            return (args, kwargs)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (n - 1).bit_length())

    class _StubLanguage:
        constexpr = Any

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(f"triton.language.{name} used without triton installed")

    triton = _StubTriton()  # type: ignore[assignment]
    tl = _StubLanguage()  # type: ignore[assignment]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _version() -> tuple[int, int]:
    """(major, minor) of the installed Triton, (0, 0) without it: some register choices differ by version."""
    if not HAS_TRITON:
        return (0, 0)
    parts = [re.match(r"\d*", p).group() for p in triton.__version__.split(".")[:2]]
    return (int(parts[0] or 0), int(parts[1] or 0)) if len(parts) == 2 else (0, 0)


VERSION = _version()

__all__ = ["HAS_TRITON", "INTERPRETED", "VERSION", "tl", "triton"]
