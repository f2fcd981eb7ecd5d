"""gptkernels: Triton and C++/CUDA kernels for GPT-2-style models, and the model, data and training around them.

Importing the package touches no GPU; Triton's CPU interpreter is used only when ``TRITON_INTERPRET=1`` is set
before this import.
"""

from __future__ import annotations

from typing import Any

from .config import GPTConfig
from .generation import generate_text
from .model import GPT

__version__ = "0.1.0"

_LAZY = {
    "get_tokenizer": ("tokenizer", "get_tokenizer"),
    "sample": ("sampling", "sample"),
    "check_sampled": ("sampling", "check_sampled"),
    "patch_hf_gpt2": ("patch_hf", "patch_hf_gpt2"),
}


def __getattr__(name: str) -> Any:
    # Heavy or optional pieces (tiktoken, the compiled extension, transformers) load on first use.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GPT",
    "GPTConfig",
    "check_sampled",
    "generate_text",
    "get_tokenizer",
    "patch_hf_gpt2",
    "sample",
    "__version__",
]
