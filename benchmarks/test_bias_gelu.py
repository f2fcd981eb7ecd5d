"""Bias + tanh-GELU (the MLP activation) on CUDA: 16k rows x 4*768, 4*1024, 4*1600 columns, bf16, fwd and fwd+bwd.

Roofline figure: GB/s = the fewest bytes the op must move / time (fwd: read x, write y; bwd: read x and dy, write
dx; bias and its gradient are one row). The issue's target: >= 80% of the measured copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from gptkernels import ops

ROWS = 16384
WIDTHS = (4 * 768, 4 * 1024, 4 * 1600)
DTYPE = torch.bfloat16


def _ref(x, bias):
    return ops.bias_gelu_reference(x, bias)


def _kernel(x, bias):
    return ops.bias_gelu(x, bias, backend="triton")


def _impl(provider: str):
    if provider == "gptkernels":
        return _kernel
    if provider == "torch":
        return _ref
    if provider == "torch.compile":
        return torch.compile(_ref, dynamic=False)
    raise ValueError(provider)


def _cases():
    for mode in ("fwd+bwd", "fwd"):
        for n in WIDTHS:
            for provider in ("gptkernels", "torch", "torch.compile"):
                group = f"bias_gelu {mode} {ROWS}x{n} bf16"
                yield pytest.param(
                    mode, n, provider, marks=pytest.mark.benchmark(group=group), id=f"{mode}-{n}-{provider}"
                )


def min_bytes(mode: str, m: int, n: int, itemsize: int) -> int:
    t = m * n * itemsize
    fwd = 2 * t + n * itemsize
    return fwd if mode == "fwd" else fwd + 3 * t + 2 * n * itemsize


def bench_priority(params: dict) -> int:
    if "compile" in params["provider"]:
        sample = params["mode"] == "fwd+bwd" and params["n"] == WIDTHS[0]
        return harness.TIER_COMPILED_SAMPLE if sample else harness.TIER_COMPILED_REST
    return harness.TIER_TARGET


def bench_cost(params: dict) -> float:
    return 25.0 if "compile" in params["provider"] else 1.0


def bench_warmup(params: dict) -> list[tuple[str, float]]:
    """One tile for every width here (256 columns), so the kernels compile once per mode."""
    return [(f"bias_gelu-{params['mode']}", 1.5)] if params["provider"] == "gptkernels" else []


@pytest.mark.parametrize("mode, n, provider", list(_cases()))
def test_bias_gelu(benchmark, cuda_env, cuda_device, mode, n, provider):
    device, m = cuda_device, ROWS
    fn_op = _impl(provider)
    train = mode == "fwd+bwd"
    bias = (0.1 * torch.randn(n, device=device, dtype=DTYPE)).requires_grad_(train)

    def make():
        x = torch.randn(m, n, device=device, dtype=DTYPE).requires_grad_(train)
        dy = torch.randn(m, n, device=device, dtype=DTYPE) if train else None
        return x, dy

    rot = harness.Rotation(make, (2 if train else 1) * m * n * DTYPE.itemsize, device)

    if train:

        def fn():
            x, dy = rot.next()
            torch.autograd.grad(fn_op(x, bias), [x, bias], dy)

    else:

        def fn():
            x, _ = rot.next()
            with torch.no_grad():
                fn_op(x, bias)

    harness.describe(
        benchmark,
        op="bias_gelu",
        mode=mode,
        provider=provider,
        device=device,
        shape=[m, n],
        dtype=DTYPE,
        ceilings=cuda_env["ceilings"],
        rows=m,
        width=n,
        input_sets=len(rot),
    )
    harness.warm_up_and_check(benchmark, fn, provider)
    median = harness.time_cuda(benchmark, fn)
    harness.figures(benchmark, median, nbytes=min_bytes(mode, m, n, DTYPE.itemsize), roofline=harness.ROOFLINE_GBPS)
