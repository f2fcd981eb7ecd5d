"""How the sampling op is found, checked and built, without compiling anything (tests/test_install.py compiles).

The compiler is replaced by fakes here: what is tested is the logic around it (a prebuilt library for another torch
is never imported; a CUDA build that cannot link falls back to the CPU op with one warning, in setup.py and on
first use; missing tools give one plain warning and the PyTorch fallback).
"""

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gptkernels import _csrc, _extension

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _identity():
    return _csrc.torch_identity(torch)


def _sources_hash():
    return _csrc.source_hash(ROOT / "csrc")


def _good_record():
    return {**_identity(), "sources": _sources_hash(), "with_cuda": False}


@pytest.mark.parametrize(
    "change, expected",
    [
        (None, "has no build record"),
        ({"torch": "2.0.0"}, "was built for torch 2.0.0"),
        ({"cuda": "12.8"}, "was built for a torch with CUDA 12.8"),
        ({"cxx11_abi": "flipped"}, "another build of torch"),
        ({"torch_git": "0" * 40}, "another build of torch"),
        ({"sources": "0" * 64}, "built from other sources"),
    ],
)
def test_prebuilt_for_another_torch_or_other_sources_is_refused(change, expected):
    assert _extension.check_record(_good_record(), _identity(), _sources_hash()) is None
    record = None if change is None else {**_good_record(), **change}
    if change and change.get("cxx11_abi") == "flipped":
        record["cxx11_abi"] = not _identity()["cxx11_abi"]
    assert expected in _extension.check_record(record, _identity(), _sources_hash())


def _load_setup_py():
    """setup.py's helpers, without running setup() (it only runs as __main__, as pip runs it)."""
    spec = importlib.util.spec_from_file_location("gptkernels_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeBuildExtension:
    """Stands in for torch's BuildExtension: records what it is asked to build; .cu sources fail to link."""

    def __init__(self, folder: Path):
        self.folder, self.built = folder, []

    def build_extension(self, ext):
        if any(s.endswith(".cu") for s in ext.sources):
            raise RuntimeError("/usr/bin/ld: cannot find -lcudart: No such file or directory\ncollect2: error")
        self.built.append(SimpleNamespace(**vars(ext)))

    def get_ext_fullpath(self, name):
        return str(self.folder / f"_C{SUFFIX}")


def _cuda_ext():
    return SimpleNamespace(
        name="gptkernels._C",
        sources=["csrc/sampling.cpp", "csrc/sampling_cuda.cu"],
        define_macros=[(_csrc.CUDA_DEFINE, None)],
        libraries=["c10", "torch", "cudart", "c10_cuda", "torch_cuda"],
        gptkernels_cuda=True,
        gptkernels_cuda_reason=None,
    )


def test_setup_py_builds_the_cpu_op_alone_when_cuda_cannot_link(tmp_path, capsys):
    setup_py = _load_setup_py()
    builder = setup_py._build_ext_class(_FakeBuildExtension)(tmp_path)
    builder.build_extension(_cuda_ext())
    (cpu,) = builder.built
    assert cpu.sources == ["csrc/sampling.cpp"] and cpu.define_macros == []
    assert not {"cudart", "c10_cuda", "torch_cuda"} & set(cpu.libraries)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "cannot find -lcudart" in warnings[0] and "CPU kernel alone" in warnings[0]
    # the record it writes says so, and the runtime accepts it for this torch
    record = json.loads((tmp_path / _csrc.RECORD).read_text())
    assert record["with_cuda"] is False and "cannot find -lcudart" in record["cuda_reason"]
    assert _extension.check_record(record, _identity(), _sources_hash()) is None


def test_setup_py_does_not_hide_a_failing_cpu_build(tmp_path):
    setup_py = _load_setup_py()
    builder = setup_py._build_ext_class(_FakeBuildExtension)(tmp_path)
    ext = _cuda_ext()
    ext.gptkernels_cuda = False  # the CPU op itself fails: that is an error, not a fallback
    with pytest.raises(RuntimeError, match="lcudart"):
        builder.build_extension(ext)


@pytest.fixture
def no_prebuilt(monkeypatch, tmp_path):
    """A first-use build into an empty cache, with no library from setup.py."""
    monkeypatch.setattr(_extension, "prebuilt_library", lambda *a: None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_first_use_build_falls_back_to_cpu_when_cuda_cannot_link(monkeypatch, no_prebuilt, capsys):
    compiled, loaded = [], []

    def fake_compile(spec, log):
        compiled.append(spec["with_cuda"])
        if spec["with_cuda"]:
            raise _extension.BuildError("/usr/bin/ld: cannot find -lcudart: No such file or directory", log)
        lib = Path(spec["build_dir"]) / "_C.so"
        lib.parent.mkdir(parents=True, exist_ok=True)
        lib.write_bytes(b"a library")
        return lib

    monkeypatch.setattr(_extension, "_cuda_plan", lambda identity: (True, None))
    monkeypatch.setattr(_extension, "_cuda_arch_list", lambda: "9.0")
    monkeypatch.setattr(_extension, "_compile", fake_compile)
    monkeypatch.setattr(_extension, "_load_library", lambda path: loaded.append(path))
    state = _extension.load()
    assert state.loaded and not state.with_cuda and state.origin == "built"
    assert "cannot find -lcudart" in state.cuda_reason and "CUDA tensors: PyTorch fallback" in state.describe()
    assert compiled == [True, False] and Path(loaded[0]).parent.parent == no_prebuilt / "gptkernels"
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if "CUDA sampling op could not be built" in line]) == 1
    # Another process later: both results are cached, nothing is compiled or said again.
    again = _extension.load()
    assert compiled == [True, False] and capsys.readouterr().err == ""
    assert again.loaded and again.origin == "cached" and again.cuda_reason == state.cuda_reason


