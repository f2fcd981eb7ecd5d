"""Host overhead per op call: the CPU time of a gptkernels op with its Triton launches stubbed out, against the
PyTorch op it replaces, at a tiny shape (3 x 5 x 64; CE: 15 rows, 50 classes; attention: one decoding step of
GPT-2 small, 12 heads of 64 over 64 cached keys, against F.scaled_dot_product_attention) where nothing but the
host path costs anything.

What remains with the launches stubbed is the op's own Python: argument checks, the backend choice, output
allocations, autograd bookkeeping and the matmuls cross-entropy issues through PyTorch. The issue's target: at
most 2x the PyTorch op's time, per call, for the no-grad forward (an inference call) and for forward + backward
(a training call: the gradients of ``out.sum()`` with respect to every input, the same for both providers). The
forward alone with autograd on is recorded too, not judged: there the ``autograd.Function`` apply and the saved
tensors cost ~4.5 us of LayerNorm's ~11 us, which puts it at ~2x an ``F.layer_norm`` whose own time swings between
5.5 and 9 us from one process to the next; linear_cross_entropy computes both gradients in that forward (its
backward only scales them), where the PyTorch forward computes the loss alone.

Each provider's median is recorded as usual; the gptkernels case also times both providers in alternating short
bursts and records the ratio of their fastest bursts (``vs_torch_interleaved``, what the report's target uses):
on a shared VM the medians of two cases timed seconds apart swung by 1.5x, the interleaved ratio much less
(though from one process to the next it still moved between 1.5x and 2.2x for LayerNorm's forward with autograd
on, seven runs of 2026-12-03, as the PyTorch op's own time did).

The CPU cases need neither a GPU nor Triton's interpreter (the stubbed kernels never run); on a CUDA machine
the same cases run on CUDA tensors too, where the PyTorch op's time includes its real kernel launch.
"""

from __future__ import annotations

import importlib
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from gptkernels import ops
from gptkernels.ops import _backend

OPS = ("layer_norm", "add_layer_norm", "bias_gelu", "linear_cross_entropy", "attention")
MODES = ("fwd", "fwd+bwd", "fwd-autograd")
CALLS_PER_ROUND = 200
_MODULES = ("layer_norm", "bias_gelu", "cross_entropy", "attention")


class _StubbedLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args)`` does nothing."""

    @staticmethod
    def _launch(*args, **kwargs) -> None:
        return None

    def __getitem__(self, grid):
        return self._launch


class _StubbedFinish(_StubbedLaunch):
    """The cross-entropy finishing kernel writes the flag that the op's ``_assert_async`` reads."""

    @staticmethod
    def _launch(*args, **kwargs) -> None:
        args[0].fill_(1)  # the row outputs and the scalars after them, ok among them: one small fill, counted
        # against gptkernels


@pytest.fixture
def stubbed_launches(monkeypatch):
    """Every Triton launch of the ops measured here becomes a no-op; the Triton path runs on CPU tensors."""
    for name in _MODULES:
        module = importlib.import_module(f"gptkernels.ops.{name}")
        for attr in dir(module):
            if attr.endswith("_kernel"):
                monkeypatch.setattr(module, attr, _StubbedLaunch())
    # attention launches its autotuned kernels through one function (which also picks the grid)
    monkeypatch.setattr(importlib.import_module("gptkernels.ops.attention"), "_launch", lambda *a, **k: None)
    ce = importlib.import_module("gptkernels.ops.cross_entropy")
    monkeypatch.setattr(ce, "_cross_entropy_finish_kernel", _StubbedFinish())
    # The ops' own backend choice runs, as if TRITON_INTERPRET=1 were set.
    monkeypatch.setattr(_backend, "interpreter_on", lambda: True)


