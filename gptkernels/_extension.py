"""Find, check, build and load the compiled sampling op, ``torch.ops.gptkernels.sample_tokens``.

:func:`load` tries, in order:

1. ``gptkernels/_C*.so``, built by setup.py when torch was importable at install time. It is loaded only if its
   build record (``_C_build.json``, beside it) says it was built for this torch (version, build, CUDA version,
   C++ ABI) from these sources; a library built for another torch is never imported.
2. A build made on an earlier first use, cached in ``<torch extensions dir>/gptkernels/<key>/`` (the folder is
   ``$TORCH_EXTENSIONS_DIR``, default ``$XDG_CACHE_HOME/torch_extensions`` = ``~/.cache/torch_extensions``), one
   folder per Python / torch / CUDA / compiler / sources / flags.
3. Otherwise it compiles ``csrc/`` now with ``torch.utils.cpp_extension`` (ninja) in a child process, printing one
   line first. A file lock makes concurrent processes (DDP ranks, pytest-xdist workers) wait for the one that
   builds; the library is published by an atomic rename and a marker written after it, so no process loads a
   half-written file. Failures are cached too (``python -m gptkernels.build --force`` retries).

Where torch has CUDA and a toolkit is found, the CUDA kernel is built with the CPU one; if that build fails (a
toolkit that cannot link, ``cannot find -lcudart``) the CPU op is built alone, with one line saying why. When
nothing can be built (no compiler, no ninja, a compile error) :class:`ExtensionState` says why in plain words and
what to do, and sampling runs its PyTorch implementation. ``GPTKERNELS_SKIP_EXTENSION=1`` skips all of this (the
PyTorch implementation runs); ``GPTKERNELS_SKIP_CUDA=1`` builds the CPU op alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _csrc

PACKAGE_DIR = Path(__file__).resolve().parent
LOCK_TIMEOUT_S = 30 * 60  # a build that takes longer than this is stuck
BUILD_HINT = "`python -m gptkernels.build`"

# The child process that compiles (and test-loads) the library, so that this process only ever loads the result.
_COMPILE = """
import json, os, sys
spec = json.loads(sys.argv[1])
if spec["arch_list"]:
    os.environ["TORCH_CUDA_ARCH_LIST"] = spec["arch_list"]
from torch.utils.cpp_extension import load
path = load(name="_C", sources=spec["sources"], extra_cflags=spec["cflags"], extra_cuda_cflags=spec["cuda_cflags"],
            extra_ldflags=spec["ldflags"], extra_include_paths=[spec["csrc"]], build_directory=spec["build_dir"],
            with_cuda=spec["with_cuda"], is_python_module=False, verbose=True)
