"""Bits per byte: the byte count behind it is exact, and it is the same number whatever the tokenizer."""

import math

import numpy as np
import torch

from gptkernels import GPT, GPTConfig
from gptkernels.evaluate import evaluate_tokens
from gptkernels.tokenizer import bits_per_byte, get_tokenizer, token_byte_lengths

TEXT = "Héllo wörld — naïve café, 東京. " * 3


def test_gpt2_byte_lengths_sum_to_the_utf8_length():
    tok = get_tokenizer("gpt2")
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.n_vocab,)
    ids = tok.encode_ordinary(TEXT)
    assert int(lengths[ids].sum()) == len(TEXT.encode("utf-8"))


def test_char_byte_lengths_sum_to_the_utf8_length():
    tok = get_tokenizer("char", text=TEXT)
    ids = tok.encode_ordinary(TEXT)
    assert int(token_byte_lengths(tok)[ids].sum()) == len(TEXT.encode("utf-8"))


def test_evaluate_tokens_reports_bits_per_byte_of_the_scored_tokens():
    torch.manual_seed(0)
    tok = get_tokenizer("char", text=TEXT)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    ids = np.array(tok.encode_ordinary(TEXT), dtype=np.int64)
    r = evaluate_tokens(model, ids, max_length=16, stride=8, tokenizer=tok)
    # every token but the first is scored exactly once
    assert r["bytes"] == len(TEXT.encode("utf-8")) - len(TEXT[0].encode("utf-8"))
    assert math.isclose(r["bpb"], r["loss"] * r["tokens"] / (math.log(2) * r["bytes"]), rel_tol=1e-12)
    assert "bpb" not in evaluate_tokens(model, ids, max_length=16)


def test_bits_per_byte_formula():
    assert math.isclose(bits_per_byte(math.log(2) * 10, 5), 2.0)
    assert math.isnan(bits_per_byte(1.0, 0))
