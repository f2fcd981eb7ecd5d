"""The ceilings every CUDA case is compared with: a device-to-device copy (GB/s) and a bf16 matmul (TFLOP/s).

The session fixture ``cuda_env`` measures them once (CUDA events) and stores them in every CUDA case's
``extra_info``; the two cases here time the same work through pytest-benchmark so that the JSON holds them as
their own group, "ceiling".
"""

from __future__ import annotations

import pytest

from benchmarks import harness


def bench_priority(params: dict) -> int:
    return harness.TIER_CEILING


@pytest.mark.benchmark(group="ceiling")
@pytest.mark.parametrize("provider", ["copy", "matmul"])
def test_ceiling(benchmark, cuda_env, cuda_device, provider):
    if provider == "copy":
        fn, nbytes = harness.copy_case(cuda_device)
        harness.describe(
            benchmark,
            op="ceiling",
            mode="copy",
            provider=provider,
            device=cuda_device,
            shape=[nbytes // 2],
            dtype="uint8",
            ceilings=cuda_env["ceilings"],
        )
        median = harness.time_cuda(benchmark, fn, rounds=20)
        harness.figures(benchmark, median, nbytes=nbytes, roofline=harness.ROOFLINE_GBPS)
    else:
        fn, flops = harness.matmul_case(cuda_device)
        n = harness.MATMUL_N
        harness.describe(
            benchmark,
            op="ceiling",
            mode="matmul",
            provider=provider,
            device=cuda_device,
            shape=[n, n, n],
            dtype="bfloat16",
            ceilings=cuda_env["ceilings"],
        )
        median = harness.time_cuda(benchmark, fn, rounds=20)
        harness.figures(benchmark, median, flops=flops, roofline=harness.ROOFLINE_TFLOPS)
