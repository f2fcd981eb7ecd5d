"""``python -m gptkernels.build``: compile the sampling op now and say what was built and where.

The op is otherwise compiled on the first ``gptkernels.sample`` call; building it ahead of time suits images, CI
and clusters (build once on a node with a compiler; the cache is shared through ``TORCH_EXTENSIONS_DIR``)::

    python -m gptkernels.build            # build (or find) it; exit 1 if it cannot be built
    python -m gptkernels.build --force    # rebuild the cached build (and retry a CUDA build that failed)

A C++ op built by setup.py for this torch (``pip install --no-build-isolation``) is used as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import _extension
from .cli import OneLineErrorParser, cli_main


def build(force: bool = False) -> _extension.ExtensionState:
    """Load the sampling op, compiling it first if needed (``force``: recompile the cached build); its state.

    Call it in a fresh process: a process loads the op once, and ``sample()`` uses that one.
    """
    from . import sampling

    sampling.load_extension(force=force)
    return sampling._STATE


def report(state: _extension.ExtensionState) -> list[str]:
    """What ``python -m gptkernels.build`` prints about ``state``."""
    import torch

    lines = [f"sampling op: {state.describe()}"]
    if not state.loaded:
        lines.append(f"to build it: {state.fix}")
        return lines
    lines.append(f"kernels: CPU{', CUDA for ' + state.cuda_arch_list if state.with_cuda else ''}")
    origin = {
        "prebuilt": "built by setup.py at install time",
        "cached": "built earlier on first use (cached)",
        "built": "built now",
    }[state.origin]
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}); {origin}")
    lines.append(f"library: {state.path}")
    if state.origin != "prebuilt":
        lines.append(f"cache: {_extension.cache_root()} (TORCH_EXTENSIONS_DIR moves it)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineErrorParser(
        prog="python -m gptkernels.build",
        description="Compile gptkernels' C++/CUDA sampling op now (it is otherwise compiled on first use).",
    )
    p.add_argument("--force", action="store_true", help="recompile even if a build is cached; retry a failed one")
    args = p.parse_args(argv)
    state = build(force=args.force)
    print("\n".join(report(state)))
    return 0 if state.loaded else 1


if __name__ == "__main__":
    cli_main(main)
