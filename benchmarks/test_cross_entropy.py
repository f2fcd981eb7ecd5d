"""LM head + cross-entropy on CUDA: 8k/16k/32k tokens, width 768, V=50257, bf16, forward + backward.

Against eager ``F.cross_entropy((h @ W.T).float(), t)`` (the reference, which holds the logits whole) and its
compiled form. Each case records its time and the peak memory one forward+backward allocates above its
inputs. Figures: TFLOP/s of the three matmuls (6*N*C*V, the roofline figure) and GB/s of the fewest bytes
(hidden, weight, targets in; their gradients out). The issue's targets: <= 0.25x the eager peak memory and
<= 1.1x the eager time.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from gptkernels import ops

TOKENS = (8192, 16384, 32768)
WIDTH = 768
VOCAB = 50257
DTYPE = torch.bfloat16


def _reference(h, w, t):
    return ops.linear_cross_entropy_reference(h, w, t)


def _kernel(h, w, t):
    return ops.linear_cross_entropy(h, w, t, backend="triton")


def _liger(h, w, t):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(w, h, t)


def _impl(provider: str):
    if provider == "gptkernels":
        return _kernel
    if provider == "torch":
        return _reference
    if provider == "torch.compile":
        return torch.compile(_reference, dynamic=False)
    if provider == "liger":
        return _liger
    raise ValueError(provider)


def _cases():
    providers = ["gptkernels", "torch", "torch.compile", *harness.optional(("liger", "liger_kernel"))]
    for n in TOKENS:
        group = f"linear_cross_entropy fwd+bwd N={n} C={WIDTH} V={VOCAB} bf16"
        for provider in providers:
            yield pytest.param(n, provider, marks=pytest.mark.benchmark(group=group), id=f"N{n}-{provider}")


def bench_priority(params: dict) -> int:
    provider = params["provider"]
    if "compile" in provider:
        return harness.TIER_COMPILED_SAMPLE if params["n"] == 16384 else harness.TIER_COMPILED_REST
    return harness.TIER_TARGET if provider in ("gptkernels", "torch") else harness.TIER_REST


def bench_cost(params: dict) -> float:
    return 30.0 if "compile" in params["provider"] else 1.5


def bench_warmup(params: dict) -> list[tuple[str, float]]:
    """The row kernel compiles once (its block depends on V and the dtype only)."""
    return [("linear_cross_entropy", 2.0)] if params["provider"] == "gptkernels" else []


@pytest.mark.parametrize("n, provider", list(_cases()))
def test_linear_cross_entropy(benchmark, cuda_env, cuda_device, n, provider):
    device = cuda_device
    fn_op = _impl(provider)
    hidden = torch.randn(n, WIDTH, device=device, dtype=DTYPE, requires_grad=True)
    weight = (0.02 * torch.randn(VOCAB, WIDTH, device=device, dtype=DTYPE)).requires_grad_()
    targets = torch.randint(0, VOCAB, (n,), device=device)

    def fn():
        torch.autograd.grad(fn_op(hidden, weight, targets), (hidden, weight))

    harness.describe(
        benchmark,
        op="linear_cross_entropy",
        mode="fwd+bwd",
        provider=provider,
        device=device,
        shape=[n, WIDTH, VOCAB],
        dtype=DTYPE,
        ceilings=cuda_env["ceilings"],
        tokens=n,
        width=WIDTH,
        vocab=VOCAB,
    )
    harness.warm_up_and_check(benchmark, fn, provider)  # before the memory and time measurements
    peak_extra, peak_total = harness.peak_memory(fn, device)
    median = harness.time_cuda(benchmark, fn, rounds=10, warmup_calls=1)
    s = DTYPE.itemsize
    harness.figures(
        benchmark,
        median,
        flops=6.0 * n * WIDTH * VOCAB,
        nbytes=2 * (n * WIDTH + VOCAB * WIDTH) * s + 8 * n,
        roofline=harness.ROOFLINE_TFLOPS,
        peak_mem_bytes=peak_extra,
        peak_mem_total_bytes=peak_total,
    )
