"""Builds the compiled sampling op, ``gptkernels._C``, ahead of time when torch is importable here.

Metadata (name, version, dependencies) lives in pyproject.toml; this file adds the extension and ships ``csrc/``
inside the package (``gptkernels/csrc/`` in wheels), so that an install can compile the op on first use.

- ``pip install -e .`` (plain): pip builds in an isolated environment without torch (pyproject.toml does not list
  torch, or pip would download a second, multi-GB one), so nothing is compiled here; the first ``sample()`` call
  compiles the op against the installed torch and caches it (``gptkernels/_extension.py``), or run
  ``python -m gptkernels.build``.
- ``pip install --no-build-isolation -e .``: the installed torch is visible, so the op is compiled now, and
  ``gptkernels/_C_build.json`` records what it was built for: the package never loads it under another torch.

What is built:
- ``csrc/sampling.cpp``, the CPU kernel, with ``CppExtension``;
- plus ``csrc/sampling_cuda.cu`` with ``CUDAExtension`` when torch was built with CUDA and nvcc is found
  (``CUDA_HOME`` or nvcc on PATH). Architectures: ``TORCH_CUDA_ARCH_LIST``, default "8.0;8.6;8.9;9.0+PTX". If the
  CUDA build fails (e.g. ``cannot find -lcudart``), the CPU kernel is built alone, with one warning.
Flags: ``gptkernels/_csrc.py``, shared with the build on first use.

It also puts ``gptkernels_lm_eval.pth`` in site-packages, in wheels and in editable installs alike: at start-up it
imports the small ``_gptkernels_lm_eval`` module (standard library only), which registers the ``gptkernels`` model
with lm-eval releases that do not read the ``lm_eval.models`` entry point, once lm-eval is imported. So
``lm_eval --model gptkernels`` works with lm-eval 0.4.13 too.

Environment switches:
    GPTKERNELS_SKIP_EXTENSION=1   build nothing here (the op is then compiled on first use)
    GPTKERNELS_SKIP_CUDA=1        CPU kernel only, even where CUDA is available
    GPTKERNELS_FORCE_CUDA=1       build the CUDA kernel even if the checks above fail (e.g. CUDA_HOME unset on a
                                  build machine with a CUDA torch); errors out clearly if it cannot
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _load_csrc():
    """gptkernels/_csrc.py (sources and flags), loaded by path: the package itself needs torch to import."""
    spec = importlib.util.spec_from_file_location("_gptkernels_csrc", ROOT / "gptkernels" / "_csrc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_csrc = _load_csrc()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\ngptkernels setup.py: WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    print(f"gptkernels setup.py: {message}", file=sys.stderr, flush=True)


def _want_cuda(torch, cuda_home: str | None) -> tuple[bool, str | None]:
    """(build the CUDA kernel?, why not when torch has CUDA)."""
    if _flag("GPTKERNELS_SKIP_CUDA"):
        return False, "GPTKERNELS_SKIP_CUDA=1 was set at install time"
    force = _flag("GPTKERNELS_FORCE_CUDA")
    if torch.version.cuda is None:
        if force:
            sys.exit(
                "gptkernels setup.py: GPTKERNELS_FORCE_CUDA=1 but the installed torch "
                f"({torch.__version__}) was built without CUDA; install a CUDA build of torch first."
            )
        return False, None
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
        return False, "no CUDA toolkit was found at install time (nvcc; set CUDA_HOME)"
    return True, None


def _cpu_only(ext) -> None:
    """Turn the CUDA extension into the CPU one, in place: same name and C++ flags, no .cu, no CUDA libraries."""
    ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
    ext.define_macros = [m for m in ext.define_macros if m[0] != _csrc.CUDA_DEFINE]
    ext.libraries = [lib for lib in ext.libraries if lib not in ("cudart", "c10_cuda", "torch_cuda")]
    ext.gptkernels_cuda = False


def _first_error(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "error:" in line.lower() or "cannot find" in line.lower():
            return line[:200]
    return (lines[-1] if lines else type(e).__name__)[:200]


def _build_ext_class(base):
    """torch's BuildExtension, plus: a failed CUDA build falls back to the CPU kernel with one warning, and a build
    record (what torch it was built for) is written beside the library."""

    class BuildExt(base):
        def build_extension(self, ext) -> None:
            cuda_reason = getattr(ext, "gptkernels_cuda_reason", None)
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - a compiler or linker failure, of any type
                if not getattr(ext, "gptkernels_cuda", False):
                    raise
                cuda_reason = f"the CUDA build failed at install time: {_first_error(e)}"
                _warn(
                    f"building the CUDA kernel failed ({_first_error(e)}): building the CPU kernel alone; CUDA "
                    "tensors will use the PyTorch fallback. Fix the CUDA toolkit and reinstall to get it."
                )
                _cpu_only(ext)
                super().build_extension(ext)
            self.write_record(Path(self.get_ext_fullpath(ext.name)).parent, ext, cuda_reason)

        def write_record(self, folder: Path, ext, cuda_reason: str | None) -> None:
            import torch

            with_cuda = bool(getattr(ext, "gptkernels_cuda", False))
            record = {
                **_csrc.torch_identity(torch),
                "sources": _csrc.source_hash(ROOT / CSRC),
                "with_cuda": with_cuda,
                "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
                "cuda_reason": cuda_reason,
            }
            (folder / _csrc.RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

        def copy_extensions_to_source(self) -> None:
            # inplace / editable: the record goes where the library goes
            super().copy_extensions_to_source()
            build_py_cmd = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py_cmd, ext)
                record = Path(regular_file).parent / _csrc.RECORD
                if record.exists():
                    shutil.copyfile(record, Path(inplace_file).parent / _csrc.RECORD)

    return BuildExt


# Site-packages runs the "import" lines of every .pth file at start-up. The module is tiny and imports nothing
# heavy; try/except keeps start-up quiet if the module went away (an editable install whose folder was moved).
LM_EVAL_PTH = "gptkernels_lm_eval.pth"
LM_EVAL_PTH_TEXT = (
    "# gptkernels: `lm_eval --model gptkernels` with lm-eval releases that ignore entry points (_gptkernels_lm_eval)\n"
    'import sys; exec("try: import _gptkernels_lm_eval\\nexcept Exception: pass")\n'
)


def _write_lm_eval_pth(folder: str | Path) -> None:
    """The .pth goes to the root of a wheel, which is site-packages once installed."""
    (Path(folder) / LM_EVAL_PTH).write_text(LM_EVAL_PTH_TEXT, encoding="utf-8")


class BuildPyWithSources(build_py):
    """Ships csrc/ as gptkernels/csrc/ in wheels, so an install without a prebuilt op can compile it on first use
    (an editable install finds csrc/ beside the package), and the lm-eval .pth file."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        _write_lm_eval_pth(self.build_lib)
        target = Path(self.build_lib) / "gptkernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for name in (*_csrc.CPU_SOURCES, *_csrc.CUDA_SOURCES, *_csrc.HEADERS):
            self.copy_file(str(ROOT / CSRC / name), str(target / name))


