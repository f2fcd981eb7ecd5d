"""csrc/sampling_cuda.cu must compile wherever nvcc is found, GPU or not, so the CUDA kernel cannot rot unseen.

Compile only (``nvcc -c``), one architecture (sm_90, the H100), against the installed torch's headers with the flags
torch.utils.cpp_extension uses. A CPU-only torch wheel ships the CUDA headers of c10/ATen but not the generated
``c10/cuda/impl/cuda_cmake_macros.h``; it only configures DLL export macros, so it is skipped by its own switch.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


NVCC = _nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_sampling_cuda_compiles(tmp_path):
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = (int(v) for v in re.search(r"release (\d+)\.(\d+)", version).groups())
    if (major, minor) < (11, 8):
        pytest.skip(f"nvcc {major}.{minor} cannot target sm_90")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    defines = [
        "-DGPTKERNELS_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
    ]
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    cmd = [
        NVCC,
        "-c",
        str(ROOT / "csrc" / "sampling_cuda.cu"),
        "-o",
        str(tmp_path / "sampling_cuda.o"),
        "-std=c++20" if major >= 12 else "-std=c++17",
        "-gencode=arch=compute_90,code=sm_90",
        "--fmad=false",
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC,-O0",  # host code: only that it compiles matters here
        *defines,
        *(f"-I{p}" for p in includes),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "sampling_cuda.o").stat().st_size > 0
    print(f"compiled with nvcc {major}.{minor}, python {sys.version.split()[0]}, torch {torch.__version__}")