def _inputs(device: torch.device, grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    return dict(
        x=randn(3, 5, 64),
        r=randn(3, 5, 64),
        w=randn(64),
        b=randn(64),
        h=randn(15, 64),
        W=randn(50, 64),
        t=torch.randint(0, 50, (15,), generator=g).to(device),
        q=randn(1, 12, 1, 64),
        k=randn(1, 12, 64, 64),
        v=randn(1, 12, 64, 64),
    )


def _call(op: str, provider: str, a: dict):
    """A zero-argument call of ``op`` by ``provider`` on the inputs ``a``; returns a tensor."""
    x, r, w, b, h, W, t, q, k, v = (a[name] for name in "x r w b h W t q k v".split())
    if provider == "gptkernels":
        return {
            "layer_norm": lambda: ops.layer_norm(x, w, b, backend="triton"),
            "add_layer_norm": lambda: ops.add_layer_norm(x, r, w, b, backend="triton")[1],
            "bias_gelu": lambda: ops.bias_gelu(x, b, backend="triton"),
            "linear_cross_entropy": lambda: ops.linear_cross_entropy(h, W, t, backend="triton"),
            "attention": lambda: ops.attention(q, k, v, backend="triton"),
        }[op]
    return {
        "layer_norm": lambda: F.layer_norm(x, (64,), w, b),
        "add_layer_norm": lambda: F.layer_norm(x + r, (64,), w, b),
        "bias_gelu": lambda: F.gelu(x + b, approximate="tanh"),
        "linear_cross_entropy": lambda: F.cross_entropy(F.linear(h, W), t),
        "attention": lambda: F.scaled_dot_product_attention(q, k, v),  # one query: nothing to mask
    }[op]


def _one_call(mode: str, fn_op, leaves: list[torch.Tensor]):
    """One call of ``fn_op`` as ``mode`` measures it."""
    if mode == "fwd":

        def one():
            with torch.no_grad():
                fn_op()

        return one
    if mode == "fwd+bwd":

        def one():  # the gradients are returned, not accumulated: a stubbed kernel leaves garbage in them,
            # and adding garbage (denormals) into .grad costs far more than the host path measured here
            torch.autograd.grad(fn_op().sum(), leaves, allow_unused=True)

        return one
    return fn_op


def _cases():
    for device in ("cpu", "cuda"):
        for op in OPS:
            for mode in MODES:
                for provider in ("gptkernels", "torch"):
                    group = f"host overhead {op} {mode} {device}"
                    yield pytest.param(
                        device,
                        op,
                        mode,
                        provider,
                        marks=pytest.mark.benchmark(group=group),
                        id=f"{device}-{op}-{mode}-{provider}",
                    )


def bench_priority(params: dict) -> int:
    # Not among the GPU check's first targets (its bench phase is full): the issue defines this target on the
    # CPU, where the stubbed host path is the same Python as on CUDA; the CUDA cases run when time is left.
    return harness.TIER_REST


def bench_cost(params: dict) -> float:
    return 0.3


@pytest.mark.parametrize("device, op, mode, provider", list(_cases()))
def test_host_overhead(benchmark, stubbed_launches, device, op, mode, provider):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA case: this machine has no CUDA device")
    dev = torch.device(device)
    inputs = _inputs(dev, grad=mode != "fwd")
    leaves = [t for t in inputs.values() if t.requires_grad]
    one = _one_call(mode, _call(op, provider, inputs), leaves)

    def fn():
        for _ in range(CALLS_PER_ROUND):
            one()

    harness.describe(
        benchmark,
        op="host_overhead",
        mode=mode,
        provider=provider,
        device=dev,
        shape=op,
        dtype=torch.float32,
        measured_op=op,
        calls_per_round=CALLS_PER_ROUND,
    )
    with ops.count_launches() as launches:
        fn()  # warm-up; for gptkernels, proof that the stubbed launchers were reached
    if provider == "gptkernels":
        assert sum(launches.values()) > 0, "the Triton path was not taken"
    median = harness.time_cpu(benchmark, fn, rounds=15, warmup=1)
    if median is not None:
        benchmark.extra_info["host_us_per_call"] = median / CALLS_PER_ROUND * 1e6
    if provider == "gptkernels":
        theirs = _one_call(mode, _call(op, "torch", inputs), leaves)
        ours_s, theirs_s = _fastest_bursts(one, theirs, sync=torch.cuda.synchronize if dev.type == "cuda" else None)
        benchmark.extra_info["host_us_per_call_fastest"] = ours_s * 1e6
        benchmark.extra_info["torch_us_per_call_fastest"] = theirs_s * 1e6
        benchmark.extra_info["vs_torch_interleaved"] = ours_s / theirs_s


def _fastest_bursts(
    ours, theirs, *, bursts: int = 200, calls: int = 25, max_seconds: float = 3.0, sync=None
) -> tuple[float, float]:
    """Seconds per call of ``ours`` and ``theirs`` in their fastest burst of ``calls`` calls, the two alternating
    burst by burst (at most ``bursts`` each, at most ~``max_seconds`` in all), so that a noisy neighbour slows
    both alike."""
    best = [float("inf"), float("inf")]
    deadline = time.perf_counter() + max_seconds
    for _ in range(bursts):
        for i, fn in enumerate((ours, theirs)):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            if sync is not None:
                sync()
            best[i] = min(best[i], (time.perf_counter() - t0) / calls)
        if time.perf_counter() > deadline:
            break
    return best[0], best[1]