class EditableWheelWithPth(editable_wheel):
    """``pip install -e``: setuptools' editable wheel holds only its own .pth and finder (build_py's files are not
    in it), so the lm-eval .pth is written into the unpacked wheel, beside them. ``_run_build_commands`` is
    setuptools' own (private, unchanged since v64); tests/test_install.py checks that editable installs get the .pth.
    """

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        outputs = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        _write_lm_eval_pth(unpacked_wheel)
        return outputs


def _extensions():
    """(ext_modules, cmdclass additions): no extension when it is skipped or torch is missing."""
    if _flag("GPTKERNELS_SKIP_EXTENSION"):
        _note("GPTKERNELS_SKIP_EXTENSION=1: not compiling the sampling op now (it is compiled on first use)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _note(
            "torch is not importable in this build environment (pip's build isolation), so the sampling op is "
            "compiled on first use instead: about a minute, once per torch version (`python -m gptkernels.build` "
            "does it ahead of time)."
        )
        return [], {}

    sources = [f"{CSRC}/{s}" for s in _csrc.CPU_SOURCES]
    cxx, link = _csrc.cxx_flags(), _csrc.link_flags()
    want_cuda, cuda_reason = _want_cuda(torch, cpp_extension.CUDA_HOME)
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _csrc.DEFAULT_CUDA_ARCH_LIST)
        ext = cpp_extension.CUDAExtension(
            "gptkernels._C",
            sources + [f"{CSRC}/{s}" for s in _csrc.CUDA_SOURCES],
            define_macros=[(_csrc.CUDA_DEFINE, None)],
            extra_compile_args={"cxx": cxx, "nvcc": list(_csrc.NVCC_FLAGS)},
            extra_link_args=link,
        )
        ext.gptkernels_cuda = True
        _note(
            f"building the CPU and CUDA kernels (CUDA {torch.version.cuda}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
    else:
        ext = cpp_extension.CppExtension(
            "gptkernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
        _note(f"building the CPU kernel (torch {torch.__version__})")
    ext.gptkernels_cuda_reason = cuda_reason
    if shutil.which("ninja") is None:
        _warn("ninja not found (pip install ninja): the build falls back to slower, serial distutils")
    build_ext = _build_ext_class(cpp_extension.BuildExtension.with_options(use_ninja=True))
    return [ext], {"build_ext": build_ext}


if __name__ == "__main__":  # pip and `python setup.py` run it so; tests import the helpers above
    ext_modules, cmdclass = _extensions()
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_py": BuildPyWithSources, "editable_wheel": EditableWheelWithPth, **cmdclass},
    )
