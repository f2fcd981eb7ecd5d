"""One training step (forward, backward, AdamW): GPT-2 124M on CUDA and the ``tiny`` model on the CPU.

CUDA: batch 8 x 1024 tokens, bf16 autocast, fused AdamW, for kernels="torch" and "triton", each eager and under
``torch.compile``. Figures: tokens/s, TFLOP/s of the model's training FLOPs (6N + attention, the roofline figure,
so the report shows it as a share of the measured matmul ceiling), MFU against the GPU's datasheet bf16 peak
when known, and the peak memory of a step. The issue's target: kernels="triton" faster than "torch".

CPU: the ``tiny`` preset, batch 8 x 128, kernels="torch", plain AdamW: tokens/s.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import harness
from gptkernels import GPT, GPTConfig
from gptkernels.ops import count_launches

CUDA_PROVIDERS = ("torch", "triton", "torch+compile", "triton+compile")


def bench_priority(params: dict) -> int:
    if params["provider"].endswith("compile"):
        return harness.TIER_COMPILED_TRAIN
    return harness.TIER_TARGET if params["device_type"] == "cuda" else harness.TIER_REST


def bench_cost(params: dict) -> float:
    if params["device_type"] == "cpu":
        return 15.0
    return 120.0 if params["provider"].endswith("compile") else 6.0


def bench_warmup(params: dict) -> list[tuple[str, float]]:
    """kernels="triton": every op's kernels compile and attention autotunes at T=1024 (mostly cached by then)."""
    return [("train_step-triton", 10.0)] if params["provider"] == "triton" and params["device_type"] == "cuda" else []


def _cases():
    yield pytest.param(
        "cpu", "tiny", 8, 128, "torch", marks=pytest.mark.benchmark(group="train_step tiny 8x128 cpu"), id="cpu-tiny"
    )
    for provider in CUDA_PROVIDERS:
        yield pytest.param(
            "cuda",
            "gpt2",
            8,
            1024,
            provider,
            marks=pytest.mark.benchmark(group="train_step gpt2 8x1024 bf16 cuda"),
            id=f"cuda-gpt2-{provider}",
        )


@pytest.mark.parametrize("device_type, preset, batch, seq_len, provider", list(_cases()))
def test_train_step(benchmark, request, device_type, preset, batch, seq_len, provider):
    if device_type == "cuda":
        env = request.getfixturevalue("cuda_env")
        device, ceilings, gpu = request.getfixturevalue("cuda_device"), env["ceilings"], env["name"]
    else:
        device, ceilings, gpu = torch.device("cpu"), None, None
    kernels, compiled = provider.split("+")[0], provider.endswith("+compile")
    model = GPT(GPTConfig.preset(preset, context_length=max(seq_len, 128), kernels=kernels)).to(device)
    model.train()
    opt = model.configure_optimizer(lr=3e-4, weight_decay=0.1, fused=device.type == "cuda")
    run = torch.compile(model) if compiled else model
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (batch, seq_len), device=device)
    y = torch.randint(0, vocab, (batch, seq_len), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            _, loss = run(x, y, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = batch * seq_len
    flops = model.flops_per_token(seq_len) * tokens
    harness.describe(
        benchmark,
        op="train_step",
        mode="fwd+bwd+adamw",
        provider=provider,
        device=device,
        shape=[batch, seq_len],
        dtype="bfloat16 autocast" if device.type == "cuda" else torch.float32,
        ceilings=ceilings,
        model=preset,
        params=model.num_params(),
        kernels=kernels,
        compiled=compiled,
        tokens_per_step=tokens,
    )
    t0 = time.perf_counter()
    with count_launches() as launches:
        step()  # warm-up: compilation and autotuning
    first = time.perf_counter() - t0
    if kernels == "triton":
        assert sum(launches.values()) > 0, "kernels='triton' ran no Triton kernel"
    benchmark.extra_info["kernel_launches"] = harness.bench_launches(launches)
    info = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        median = harness.time_cuda(benchmark, step, rounds=8, warmup_calls=2, round_seconds=0.0)
        info["peak_mem_total_bytes"] = torch.cuda.max_memory_allocated(device)
        peak = harness.nominal_peak_tflops(gpu)
        if median and peak:
            info["mfu"] = flops / median / 1e12 / peak
            info["nominal_peak_tflops"] = peak
    else:
        median = harness.time_cpu(benchmark, step, rounds=5, warmup=0, max_seconds=8.0, first_call_s=first)
    harness.figures(
        benchmark,
        median,
        flops=flops,
        roofline=harness.ROOFLINE_TFLOPS if device.type == "cuda" else None,
        tokens_per_s=tokens / median if median else None,
        **info,
    )
