"""Benchmark-suite setup: devices, the session's ceilings, the run order, a time budget and machine info.

``pytest benchmarks/ --benchmark-only`` collects this folder even though the root pyproject's
``testpaths = ["tests"]`` keeps a bare ``pytest`` (the unit tests) away from it.

Triton's interpreter is never switched on here: on a CPU machine the CPU cases measure the PyTorch paths and
the C++ sampling op, as a user without a GPU would run them.

Run order (``harness.TIER_*``): the measured ceilings first, then the gptkernels/baseline cases that the issue's
targets need, then ``torch.compile`` baselines at one shape per op, the compiled training steps, the remaining
cases, and last ``torch.compile`` at the remaining shapes (compilation is the slow part). With
``--bench-budget SECONDS`` a case that would start after the budget is spent skips with that reason, so a run
with a hard deadline (the GPU check) still ends normally and writes its JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time

import pytest
import torch

from benchmarks import harness

_SESSION_START = time.monotonic()
_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None

# Rough seconds a case costs when none is declared: warm-up plus ~15 timed rounds.
DEFAULT_COST_S = 2.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gptkernels benchmarks")
    group.addoption(
        "--bench-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="skip the cases that would start after SECONDS of the session (cases run in priority order)",
    )
    group.addoption(
        "--bench-outcomes",
        default=None,
        metavar="PATH",
        help="write every case's outcome (passed, or the reason it has no figure) to this JSON file",
    )


# ---------------------------------------------------------------------------------------------------------
# Order and budget
# ---------------------------------------------------------------------------------------------------------


def _params(item: pytest.Item) -> dict:
    callspec = getattr(item, "callspec", None)
    return dict(callspec.params) if callspec is not None else {}


def _module_hook(item: pytest.Item, name: str):
    module = getattr(item, "module", None)
    return getattr(module, name, None) if module is not None else None


def _priority(item: pytest.Item) -> int:
    """The case's tier (``harness.TIER_*``), from its module's ``bench_priority(params)``."""
    hook = _module_hook(item, "bench_priority")
    if hook is not None:
        return int(hook(_params(item)))
    compiled = "compile" in str(_params(item).get("provider", ""))
    return harness.TIER_COMPILED_REST if compiled else harness.TIER_REST


def _cost(item: pytest.Item) -> float:
    """Seconds to time the case once it is warm (a module's ``bench_cost(params)``)."""
    hook = _module_hook(item, "bench_cost")
    return float(hook(_params(item))) if hook is not None else DEFAULT_COST_S


def _warmup(item: pytest.Item) -> list[tuple[str, float]]:
    """``[(key, seconds)]``: compilation and autotuning that the first case with each key pays before its timing
    (a module's ``bench_warmup(params)``; cases sharing a key reuse the compiled kernels or autotuning result)."""
    hook = _module_hook(item, "bench_warmup")
    return [(str(key), float(seconds)) for key, seconds in (hook(_params(item)) if hook is not None else [])]


_WARM_KEYS: set[str] = set()  # the warm-up keys paid so far in this session


@pytest.hookimpl(trylast=True)  # after pytest's own fixture-based reordering
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = {id(item): (_priority(item), i) for i, item in enumerate(items)}
    items.sort(key=lambda item: order[id(item)])


def pytest_runtest_setup(item: pytest.Item) -> None:
    budget = item.config.getoption("--bench-budget", default=None)
    if budget is None:
        return
    cuda_case = "cuda_env" in item.fixturenames or _params(item).get("device_type") == "cuda"
    if cuda_case and not torch.cuda.is_available():
        return  # it skips for want of a GPU, which is the reason to report
    elapsed = time.monotonic() - _SESSION_START
    warm = [(key, seconds) for key, seconds in _warmup(item) if key not in _WARM_KEYS]
    cost = _cost(item) + sum(seconds for _, seconds in warm)
    if elapsed + cost > budget:
        pytest.skip(f"time budget: {elapsed:.0f} s of {budget:.0f} s used, this case needs about {cost:.0f} s")
    _WARM_KEYS.update(key for key, _ in warm)


# ---------------------------------------------------------------------------------------------------------
# Outcomes: every case's result or the reason it has none (--bench-outcomes), for the GPU check's JSON
# ---------------------------------------------------------------------------------------------------------

_OUTCOMES: dict[str, dict] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        target = _priority(item) <= harness.TIER_TARGET
        _OUTCOMES[item.nodeid] = {"target": target, "outcome": "not run", "reason": "not reached before the end"}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _OUTCOMES.setdefault(report.nodeid, {"target": False})
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        entry.update(outcome="skipped", reason=reason.removeprefix("Skipped: "))
    elif report.failed:
        message = getattr(report.longrepr, "reprcrash", None)
        entry.update(outcome="failed", reason=f"failed in {report.when}: {message.message if message else ''}"[:500])
    elif report.when == "call":
        entry.update(outcome="passed", reason=None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--bench-outcomes", default=None)
    if not path:
        return
    interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
    for entry in _OUTCOMES.values():
        if entry.get("outcome") == "not run" and interrupted:
            entry["reason"] = "not reached: the bench phase hit its time limit"
    with open(path, "w") as f:
        json.dump({"exitstatus": int(exitstatus), "cases": _OUTCOMES}, f, indent=1)


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def cuda_env() -> dict:
    """The CUDA device, its name and the ceilings measured once for the session; skips without CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA case: this machine has no CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    harness.allow_many_recompiles()
    ceilings = harness.measure_ceilings(device)
    return {"device": device, "name": torch.cuda.get_device_name(device), "ceilings": ceilings}


@pytest.fixture
def cuda_device(cuda_env: dict):
    """The CUDA device; frees what the case allocated afterwards so that the next case starts clean."""
    yield cuda_env["device"]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def cpu_device() -> torch.device:
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# Machine info written into the JSON (and so into the results file and the report header)
# ---------------------------------------------------------------------------------------------------------


def _nvidia_smi(query: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - an optional package that fails to import has no version to report
        return None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    import gptkernels

    try:
        from gptkernels import sampling

        extension = getattr(sampling, "HAS_EXTENSION", None)
        cuda_extension = getattr(sampling, "HAS_CUDA_EXTENSION", None)
    except Exception:  # noqa: BLE001 - reported as unknown rather than failing the whole JSON
        extension = cuda_extension = None
    info = {
        "gptkernels": gptkernels.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "tiktoken": _version("tiktoken"),
        "liger_kernel": _version("liger_kernel") if harness.importable("liger_kernel") else None,
        "flashinfer": _version("flashinfer") if harness.importable("flashinfer") else None,
        "sampling_extension": extension,
        "sampling_cuda_extension": cuda_extension,
        "cpu": harness.cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # CPU timings are only meaningful when nothing else competes for the cores
        "load_avg_at_start": [round(x, 2) for x in _LOAD_AT_START] if _LOAD_AT_START else None,
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sms=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_l2_mib=round(harness.l2_bytes(torch.device("cuda", 0)) / 2**20, 1),
            driver=_nvidia_smi("driver_version"),
            cudnn=torch.backends.cudnn.version(),
        )
    machine_info["gptkernels"] = info
