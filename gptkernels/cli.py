"""Command-line helpers shared by ``python -m gptkernels.train``, ``evaluate`` and ``generate``:
one-line errors with exit status 2 instead of tracebacks, and the ``--device`` choice."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch


class UsageError(Exception):
    """A mistake in the command line or its files: reported as one ``error: ...`` line, exit status 2."""


class OutputWriteError(RuntimeError):
    """An output file (checkpoint, metrics, shard) could not be written: disk full, file size limit, permissions.

    Reported as one ``error: ...`` line with exit status 3; what was written before is left whole.
    """


# Errors that describe bad input rather than a bug: one line on stderr, no traceback.
EXPECTED_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``error: ...`` line (status 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def cli_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main(argv)`` and exit: expected errors print ``error: <message>`` and exit 2 (3 for a failed write);
    Ctrl-C exits 130."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `... | head`: the reader is gone, nothing more to say
        sys.stderr.close()
        sys.exit(1)
    except OutputWriteError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(3)
    except EXPECTED_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def read_structured_file(path: Path) -> Any:
    """The contents of a YAML (``.yaml``/``.yml``) or JSON file; ``ValueError("cannot parse: ...")`` if malformed."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as e:
        raise ValueError(f"cannot parse: {' '.join(str(e).split())}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None): cuda when available, else cpu; otherwise the named device, checked."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
    return device
