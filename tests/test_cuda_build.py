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


def _nvcc_version() -> tuple[int, int]:
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = (int(v) for v in re.search(r"release (\d+)\.(\d+)", version).groups())
    if (major, minor) < (11, 8):
        pytest.skip(f"nvcc {major}.{minor} cannot target sm_90")
    return major, minor


def _compile(out: Path, arch: int, *, cubin: bool = False) -> subprocess.CompletedProcess:
    """nvcc -c (an object file), or with ``cubin`` the device code alone (-cubin), for sm_<arch>."""
    major, _ = _nvcc_version()
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
        "-cubin" if cubin else "-c",
        str(ROOT / "csrc" / "sampling_cuda.cu"),
        "-o",
        str(out),
        "-std=c++20" if major >= 12 else "-std=c++17",
        f"-gencode=arch=compute_{arch},code=sm_{arch}" if not cubin else f"-arch=sm_{arch}",
        "--fmad=false",
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC,-O0",  # host code: only that it compiles matters here
        *defines,
        *(f"-I{p}" for p in includes),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert out.stat().st_size > 0
    return result


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_sampling_cuda_compiles(tmp_path):
    major, minor = _nvcc_version()
    _compile(tmp_path / "sampling_cuda.o", 90)
    print(f"compiled with nvcc {major}.{minor}, python {sys.version.split()[0]}, torch {torch.__version__}")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump", path=str(Path(NVCC).parent)) or shutil.which("cuobjdump")
    if found is None:
        try:  # Triton's wheel carries one
            import triton
        except ImportError:
            return None
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(bundled) if bundled.exists() else None
    return found


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("arch", [80, 90])
def test_sampling_cuda_has_no_64_bit_shared_atomic_loops(arch, tmp_path):
    """The top-p histogram's 64-bit masses are added with native 32-bit shared atomics: a 64-bit shared atomic
    add has no instruction on sm_80/sm_90 and compiles to a compare-and-swap retry loop (ATOMS.CAS.64)."""
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (beside nvcc, on PATH or in triton)")
    cubin = tmp_path / f"sampling_sm{arch}.cubin"
    _compile(cubin, arch, cubin=True)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    assert "ATOMS" in sass, "no shared-memory atomics at all: the histograms changed, update this test"
    loops = [line.strip() for line in sass.splitlines() if re.search(r"ATOMS\.(CAS|CAST)\S*\.64", line)]
    assert not loops, f"sm_{arch}: 64-bit shared-memory CAS loops in the sampling kernel: {loops[:3]}"
