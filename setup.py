"""Builds the compiled sampling op, ``gptkernels._C``, against the torch that is ALREADY installed.

Metadata (name, version, dependencies) lives in pyproject.toml; this file only adds the extension. Install with

    pip install --no-build-isolation -e .

``--no-build-isolation`` matters: pyproject.toml deliberately does not list torch as a build requirement (pip would
fetch a second, multi-GB torch into a throw-away build environment), so the build must see the installed one.
Without it, or without torch, the package installs without the extension and ``gptkernels.sample`` runs its
PyTorch implementation (it says so once).

What is built:
- always (when torch is importable): ``csrc/sampling.cpp``, the CPU kernel, with ``CppExtension``;
- plus ``csrc/sampling_cuda.cu`` with ``CUDAExtension`` when torch was built with CUDA and nvcc is found
  (``CUDA_HOME`` or nvcc on PATH). Architectures: ``TORCH_CUDA_ARCH_LIST``, default "8.0;8.6;8.9;9.0+PTX".

Environment switches:
    GPTKERNELS_SKIP_EXTENSION=1   build nothing (pure-Python install)
    GPTKERNELS_SKIP_CUDA=1        CPU kernel only, even where CUDA is available
    GPTKERNELS_FORCE_CUDA=1       build the CUDA kernel even if the checks above fail (e.g. CUDA_HOME unset on a
                                  build machine with a CUDA torch); errors out clearly if it cannot
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

CSRC = "csrc"
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"  # A100, A10/3090, L4/4090, H100 (+PTX: newer GPUs JIT it)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\ngptkernels setup.py: WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def _want_cuda(torch, cuda_home: str | None) -> bool:
    if _flag("GPTKERNELS_SKIP_CUDA"):
        return False
    force = _flag("GPTKERNELS_FORCE_CUDA")
    if torch.version.cuda is None:
        if force:
            sys.exit(
                "gptkernels setup.py: GPTKERNELS_FORCE_CUDA=1 but the installed torch "
                f"({torch.__version__}) was built without CUDA; install a CUDA build of torch first."
            )
        return False
    if cuda_home is None:
        if force:
            sys.exit(
                "gptkernels setup.py: GPTKERNELS_FORCE_CUDA=1 but no CUDA toolkit was found; "
                "set CUDA_HOME to it (the folder with bin/nvcc)."
            )
        _warn(
            f"torch {torch.__version__} has CUDA {torch.version.cuda} but nvcc was not found (set CUDA_HOME): "
            "building the CPU kernel only; CUDA tensors will use the PyTorch fallback."
        )
        return False
    return True


def _extensions():
    """(ext_modules, cmdclass): empty when the extension is skipped or torch is missing."""
    if _flag("GPTKERNELS_SKIP_EXTENSION"):
        print("gptkernels setup.py: GPTKERNELS_SKIP_EXTENSION=1, installing without the compiled op", flush=True)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _warn(
            f"torch is not importable here ({e}), so the C++/CUDA sampling op is NOT built and gptkernels.sample "
            "will use its slower PyTorch implementation.\n"
            "To build it: install torch first, then `pip install --no-build-isolation -e .` (with build isolation "
            "pip builds in a fresh environment that has no torch)."
        )
        return [], {}

    sources = [os.path.join(CSRC, "sampling.cpp")]
    cxx = ["-O3", "-ffp-contract=off", "-fvisibility=hidden"]
    link: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline: without OpenMP in *this* object the rows run on one thread.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if sys.platform == "win32":
        cxx = ["/O2", "/fp:precise", "/openmp"]
    if _want_cuda(torch, cpp_extension.CUDA_HOME):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        sources.append(os.path.join(CSRC, "sampling_cuda.cu"))
        ext = cpp_extension.CUDAExtension(
            "gptkernels._C",
            sources,
            define_macros=[("GPTKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false", "-lineinfo"]},
            extra_link_args=link,
        )
        print(
            f"gptkernels setup.py: building the CPU and CUDA kernels (CUDA {torch.version.cuda}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})",
            flush=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "gptkernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
        print(f"gptkernels setup.py: building the CPU kernel (torch {torch.__version__})", flush=True)
    if shutil.which("ninja") is None:
        _warn("ninja not found (pip install ninja): the build falls back to slower, serial distutils")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