@pytest.mark.parametrize("missing", ["compiler", "ninja", "sources", "writable cache"])
def test_missing_tools_give_one_plain_reason_and_no_build(monkeypatch, no_prebuilt, missing):
    monkeypatch.setattr(_extension, "_compile", lambda *a: pytest.fail("must not compile"))
    if missing == "writable cache":
        no_prebuilt.write_text("a file where the cache folder should be")
    elif missing == "compiler":
        monkeypatch.setenv("CXX", "/nonexistent/g++")
    elif missing == "ninja":
        monkeypatch.setattr(_extension, "_ensure_ninja", lambda: False)
    else:
        monkeypatch.setattr(_csrc, "source_dir", lambda package_dir: None)
    state = _extension.load()
    assert not state.loaded
    expected = {
        "compiler": ("no C++ compiler found: `/nonexistent/g++`", "apt install g++"),
        "ninja": ("ninja is not installed", "pip install ninja"),
        "sources": ("C++ sources are not in the installed package", "reinstall"),
        "writable cache": (f"its cache folder {no_prebuilt / 'gptkernels'}", "TORCH_EXTENSIONS_DIR"),
    }[missing]
    assert expected[0] in state.reason and expected[1] in f"{state.reason} {state.fix}"
    assert state.describe() == f"PyTorch fallback ({state.reason})"


def _bare_package(tmp_path: Path) -> Path:
    """The package's Python files and csrc/ in a fresh folder: an install without a library from setup.py."""
    root = tmp_path / "pkg"
    shutil.copytree(ROOT / "gptkernels", root / "gptkernels", ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.json"))
    shutil.copytree(ROOT / "csrc", root / "csrc")
    return root


def _run(code: str, root: Path, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CXX")}
    full_env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=full_env, capture_output=True, text=True, timeout=300
    )


SAMPLE = """
import sys, warnings, torch, gptkernels
from gptkernels import sampling
warnings.simplefilter("always")
x = torch.randn(3, 100)
ids = gptkernels.sample(x, top_p=0.9, uniforms=torch.full((3,), 0.5, dtype=torch.float64))
assert torch.equal(ids, sampling.sample_reference(x, top_p=0.9, uniforms=torch.full((3,), 0.5, dtype=torch.float64)))
print("HAS_EXTENSION", sampling.HAS_EXTENSION)
print("STATUS", sampling.extension_status())
print("IMPORTED_C", "gptkernels._C" in sys.modules)
"""


def test_foreign_prebuilt_is_not_imported_and_the_warning_says_why_in_plain_words(tmp_path):
    root = _bare_package(tmp_path)
    # A "library" that would fail loudly if anything imported it, with a record from another torch.
    (root / "gptkernels" / f"_C{SUFFIX}").write_bytes(b"not a shared library")
    (root / "gptkernels" / _csrc.RECORD).write_text(json.dumps({**_good_record(), "torch": "2.0.0"}))
    result = _run(SAMPLE, root, CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "HAS_EXTENSION False" in result.stdout and "IMPORTED_C False" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, result.stderr
    (warning,) = warnings
    assert "slower PyTorch implementation" in warning and "was built for torch 2.0.0" in warning
    assert "no C++ compiler found" in warning and "python -m gptkernels.build" in warning
    assert "circular import" not in result.stderr and "ELF" not in result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


def test_build_command_without_a_compiler_says_what_is_missing(tmp_path):
    result = _run(
        "from gptkernels.build import main; from gptkernels.cli import cli_main; cli_main(main)",
        _bare_package(tmp_path),
        CXX="/nonexistent/c++",
        TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"),
    )
    assert result.returncode == 1, result.stderr
    assert "sampling op: PyTorch fallback (no C++ compiler found" in result.stdout
    assert "to build it: install one" in result.stdout


def test_a_broken_loader_leaves_sampling_working(monkeypatch):
    from gptkernels import sampling

    for name in ("HAS_EXTENSION", "HAS_CUDA_EXTENSION", "_STATE"):  # restored after the test
        monkeypatch.setattr(sampling, name, getattr(sampling, name))
    monkeypatch.setattr(sampling, "_STATE", None)
    monkeypatch.setattr(sampling, "_WARNED", set())
    monkeypatch.setattr(_extension, "load", lambda force=False: {}["a bug"])
    assert sampling.load_extension() is False
    assert sampling.extension_status() == "PyTorch fallback (loading it failed (KeyError: 'a bug'))"
    logits, u = torch.randn(2, 50), torch.rand(2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="slower PyTorch implementation because .*loading it failed"):
        ids = sampling.sample(logits, top_p=0.9, uniforms=u)
    assert torch.equal(ids, sampling.sample_reference(logits, top_p=0.9, uniforms=u))


@pytest.mark.skipif(torch.version.cuda is not None, reason="compares the CPU build's flags")
def test_first_use_build_compiles_with_setup_py_flags():
    (ext,), _ = _load_setup_py()._extensions()
    spec = _extension.build_spec(ROOT / "csrc", with_cuda=False, arch_list=None)
    assert spec["cflags"] == ext.extra_compile_args["cxx"] and spec["ldflags"] == ext.extra_link_args
    assert [Path(s).name for s in spec["sources"]] == [Path(s).name for s in ext.sources]
    if sys.platform.startswith("linux"):  # without OpenMP in the object, at::parallel_for runs on one thread
        assert "-fopenmp" in spec["cflags"] and "-fopenmp" in spec["ldflags"] and "-O3" in spec["cflags"]