print("LIBRARY=" + path)
"""


@dataclass(frozen=True)
class ExtensionState:
    """What :func:`load` found: the op loaded or not, with what, from where, and why not."""

    loaded: bool
    with_cuda: bool = False  # the CUDA kernel is registered too
    origin: str = ""  # "prebuilt" (setup.py), "cached" (an earlier first use) or "built" (just now)
    path: str | None = None  # the loaded library
    cuda_arch_list: str | None = None  # the CUDA architectures it was built for
    cuda_reason: str | None = None  # loaded without CUDA although torch has CUDA: why
    reason: str | None = None  # not loaded: why, in plain words
    fix: str | None = None  # not loaded: what to do about it

    def describe(self) -> str:
        """One short line for logs: ``compiled C++ op (CPU), CUDA op (8.0;9.0)`` or ``PyTorch fallback (why)``."""
        if not self.loaded:
            return f"PyTorch fallback ({self.reason})"
        text = "compiled C++ op (CPU)"
        if self.with_cuda:
            text += f", CUDA op ({self.cuda_arch_list})" if self.cuda_arch_list else ", CUDA op"
        elif self.cuda_reason:
            text += f"; CUDA tensors: PyTorch fallback ({self.cuda_reason})"
        return text


class BuildError(RuntimeError):
    """The compiler failed: ``short`` is the first error line, the full output is in ``log``."""

    def __init__(self, short: str, log: Path):
        super().__init__(short)
        self.short, self.log = short, log


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _plain(e: BaseException) -> str:
    """An exception's first line, without Python's guesses ("most likely due to a circular import")."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.split(" (most likely due to")[0]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    """Written whole or not at all: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# 1. The library built by setup.py
# ---------------------------------------------------------------------------------------------------------


def prebuilt_library(package_dir: Path = PACKAGE_DIR) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (path := package_dir / f"_C{suffix}").is_file():
            return path
    return None


def check_record(record: dict | None, identity: dict, sources_hash: str | None) -> str | None:
    """Why a prebuilt library described by ``record`` must not be loaded here (None: it may be)."""
    if record is None:
        return f"has no build record ({_csrc.RECORD}), so nothing says which torch it was built for"
    if record.get("torch") != identity["torch"]:
        return f"was built for torch {record.get('torch')} (this is torch {identity['torch']})"
    if record.get("cuda") != identity["cuda"] or record.get("hip") != identity["hip"]:
        built = record.get("cuda") or record.get("hip") or "none"
        here = identity["cuda"] or identity["hip"] or "none"
        return f"was built for a torch with CUDA {built} (this torch has {here})"
    if record.get("torch_git") != identity["torch_git"] or record.get("cxx11_abi") != identity["cxx11_abi"]:
        return f"was built for another build of torch {identity['torch']} (other commit or C++ ABI)"
    if sources_hash is not None and record.get("sources") != sources_hash:
        return "was built from other sources (csrc/ has changed since)"
    return None


def _load_prebuilt(path: Path, identity: dict, sources_hash: str | None) -> tuple[ExtensionState | None, str]:
    """(state, "") when the prebuilt library is good and loaded, else (None, why it was not used)."""
    record = _read_json(path.parent / _csrc.RECORD)
    problem = check_record(record, identity, sources_hash)
    if problem is None:
        try:
            module = importlib.import_module(f"{__package__}._C")
        except (ImportError, OSError) as e:
            problem = f"failed to load ({_plain(e)})"
        else:
            state = ExtensionState(
                True,
                with_cuda=bool(module.WITH_CUDA),
                origin="prebuilt",
                path=str(path),
                cuda_arch_list=record.get("cuda_arch_list") if module.WITH_CUDA else None,
                cuda_reason=record.get("cuda_reason"),
            )
            return state, ""
    return None, f"the prebuilt op {path.name} {problem}"


# ---------------------------------------------------------------------------------------------------------
# 2-3. The build made on first use
# ---------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``<TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions>/gptkernels`` (torch's rules, XDG_CACHE_HOME included)."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / "gptkernels"


def _file_id(path: str) -> list:
    """A compiler, identified without running it: its real path, size and time stamp (an upgrade changes them)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return [real, st.st_size, st.st_mtime_ns]


def _compiler() -> tuple[str, str | None]:
    """(the C++ compiler torch will call, its path or None)."""
    name = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")
    return name, shutil.which(name.split()[0])


def _ensure_ninja() -> bool:
    """True when ``ninja`` runs; a ninja installed by pip next to this Python is put on PATH if it is not there."""
    if shutil.which("ninja"):
        return True
    for folder in dict.fromkeys((sysconfig.get_path("scripts"), os.path.dirname(sys.executable))):
        if folder and shutil.which("ninja", path=folder):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


def _cuda_plan(identity: dict) -> tuple[bool, str | None]:
    """(build the CUDA kernel?, why not when torch has CUDA)."""
    if identity["cuda"] is None:
        return False, ("the CUDA kernel is not built for ROCm" if identity["hip"] else None)
    if _flag("GPTKERNELS_SKIP_CUDA"):
        return False, "GPTKERNELS_SKIP_CUDA=1 is set"
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or shutil.which("nvcc", path=os.path.join(home, "bin")) is None:
        return False, "no CUDA toolkit found (nvcc; set CUDA_HOME)"
    return True, None


def _cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, else the GPUs of this machine, else the default list (A100 to H100)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch

    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"
    return _csrc.DEFAULT_CUDA_ARCH_LIST


def build_spec(csrc: Path, with_cuda: bool, arch_list: str | None) -> dict:
    """The arguments of the ``torch.utils.cpp_extension.load`` call: the flags of setup.py."""
    sources = [*_csrc.CPU_SOURCES, *(_csrc.CUDA_SOURCES if with_cuda else ())]
    define = [f"-D{_csrc.CUDA_DEFINE}"] if with_cuda else []
    return {
        "sources": [str(csrc / s) for s in sources],
        "csrc": str(csrc),
        "cflags": _csrc.cxx_flags() + define,
        "cuda_cflags": [*_csrc.NVCC_FLAGS, *define] if with_cuda else [],
        "ldflags": _csrc.link_flags(),
        "with_cuda": with_cuda,
        "arch_list": arch_list if with_cuda else None,
    }


def build_dir(spec: dict, identity: dict, sources_hash: str, compiler: str) -> Path:
    """``cache_root()/<readable tag>-<hash>``: one folder per everything the library depends on."""
    key: dict[str, Any] = {
        "python": sysconfig.get_config_var("EXT_SUFFIX"),
        **identity,
        "compiler": _file_id(compiler),
        "sources": sources_hash,
        **{k: spec[k] for k in ("cflags", "cuda_cflags", "ldflags", "with_cuda", "arch_list")},
    }
    if spec["with_cuda"]:
        from torch.utils import cpp_extension

        nvcc = shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME or "", "bin"))
        key["nvcc"] = _file_id(nvcc) if nvcc else None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    kind = "cuda" if spec["with_cuda"] else "cpu"
    return cache_root() / f"{py}-torch{identity['torch']}-{kind}-{digest}"


def _first_error(log_text: str) -> str:
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in lines:
        low = line.lower()
        if "error:" in low or "cannot find" in low or "no such file" in low:  # compiler, linker, exception
            return line[:200]
    return (lines[-1] if lines else "no output")[:200]


def _compile(spec: dict, log: Path) -> Path:
    """Compile in a child process (which also test-loads the library); the built library's path."""
    Path(spec["build_dir"]).mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(
            [sys.executable, "-c", _COMPILE, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=LOCK_TIMEOUT_S,
        )
        output, code = result.stdout, result.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"{e.output or ''}\nerror: the build took more than {LOCK_TIMEOUT_S} s", -1
    log.write_text(output)
    lines = [line for line in output.splitlines() if line.startswith("LIBRARY=")]
    if code != 0 or not lines:
        raise BuildError(_first_error(output), log)
    return Path(lines[-1][len("LIBRARY=") :])


def _announce(message: str) -> None:
    print(f"gptkernels: {message}", file=sys.stderr, flush=True)


def _what(spec: dict) -> str:
    if spec["with_cuda"]:
        return f"C++ for CPU and CUDA for {spec['arch_list']}, a few minutes"
    return "C++ for CPU, about a minute on 2 cores"


def cached_build(spec: dict, directory: Path, force: bool = False, note: str = "") -> tuple[Path | None, str, bool]:
    """The published library of ``spec`` in ``directory``, built now if needed: (path, "", built now?) or
    (None, why not, built now?).

    Safe with concurrent processes: they take turns on ``directory/.lock``; ``build.json`` is written after the
    library is in place, and only its presence makes a library usable.
    """
    from filelock import FileLock, Timeout

    done, failed, log = directory / "build.json", directory / "failed.json", directory / "build.log"

    def finished() -> tuple[Path | None, str, bool] | None:
        if (record := _read_json(done)) is not None and (directory / str(record.get("library"))).is_file():
            return directory / record["library"], "", False
        if (record := _read_json(failed)) is not None:
            return None, str(record.get("reason")), False
        return None

    if not force and (found := finished()) is not None:
        return found
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _announce(f"waiting for another process that is compiling the sampling op ({directory})")
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            return None, f"another process has been compiling it for over {LOCK_TIMEOUT_S // 60} minutes", False
    try:
        if not force and (found := finished()) is not None:
            return found
        for stale in (done, failed, directory / "build" / "lock"):  # torch's own lock, left by a killed build
            stale.unlink(missing_ok=True)
        because = f" ({note})" if note else ""
        _announce(
            f"compiling the sampling op{because}: {_what(spec)}, once per torch version; cached in {directory} "
            f"({BUILD_HINT} prebuilds it)"
        )
        start = time.monotonic()
        try:
            built = _compile({**spec, "build_dir": str(directory / "build")}, log)
        except BuildError as e:
            reason = f"compiling it failed: {e.short} (full log: {e.log})"
            _write_json(failed, {"reason": reason})
            return None, reason, True
        published = directory / built.name
        tmp = directory / f".{built.name}.{os.getpid()}.tmp"
        shutil.copy2(built, tmp)
        os.replace(tmp, published)
        _write_json(
            done,
            {"library": built.name, "seconds": round(time.monotonic() - start, 1), **{k: spec[k] for k in spec}},
        )
        return published, "", True
    finally:
        lock.release()


def _cached_build(spec: dict, directory: Path, force: bool, note: str) -> tuple[Path | None, str, bool]:
    try:
        return cached_build(spec, directory, force, note)
    except OSError as e:  # a read-only home, a full disk
        why = f"its cache folder {directory} is not writable ({e.strerror or e})"
        why += "; point TORCH_EXTENSIONS_DIR at a writable folder"
        return None, why, False


def _load_library(path: Path) -> str | None:
    """Load a built library (registers the op); why it failed, or None."""
    import torch

    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        return f"the build in {path.parent} failed to load ({_plain(e)})"
    return None


def _first_use_build(csrc: Path | None, identity: dict, sources_hash: str | None, force: bool, note: str):
    state = _try_first_use_build(csrc, identity, sources_hash, force, note)
    if not state.loaded and note:  # say also why the prebuilt library was not used
        state = dataclasses.replace(state, reason=f"{note}, and {state.reason}")
    return state


def _try_first_use_build(csrc: Path | None, identity: dict, sources_hash: str | None, force: bool, note: str):
    if csrc is None or sources_hash is None:
        return ExtensionState(
            False,
            reason="its C++ sources are not in the installed package",
            fix="reinstall gptkernels (`pip install -e .` in its folder)",
        )
    cxx, compiler = _compiler()
    if compiler is None:
        return ExtensionState(
            False,
            reason=f"no C++ compiler found: `{cxx}` is not on PATH",
            fix=f"install one (e.g. `apt install g++`, or set CXX), then run {BUILD_HINT}",
        )
    if not _ensure_ninja():
        return ExtensionState(False, reason="ninja is not installed", fix=f"`pip install ninja`, then run {BUILD_HINT}")
    want_cuda, cuda_reason = _cuda_plan(identity)
    if want_cuda:
        spec = build_spec(csrc, True, _cuda_arch_list())
        directory = build_dir(spec, identity, sources_hash, compiler)
        path, why, built = _cached_build(spec, directory, force, note)
        if path is not None:
            return _loaded(path, spec, built, cuda_reason=None)
        cuda_reason = f"the CUDA build failed: {why}; fix it, then run {BUILD_HINT} --force"
        if built:  # said once, when it happens; later processes go straight to the CPU op
            _announce(f"the CUDA sampling op could not be built ({why}); building the C++ op for CPU alone")
        note = ""
    spec = build_spec(csrc, False, None)
    directory = build_dir(spec, identity, sources_hash, compiler)
    path, why, built = _cached_build(spec, directory, force, note)
    if path is None:
        return ExtensionState(False, reason=why, fix=f"fix that, then run {BUILD_HINT} --force")
    return _loaded(path, spec, built, cuda_reason)


def _loaded(path: Path, spec: dict, built: bool, cuda_reason: str | None) -> ExtensionState:
    failure = _load_library(path)
    if failure is not None:
        return ExtensionState(False, reason=failure, fix=f"run {BUILD_HINT} --force to rebuild it")
    return ExtensionState(
        True,
        with_cuda=spec["with_cuda"],
        origin="built" if built else "cached",
        path=str(path),
        cuda_arch_list=spec["arch_list"],
        cuda_reason=cuda_reason,
    )


def load(force: bool = False) -> ExtensionState:
    """Load the op (building it on first use); call once per process (a library registers the op only once).

    Args:
        force: rebuild the first-use build even if one is cached (and retry one that failed).
    """
    if _flag("GPTKERNELS_SKIP_EXTENSION"):
        return ExtensionState(False, reason="GPTKERNELS_SKIP_EXTENSION=1 is set", fix="unset it")
    import torch

    identity = _csrc.torch_identity(torch)
    csrc = _csrc.source_dir(PACKAGE_DIR)
    sources_hash = _csrc.source_hash(csrc) if csrc is not None else None
    note = ""
    if (prebuilt := prebuilt_library()) is not None:
        state, note = _load_prebuilt(prebuilt, identity, sources_hash)
        if state is not None:
            return state
    return _first_use_build(csrc, identity, sources_hash, force, note)
