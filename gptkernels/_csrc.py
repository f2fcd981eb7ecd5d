"""What the compiled sampling op is built from and with: one place for setup.py (ahead of time) and
gptkernels._extension (on first use), so both builds use the same sources and flags.

Standard library only: setup.py loads this file by path, before torch or the package can be imported.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

CPU_SOURCES = ("sampling.cpp",)
CUDA_SOURCES = ("sampling_cuda.cu",)
HEADERS = ("sampling.h",)
CUDA_DEFINE = "GPTKERNELS_WITH_CUDA"  # sampling.cpp sets _C.WITH_CUDA from it
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"  # A100, A10/3090, L4/4090, H100 (+PTX: newer GPUs JIT it)
NVCC_FLAGS = ("-O3", "--fmad=false", "-lineinfo")
RECORD = "_C_build.json"  # written by setup.py next to gptkernels/_C*.so: what that build was made for


def cxx_flags(platform: str = sys.platform) -> list[str]:
    """Host compiler flags for csrc/sampling.cpp (and the host side of the CUDA file)."""
    if platform == "win32":
        return ["/O2", "/fp:precise", "/openmp"]
    flags = ["-O3", "-DNDEBUG", "-ffp-contract=off", "-fvisibility=hidden"]
    if platform.startswith("linux"):
        # at::parallel_for is inline: without OpenMP in *this* object the rows run on one thread.
        flags.append("-fopenmp")
    return flags


def link_flags(platform: str = sys.platform) -> list[str]:
    return ["-fopenmp"] if platform.startswith("linux") else []


def source_dir(package_dir: Path) -> Path | None:
    """The folder with the C++/CUDA sources: ``gptkernels/csrc`` in an installed wheel (setup.py copies them
    there), else ``csrc/`` beside the package in a source checkout or an editable install."""
    for d in (package_dir / "csrc", package_dir.parent / "csrc"):
        if all((d / f).is_file() for f in (*CPU_SOURCES, *CUDA_SOURCES, *HEADERS)):
            return d
    return None


def source_hash(csrc: Path) -> str:
    """SHA-256 of every source and header (names and contents): a build from other sources is stale."""
    h = hashlib.sha256()
    for name in sorted((*CPU_SOURCES, *CUDA_SOURCES, *HEADERS)):
        h.update(name.encode() + b"\0" + (csrc / name).read_bytes() + b"\0")
    return h.hexdigest()


def torch_identity(torch) -> dict:
    """What a build of the op depends on in the running ``torch`` module: a library built for another is not loaded."""
    return {
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
    }
