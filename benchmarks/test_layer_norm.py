"""LayerNorm and residual-add + LayerNorm on CUDA: 16k rows x width 768/1024/1600/4096, bf16, fwd and fwd+bwd.

Roofline figure: GB/s = the fewest bytes the op must move / time (fwd: read x [and the residual], write the
output [and the sum]; bwd: read the saved input and the incoming gradients, write the input gradient). The
issue's target: fwd+bwd at >= 80% of the measured copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from gptkernels import ops

ROWS = 16384
WIDTHS = (768, 1024, 1600, 4096)
EPS = 1e-5
DTYPE = torch.bfloat16


def _ln_ref(x, residual, weight, bias):
    return ops.layer_norm_reference(x, weight, bias, EPS)


def _add_ln_ref(x, residual, weight, bias):
    return ops.add_layer_norm_reference(x, residual, weight, bias, EPS)


def _ln_kernel(x, residual, weight, bias):
    return ops.layer_norm(x, weight, bias, EPS, backend="triton")


def _add_ln_kernel(x, residual, weight, bias):
    return ops.add_layer_norm(x, residual, weight, bias, EPS, backend="triton")


def _ln_liger(x, residual, weight, bias):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return LigerLayerNormFunction.apply(x, weight, bias, EPS)


def _impl(op: str, provider: str):
    if provider == "gptkernels":
        return _ln_kernel if op == "layer_norm" else _add_ln_kernel
    ref = _ln_ref if op == "layer_norm" else _add_ln_ref
    if provider == "torch":
        return ref
    if provider == "torch.compile":
        return torch.compile(ref, dynamic=False)
    if provider == "liger":
        return _ln_liger
    raise ValueError(provider)


def _cases():
    for op in ("layer_norm", "add_layer_norm"):
        for mode in ("fwd+bwd", "fwd"):
            for n in WIDTHS:
                providers = ["gptkernels", "torch", "torch.compile"]
                if op == "layer_norm":
                    providers += harness.optional(("liger", "liger_kernel"))
                for provider in providers:
                    group = f"{op} {mode} {ROWS}x{n} bf16"
                    yield pytest.param(
                        op,
                        mode,
                        n,
                        provider,
                        marks=pytest.mark.benchmark(group=group),
                        id=f"{op}-{mode}-{n}-{provider}",
                    )


def min_bytes(op: str, mode: str, m: int, n: int, itemsize: int) -> int:
    """Fewest bytes moved: per-row tensors of m*n elements, plus weight/bias (n each) and fp32 row stats."""
    t = m * n * itemsize
    fwd = (4 if op == "add_layer_norm" else 2) * t + 2 * n * itemsize
    if mode == "fwd":
        return fwd
    # bwd reads x (or the saved sum), dy [and the sum's own gradient], the stats and weight; writes dx, dw, db.
    bwd = (4 if op == "add_layer_norm" else 3) * t + 8 * m + 3 * n * itemsize
    return fwd + 8 * m + bwd


def bench_priority(params: dict) -> int:
    train = params["mode"] == "fwd+bwd"
    if "compile" in params["provider"]:
        return harness.TIER_COMPILED_SAMPLE if train and params["n"] == 1024 else harness.TIER_COMPILED_REST
    return harness.TIER_TARGET if train and params["provider"] in ("gptkernels", "torch") else harness.TIER_REST


def bench_cost(params: dict) -> float:
    return 25.0 if "compile" in params["provider"] else 1.0


def bench_warmup(params: dict) -> list[tuple[str, float]]:
    """The forward and backward kernels compile once per (op, mode, width): their tile depends on the width."""
    if params["provider"] != "gptkernels":
        return []
    return [(f"{params['op']}-{params['mode']}-{params['n']}", 1.5)]


@pytest.mark.parametrize("op, mode, n, provider", list(_cases()))
def test_layer_norm(benchmark, cuda_env, cuda_device, op, mode, n, provider):
    device, m = cuda_device, ROWS
    fn_op = _impl(op, provider)
    add = op == "add_layer_norm"
    train = mode == "fwd+bwd"
    weight = (1 + 0.1 * torch.randn(n, device=device, dtype=DTYPE)).requires_grad_(train)
    bias = (0.1 * torch.randn(n, device=device, dtype=DTYPE)).requires_grad_(train)

    def make():
        x = torch.randn(m, n, device=device, dtype=DTYPE).requires_grad_(train)
        r = torch.randn(m, n, device=device, dtype=DTYPE).requires_grad_(train) if add else None
        grads = [torch.randn(m, n, device=device, dtype=DTYPE) for _ in range((2 if add else 1) if train else 0)]
        return x, r, grads

    n_tensors = (2 if add else 1) * (2 if train else 1)
    rot = harness.Rotation(make, n_tensors * m * n * DTYPE.itemsize, device)

    if train:

        def fn():
            x, r, grads = rot.next()
            out = fn_op(x, r, weight, bias)
            outs = list(out) if add else [out]
            inputs = [x, r, weight, bias] if add else [x, weight, bias]
            torch.autograd.grad(outs, inputs, grads)

    else:

        def fn():
            x, r, _ = rot.next()
            with torch.no_grad():
                fn_op(x, r, weight, bias)

    harness.describe(
        benchmark,
        op=op,
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
    harness.figures(
        benchmark,
        median,
        nbytes=min_bytes(op, mode, m, n, DTYPE.itemsize),
        roofline=harness.ROOFLINE_GBPS,
    )
