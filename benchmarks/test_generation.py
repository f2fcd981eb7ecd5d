"""Generation speed on the CPU with and without the KV cache, at 128 and 512 tokens of context.

A small GPT (the ``tiny`` preset: 8 layers, width 64, GPT-2's 50257-token vocabulary) with its context widened to
1024, kernels="torch", greedy decoding of 32 new tokens for one sequence. Without the cache every step runs the
whole window through the model; with it, one position per step. Figure: new tokens/s.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import harness
from gptkernels import GPT, GPTConfig

CONTEXTS = (128, 512)
NEW_TOKENS = 32
PROVIDERS = ("kv_cache", "no_cache")


def bench_priority(params: dict) -> int:
    return harness.TIER_REST


def bench_cost(params: dict) -> float:
    # no_cache runs the whole window per token; on a 2-core CPU ctx=512 takes ~10 s per call
    return 5.0 if params["provider"] == "kv_cache" else 2.0 + 0.08 * params["context"] * 3


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", context_length=1024, kernels="torch")).eval()


@pytest.mark.parametrize(
    "context, provider",
    [
        pytest.param(
            c, p, marks=pytest.mark.benchmark(group=f"generation ctx={c} +{NEW_TOKENS} tiny cpu"), id=f"{c}-{p}"
        )
        for c in CONTEXTS
        for p in PROVIDERS
    ],
)
def test_generation(benchmark, model, context, provider):
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (1, context))
    use_cache = provider == "kv_cache"

    def fn():
        return model.generate(idx, NEW_TOKENS, temperature=0.0, use_cache=use_cache)

    harness.describe(
        benchmark,
        op="generation",
        mode="greedy",
        provider=provider,
        device=torch.device("cpu"),
        shape=[1, context],
        dtype=torch.float32,
        context=context,
        new_tokens=NEW_TOKENS,
        model=dict(n_layers=cfg.n_layers, emb_dim=cfg.emb_dim, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size),
        kernels=cfg.kernels,
    )
    t0 = time.perf_counter()
    out = fn()  # also the warm-up
    first = time.perf_counter() - t0
    assert out.shape == (1, context + NEW_TOKENS)
    median = harness.time_cpu(benchmark, fn, rounds=5, warmup=0, max_seconds=10.0, first_call_s=first)
    harness.figures(benchmark, median, tokens_per_s=NEW_TOKENS / median if median else None)
