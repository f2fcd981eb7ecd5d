"""Shared machinery of the benchmarks: devices, providers, timing, rotating inputs and roofline figures.

Timing. CPU cases use ``benchmark.pedantic`` with fixed rounds (CPU ops are synchronous). CUDA cases warm up
first (torch.compile and Triton autotuning stay outside the timing), then run
``benchmark.pedantic(fn, rounds=R, iterations=I)`` where every I-th call ends in ``torch.cuda.synchronize()``:
a round is I back-to-back calls timed from the first launch to the end of the last kernel, pytest-benchmark
divides it by I, so the JSON's statistics (median, ...) are per call and the synchronisation is paid once per
round instead of once per call.

Memory-bound cases rotate through several input sets whose total is a few times the L2 cache, so that no call
reads what the previous one left in L2 (H100: 50 MB).

Every case stores in ``benchmark.extra_info``: op, mode, shape, dtype, device (name), provider, and its figures
(``gbps``/``tflops`` with ``roofline`` naming the one that has a ceiling, peak memory, tokens/s, ...);
CUDA cases also carry the ceilings measured in the same run (``ceiling_gbps``, ``ceiling_tflops``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Run order (see conftest.py): a case's tier, lowest first. Under a time budget the later tiers are what is lost.
TIER_CEILING = 0  # the measured ceilings every CUDA case refers to
TIER_TARGET = 1  # gptkernels and the baseline of every case an issue sets a target for
TIER_COMPILED_SAMPLE = 2  # torch.compile baselines at one representative shape per op
TIER_COMPILED_TRAIN = 3  # the compiled GPT-2 training steps (a minute of compilation each)
TIER_REST = 4  # the remaining shapes and providers
TIER_COMPILED_REST = 5  # torch.compile at the remaining shapes

# Names the report relies on.
ROOFLINE_GBPS = "gbps"
ROOFLINE_TFLOPS = "tflops"
H100_L2_BYTES = 50 * 2**20

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), for the conventional MFU figure.
NOMINAL_BF16_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.2,
}


# ---------------------------------------------------------------------------------------------------------
# Devices and providers
# ---------------------------------------------------------------------------------------------------------


def importable(module: str) -> bool:
    """True when ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def optional(*providers: tuple[str, str]) -> list[str]:
    """The names of ``(provider, module)`` pairs whose module is installed (Liger-Kernel, FlashInfer: optional)."""
    return [name for name, module in providers if importable(module)]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 32 * 2**20
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or H100_L2_BYTES)


def nominal_peak_tflops(gpu_name: str) -> float | None:
    for key, value in NOMINAL_BF16_TFLOPS.items():
        if all(part in gpu_name for part in key.split()):
            return value
    return None


def allow_many_recompiles() -> None:
    """Every shape of the grid compiles once (``dynamic=False``); keep dynamo from falling back to eager silently
    after its default 8 recompilations of the same function."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(256, getattr(cfg, name)))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(4096, cfg.accumulated_recompile_limit)


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


class Rotation:
    """Several copies of a case's inputs, handed out in turn so that consecutive calls miss the L2 cache.

    ``make()`` builds one input set of about ``bytes_per_set`` bytes. The number of sets is chosen so that they
    cover at least 3x the L2 cache (one set when a set alone is that large).
    """

    def __init__(self, make: Callable[[], Any], bytes_per_set: int, device: torch.device, max_sets: int = 16):
        l2 = l2_bytes(device) if device.type == "cuda" else 0
        n = 1 if bytes_per_set >= 3 * l2 else min(max_sets, math.ceil(3 * l2 / max(bytes_per_set, 1)) + 1)
        self.sets = [make() for _ in range(n)]
        self._i = 0

    def __len__(self) -> int:
        return len(self.sets)

    def next(self) -> Any:
        s = self.sets[self._i]
        self._i = (self._i + 1) % len(self.sets)
        return s


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


class _SyncEvery:
    """Call ``fn``; every ``every``-th call then waits for the GPU, closing one timed round."""

    def __init__(self, fn: Callable[[], Any], every: int) -> None:
        self.fn, self.every, self.calls = fn, every, 0

    def __call__(self) -> None:
        self.fn()
        self.calls += 1
        if self.calls % self.every == 0:
            torch.cuda.synchronize()


def _median(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if not stats or getattr(benchmark, "disabled", False):
        return None  # --benchmark-disable: the function ran once, untimed
    return float(stats.stats.median)


def time_cpu(
    benchmark,
    fn: Callable[[], Any],
    *,
    rounds: int = 5,
    warmup: int = 1,
    max_seconds: float | None = None,
    first_call_s: float | None = None,
) -> float | None:
    """Median seconds per call of ``fn`` on the CPU, recorded by pytest-benchmark.

    With ``max_seconds``, fewer rounds (at least 2) run when ``first_call_s`` (the duration of an earlier call,
    measured here when not given) says that ``rounds`` would take longer: slow machines stay within budget.
    """
    if max_seconds is not None:
        if first_call_s is None:
            t0 = time.perf_counter()
            fn()
            first_call_s = time.perf_counter() - t0
            warmup = max(0, warmup - 1)
        rounds = max(2, min(rounds, int(max_seconds / max(first_call_s, 1e-9))))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
    return _median(benchmark)


def time_cuda(
    benchmark,
    fn: Callable[[], Any],
    *,
    rounds: int = 15,
    warmup_calls: int = 3,
    round_seconds: float = 2e-3,
    max_iterations: int = 200,
) -> float | None:
    """Median seconds per call of ``fn`` (which launches GPU work) measured end to end, recorded by pytest-benchmark.

    ``warmup_calls`` run first, untimed (compilation, autotuning, allocator warm-up); the number of calls per
    round is then chosen so that a round lasts about ``round_seconds``.
    """
    for _ in range(warmup_calls):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-7)
    iterations = max(1, min(max_iterations, int(round_seconds / one)))
    benchmark.pedantic(_SyncEvery(fn, iterations), rounds=rounds, iterations=iterations, warmup_rounds=1)
    torch.cuda.synchronize()
    benchmark.extra_info["iterations_per_round"] = iterations
    return _median(benchmark)


def cuda_event_median(fn: Callable[[], Any], *, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` by CUDA events (for the session's ceilings, which no benchmark fixture times)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """(peak bytes allocated during one call of ``fn`` above what was allocated before it, absolute peak)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - before, peak


# ---------------------------------------------------------------------------------------------------------
# Ceilings: what this GPU can do at best, measured in the same run
# ---------------------------------------------------------------------------------------------------------

COPY_BYTES = 1 << 30  # 1 GiB each way: far beyond L2
MATMUL_N = 8192


def copy_case(device: torch.device) -> tuple[Callable[[], Any], int]:
    """A device-to-device copy; returns (fn, bytes moved = read + written)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * COPY_BYTES


def matmul_case(device: torch.device) -> tuple[Callable[[], Any], float]:
    """A large bf16 matmul; returns (fn, FLOPs)."""
    a = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * MATMUL_N**3


def measure_ceilings(device: torch.device) -> dict[str, float]:
    fn, nbytes = copy_case(device)
    copy_s = cuda_event_median(fn)
    del fn
    fn, flops = matmul_case(device)
    mm_s = cuda_event_median(fn)
    del fn
    torch.cuda.empty_cache()
    return {"ceiling_gbps": nbytes / copy_s / 1e9, "ceiling_tflops": flops / mm_s / 1e12}


# ---------------------------------------------------------------------------------------------------------
# What each case records
# ---------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def describe(
    benchmark,
    *,
    op: str,
    provider: str,
    device: torch.device,
    shape: Sequence[int] | str,
    dtype: torch.dtype | str,
    mode: str | None = None,
    ceilings: dict[str, float] | None = None,
    **info: Any,
) -> None:
    """Fill ``extra_info`` with what identifies the case (call before timing)."""
    benchmark.extra_info.update(
        _jsonable(
            dict(
                op=op,
                mode=mode,
                provider=provider,
                shape=shape,
                dtype=dtype,
                device=device_name(device),
                device_type=device.type,
                **info,
            )
        )
    )
    if ceilings:
        benchmark.extra_info.update(ceilings)


def figures(
    benchmark,
    median_s: float | None,
    *,
    nbytes: float | None = None,
    flops: float | None = None,
    roofline: str | None = None,
    **info: Any,
) -> None:
    """Store the roofline figures of one call: GB/s from ``nbytes`` and TFLOP/s from ``flops``.

    ``roofline`` names the figure that the report compares with the measured ceiling ("gbps" or "tflops").
    """
    extra = benchmark.extra_info
    extra.update(_jsonable(info))
    if nbytes is not None:
        extra["bytes"] = float(nbytes)
    if flops is not None:
        extra["flops"] = float(flops)
    if roofline is not None:
        extra["roofline"] = roofline
    if median_s is None or median_s <= 0:
        return
    extra["median_s"] = median_s
    if nbytes is not None:
        extra["gbps"] = nbytes / median_s / 1e9
    if flops is not None:
        extra["tflops"] = flops / median_s / 1e12


def bench_launches(counter: Any) -> dict[str, int]:
    """A ``count_launches`` Counter as a plain dict for extra_info."""
    return {str(k): int(v) for k, v in sorted(counter.items())}


def warm_up_and_check(benchmark: Any, fn: Callable[[], Any], provider: str) -> None:
    """Call ``fn`` once (compilation and autotuning happen here, outside any measurement); for the gptkernels
    provider, prove that a Triton kernel ran and record the launches in extra_info."""
    from gptkernels.ops import count_launches

    with count_launches() as launches:
        fn()
    if provider.startswith("gptkernels"):
        assert sum(launches.values()) > 0, f"the {provider} provider ran no Triton kernel"
        benchmark.extra_info["kernel_launches"] = bench_launches(launches)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` inside the block, the previous setting after it. warn_only,
    so that PyTorch's own CUDA matmuls (the references) do not demand CUBLAS_WORKSPACE_CONFIG; the attention
    backward reads only whether the mode is on, and then runs its 7-matmul kernels."""
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
