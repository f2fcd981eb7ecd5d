"""Text in, token windows out: document sources, parallel tokenization, train/val splits and windowed datasets.

A *source* is one of

* a text file (one document) or a folder of text files (recursive, sorted; hidden and binary files skipped);
* ``builtin``: the English documentation that ships inside CPython (``pydoc_data.topics``), one document per topic;
* ``hf:NAME[:CONFIG]``: the ``text`` column of a Hugging Face dataset, streamed (``datasets.load_dataset``);
* a local ``.json``/``.jsonl``/``.parquet`` file, read the same way through ``datasets``;
* (for :func:`load_tokens`) a folder written by ``python -m gptkernels.prepare``, read as memmaps.

``load_tokens(sources, tokenizer)`` gives a :class:`TokenSplit`; ``WindowDataset(split.train, max_length)`` cuts
it into training windows, with the next-token shift done here (``shift="explicit"``) or in the loss
(``shift="implicit"``, Hugging Face style, with :func:`gptkernels.model.shift_labels`).
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import mmap
import multiprocessing
import operator
import os
import re
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .tokenizer import (
    encode_ordinary,
    get_tokenizer,
    needs_training_text,
    same_tokenizer,
    token_dtype,
    tokenizer_from_spec,
    tokenizer_to_spec,
)

BUILTIN = "builtin"
META_FILE = "meta.json"  # marks a folder written by gptkernels.prepare
FORMAT = "gptkernels.tokens"
FORMAT_VERSION = 1
SOURCE_HELP = "a text file, a folder, 'builtin', 'hf:NAME[:CONFIG]', a .json/.jsonl/.parquet file or a prepared folder"
_DATASETS_SUFFIXES = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json", ".parquet": "parquet"}


# ---------------------------------------------------------------------------------------------------------------
# Decoding bytes, counting what could not be decoded
_replaced = threading.local()


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    _replaced.n += err.end - err.start  # type: ignore[attr-defined]
    return "\ufffd", err.end  # type: ignore[attr-defined]


codecs.register_error("gptkernels.replace_and_count", _replace_and_count)


# UTF-32 before UTF-16: the UTF-32-LE mark begins with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def text_encoding(data: bytes) -> str:
    """``utf-16``/``utf-32`` when ``data`` starts with that byte-order mark (Windows editors write them), else
    ``utf-8``."""
    return next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")


def decode_bytes(data: bytes) -> tuple[str, int]:
    """Text of ``data`` (UTF-8, or UTF-16/32 with a byte-order mark) with undecodable bytes replaced by U+FFFD,
    and how many bytes were replaced."""
    encoding = text_encoding(data)
    try:
        text, n_bad = data.decode(encoding), 0
    except UnicodeDecodeError:
        _replaced.n = 0
        text = data.decode(encoding, errors="gptkernels.replace_and_count")
        n_bad = _replaced.n
    return text.removeprefix("\ufeff"), n_bad  # a byte-order mark is not text


# ---------------------------------------------------------------------------------------------------------------
# Sources
_SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")  # the names prepare gives its shards


def _prepared_state(path: str | os.PathLike[str]) -> str | None:
    """``"prepared"`` for a folder written by gptkernels.prepare, ``"damaged"`` for one whose meta.json cannot be
    read or that has token shards without one (an interrupted prepare), None for any other folder (a meta.json
    of another program is not ours)."""
    root = Path(path)
    meta = root / META_FILE
    if not meta.is_file():
        return "damaged" if _has_shards(root) else None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "damaged" if _has_shards(root) or FORMAT.encode() in _head(meta) else None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return "prepared"
    return "damaged" if _has_shards(root) else None


def _has_shards(root: Path) -> bool:
    try:
        return root.is_dir() and any(_SHARD_NAME.match(p.name) for p in root.iterdir())
    except OSError:
        return False


def _head(p: Path, n: int = 1 << 16) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``python -m gptkernels.prepare`` (with a readable meta.json)."""
    return _prepared_state(path) == "prepared"


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a prepared folder (tokenizer spec, dtype, shards, token and document counts), checked:
    a damaged or incomplete one is a ``ValueError`` naming the file."""
    meta_path = Path(path) / META_FILE
    state = _prepared_state(path)
    if state is None:
        raise ValueError(f"{os.fspath(path)!r} is not a folder written by gptkernels.prepare (no valid {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{meta_path} is missing: the folder holds token shards but no {META_FILE} (an interrupted "
            "gptkernels.prepare?); prepare it again"
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path} is damaged ({e}); prepare the folder again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is damaged (not a {FORMAT} description); prepare the folder again")
    version = meta.get("version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{meta_path}: token format version {version!r} is newer than this gptkernels")
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{meta_path} is damaged: {problem}; prepare the folder again")
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a parsed meta.json, or None."""
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {meta.get('dtype')!r} is not uint16 or uint32"
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("name"), str):
        return "no tokenizer spec"
    if not isinstance(tok.get("n_vocab"), int) or tok["n_vocab"] < 1:
        return f"tokenizer n_vocab {tok.get('n_vocab')!r} is not a positive integer"
    shards = meta.get("shards")
    if not isinstance(shards, dict):
        return "no shard list"
    for split in ("train", "val"):
        for shard in shards.get(split, None) if isinstance(shards.get(split), list) else [None]:
            if not (
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and _SHARD_NAME.match(shard["file"])
                and isinstance(shard.get("tokens"), int)
                and shard["tokens"] >= 0
            ):
                return f"bad {split} shard entry {shard!r}"
    return None


def _parse_sources(sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[tuple[str, Any]]:
    """Check every source up front and classify it: (kind, value)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    parsed: list[tuple[str, Any]] = []
    for source in sources:
        s = os.fspath(source)
        if s == BUILTIN:
            parsed.append(("builtin", s))
        elif s.startswith("hf:"):
            name, _, config = s[3:].partition(":")
            if not name:
                raise ValueError(
                    f"data source {s!r}: expected hf:NAME[:CONFIG], e.g. hf:HuggingFaceFW/fineweb:sample-10BT"
                )
            parsed.append(("hf", (name, config or None)))
        else:
            p = Path(s)
            if not p.exists():
                raise FileNotFoundError(f"data source not found: {s!r} (expected {SOURCE_HELP})")
            if p.is_dir():
                state = _prepared_state(p)
                if state == "damaged":
                    read_meta(p)  # raises, naming what is wrong
                parsed.append(("prepared" if state == "prepared" else "folder", p))
            elif builder := _datasets_builder(p):
                parsed.append(("datasets", (builder, p)))
            else:
                parsed.append(("file", p))
    if not parsed:
        raise ValueError(f"no data sources given (expected {SOURCE_HELP})")
    return parsed


def _datasets_builder(p: Path) -> str | None:
    name = p.name.lower()
    return next((b for suffix, b in _DATASETS_SUFFIXES.items() if name.endswith(suffix)), None)


def _read_text_file(p: Path, stats: dict[str, Any], skip_binary: bool) -> str | None:
    data = p.read_bytes()
    # NUL bytes: not text (images, archives, token shards), unless a byte-order mark says UTF-16/32.
    if skip_binary and b"\x00" in data[:8192] and text_encoding(data) == "utf-8":
        stats["skipped_files"] += 1
        return None
    text, n_bad = decode_bytes(data)
    if n_bad:
        stats["replaced_bytes"] += n_bad
        warnings.warn(f"{p}: {n_bad} undecodable byte(s) replaced with U+FFFD", UnicodeWarning, stacklevel=3)
    return text


def _iter_folder(root: Path, stats: dict[str, Any]) -> Iterator[str]:
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted and pruned in place so that the walk is deterministic and skips hidden and prepared folders.
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and _prepared_state(Path(dirpath) / d) is None
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            text = _read_text_file(Path(dirpath) / name, stats, skip_binary=True)
            if text is not None:
                yield text
            else:
                skipped.append(name)
    if skipped:  # said once per folder: a folder of images would otherwise warn once per file
        warnings.warn(
            f"{root}: skipped {len(skipped)} binary file(s) (NUL bytes and no UTF-16/32 byte-order mark): "
            + ", ".join(skipped[:3])
            + (", ..." if len(skipped) > 3 else ""),
            UserWarning,
            stacklevel=3,
        )


def _iter_builtin() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip the documentation out of CPython
        raise RuntimeError("the 'builtin' corpus needs pydoc_data, which this Python installation lacks") from e
    for key in sorted(topics):
        yield topics[key]


def _iter_datasets(label: str, text_column: str, *args: Any, **kwargs: Any) -> Iterator[str]:
    with _hub_errors(label):
        yield from _iter_rows(label, text_column, *args, **kwargs)


@contextlib.contextmanager
def _hub_errors(label: str) -> Iterator[None]:
    """A dataset that cannot be fetched (no network, offline mode, not in the cache, no such dataset) is one
    ``ValueError`` line instead of ``datasets``' ConnectionError traceback."""
    try:
        yield
    except (ConnectionError, FileNotFoundError, TimeoutError) as e:
        raise ValueError(_hub_message(label, e)) from None
    except Exception as e:
        if type(e).__name__ in ("DatasetNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            raise ValueError(_hub_message(label, e)) from None
        raise


def _hub_message(label: str, e: BaseException) -> str:
    offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    why = "offline mode (HF_HUB_OFFLINE)" if offline else "no network, or no such dataset"
    return f"data source {label!r}: cannot fetch it: {why}, and the dataset is not in the local cache ({e})"


def _iter_rows(label: str, text_column: str, *args: Any, **kwargs: Any) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(*args, split="train", streaming=True, **kwargs)
    for row in ds:
        if text_column not in row:
            raise ValueError(f"data source {label!r} has no {text_column!r} column; its columns are {sorted(row)}")
        text = row[text_column]
        if text is None:
            continue
        if not isinstance(text, str):
            raise TypeError(f"data source {label!r}: column {text_column!r} holds {type(text).__name__}, not text")
        yield text


def _iter_source(kind: str, value: Any, stats: dict[str, Any], text_column: str) -> Iterator[str]:
    if kind == "builtin":
        yield from _iter_builtin()
    elif kind == "hf":
        name, config = value
        yield from _iter_datasets(f"hf:{name}", text_column, name, config)
    elif kind == "datasets":
        builder, p = value
        yield from _iter_rows(str(p), text_column, builder, data_files=str(p))
    elif kind == "folder":
        yield from _iter_folder(value, stats)
    elif kind == "file":
        text = _read_text_file(value, stats, skip_binary=False)
        if text is not None:
            yield text
    else:  # prepared folders hold tokens, not documents
        raise ValueError(f"{str(value)!r} is a prepared token folder; read it with gptkernels.data.load_tokens")


def _documents(
    parsed: list[tuple[str, Any]], max_documents: int | None, text_column: str, stats: dict[str, Any]
) -> Iterator[str]:
    for key in ("documents", "replaced_bytes", "skipped_files"):
        stats.setdefault(key, 0)
    start = stats["documents"]
    for kind, value in parsed:
        for text in _iter_source(kind, value, stats, text_column):
            if not text:
                continue  # an empty document would only add an <|endoftext|>
            if max_documents is not None and stats["documents"] - start >= max_documents:
                return
            stats["documents"] += 1
            yield text
    if stats["documents"] == start:
        names = [str(v) if k != "hf" else f"hf:{v[0]}" for k, v in parsed]
        raise ValueError(f"empty corpus: no non-empty documents in {names}")


def iter_documents(
    sources: Sequence[str | os.PathLike[str]] | str,
    *,
    max_documents: int | None = None,
    text_column: str = "text",
    stats: dict[str, Any] | None = None,
) -> Iterator[str]:
    """The documents of ``sources``, merged in order, as strings.

    Args:
        sources: see the module docstring; a single string is one source. Every path is checked here, at the
            call: a missing one is a ``FileNotFoundError`` naming it.
        max_documents: stop after this many documents.
        text_column: the column read from ``hf:``/``.json``/``.parquet`` sources.
        stats: a dict that receives ``documents``, ``replaced_bytes`` (undecodable bytes replaced by U+FFFD; each
            file with some also raises a ``UnicodeWarning``) and ``skipped_files`` (binary files in folders).
    Raises ``ValueError`` at the end of the iteration when the corpus has no non-empty document.
    """
    parsed = _parse_sources(sources)
    for kind, value in parsed:
        if kind == "prepared":
            raise ValueError(f"{str(value)!r} is a prepared token folder; read it with gptkernels.data.load_tokens")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be a positive integer, got {max_documents!r}")
    return _documents(parsed, max_documents, text_column, {} if stats is None else stats)


# ---------------------------------------------------------------------------------------------------------------
# Tokenization
_PARALLEL_MIN_CHARS = 1 << 21  # below ~2 MB of text, starting worker processes costs more than it saves
_worker: dict[str, Any] = {}
_CHECK_CHUNK = 1 << 24  # tokens read at a time when a shard's ids are checked against the vocabulary


def default_num_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _encode_doc(tok: Any, text: str, dtype: np.dtype) -> np.ndarray:
    ids = encode_ordinary(tok, text)
    out = np.empty(len(ids) + 1, dtype=dtype)
    out[:-1] = ids
    out[-1] = tok.eot_token
    return out


def _init_worker(tok_or_spec: Any) -> None:
    tok = tokenizer_from_spec(tok_or_spec) if isinstance(tok_or_spec, dict) else tok_or_spec
    _worker.update(tok=tok, dtype=token_dtype(tok.n_vocab))


def _encode_docs(docs: list[str]) -> list[np.ndarray]:
    return [_encode_doc(_worker["tok"], text, _worker["dtype"]) for text in docs]


def _tokenize_parallel(docs: Iterator[str], tok: Any, num_workers: int, chunk_docs: int) -> Iterator[np.ndarray]:
    try:
        init: Any = tokenizer_to_spec(tok)  # small; each worker rebuilds the tokenizer from it
    except ValueError:
        init = tok  # a custom tokenizer travels pickled
    with multiprocessing.get_context().Pool(num_workers, initializer=_init_worker, initargs=(init,)) as pool:
        # apply_async with a bounded queue, not imap: imap would read the whole (streamed) corpus ahead.
        pending: deque[Any] = deque()
        while chunk := list(itertools.islice(docs, chunk_docs)):
            pending.append(pool.apply_async(_encode_docs, (chunk,)))
            if len(pending) >= 2 * num_workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def tokenize_documents(
    docs: Iterable[str], tokenizer: Any = "gpt2", *, num_workers: int | None = None, chunk_docs: int = 64
) -> Iterator[np.ndarray]:
    """One token array per document, each ending with ``<|endoftext|>``, in order.

    Args:
        docs: documents (strings); consumed lazily.
        tokenizer: a tokenizer from :func:`gptkernels.tokenizer.get_tokenizer` or its name. Special-token text
            inside a document is encoded as ordinary text.
        num_workers: worker processes. ``None``: serial for the first ~2 MB of text, then one process per core
            (at most 8) if there is more; ``0``/``1``: always serial; ``N > 1``: N processes from the start.
        chunk_docs: documents per task sent to a worker.
    Yields:
        (n_tokens + 1,) uint16 arrays (uint32 when the vocabulary has more than 65,536 tokens).
    """
    tok = get_tokenizer(tokenizer)
    dtype = token_dtype(tok.n_vocab)
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers must be a non-negative integer or None, got {num_workers!r}")
    if chunk_docs < 1:
        raise ValueError(f"chunk_docs must be a positive integer, got {chunk_docs!r}")
    docs = iter(docs)
    workers = default_num_workers() if num_workers is None else num_workers
    if num_workers is None and workers > 1:
        seen = 0
        for text in docs:
            yield _encode_doc(tok, text, dtype)
            seen += len(text)
            if seen >= _PARALLEL_MIN_CHARS:
                break
        else:
            return  # a small corpus: done without starting any process
    if workers <= 1:
        for text in docs:
            yield _encode_doc(tok, text, dtype)
        return
    yield from _tokenize_parallel(docs, tok, workers, chunk_docs)


# ---------------------------------------------------------------------------------------------------------------
# Train/val split
def _eot_positions(tokens: Any, eot: int, lo: int, hi: int) -> np.ndarray:
    """Document boundaries b in [lo, hi) (positions right after an <|endoftext|>)."""
    if hi <= lo:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(np.asarray(tokens[lo - 1 : hi - 1]) == eot) + lo


def split_point(tokens: Any, eot: int, val_fraction: float, chunk: int = 1 << 20) -> int:
    """Where the validation split starts: the last ``val_fraction`` of ``tokens``, moved to the nearest
    document boundary when one lies within half the validation size (else mid-document). Reads ``tokens``
    (an array or memmap) a chunk at a time. The split is non-empty on both sides when ``val_fraction > 0``."""
    n = len(tokens)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if val_fraction == 0.0:
        return n
    if n < 2:
        raise ValueError(f"a corpus of {n} token(s) is too small to split into train and val")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    target = n - n_val
    lo, hi = max(1, target - n_val // 2), min(n - 1, target + n_val // 2)  # candidate boundaries: [lo, hi]
    best = None
    for start in range(target, hi + 1, chunk):  # nearest boundary at or after the target
        found = _eot_positions(tokens, eot, start, min(hi + 1, start + chunk))
        if found.size:
            best = int(found[0])
            break
    for end in range(target, lo, -chunk):  # nearest boundary before it
        found = _eot_positions(tokens, eot, max(lo, end - chunk), end)
        if found.size:
            if best is None or target - int(found[-1]) < best - target:
                best = int(found[-1])
            break
    return target if best is None else best


# ---------------------------------------------------------------------------------------------------------------
# Loading token splits
@dataclass
class TokenSplit:
    """Train and validation tokens of a corpus (1-D arrays; memmaps when read from a prepared folder)."""

    train: np.ndarray
    val: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)  # documents, tokens, train/val_tokens, replaced_bytes, ...
    tokenizer: Any = None  # the tokenizer that produced the tokens


class ShardMemmap(np.memmap):
    """A read-only memmap of one token shard whose slices are read with ``os.pread``, not through the mapping.

    Reading a mapped page past the end of a file that shrank after it was opened (a shard truncated or rewritten
    during training) kills the process with SIGBUS; a short ``pread`` is a clear ``ValueError`` naming the file
    instead. A slice costs one system call, so window reads stay cheap; any other indexing is the plain memmap.
    """

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice) and key.step in (None, 1) and isinstance(self.base, mmap.mmap) and self.filename:
            start, stop, _ = key.indices(len(self))
            return _pread_tokens(self.filename, self.dtype, self.offset + start * self.itemsize, max(0, stop - start))
        return super().__getitem__(key)


def _pread_tokens(filename: str, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    out = np.empty(count, dtype=dtype)
    want = out.nbytes
    got = _read_at(filename, memoryview(out).cast("B"), offset) if want else 0
    if got != want:
        size = os.stat(filename).st_size
        raise ValueError(
            f"{filename}: token shard shrank to {size:,} bytes while in use (reading bytes {offset:,} to "
            f"{offset + want:,}); was it truncated or rewritten? Run gptkernels.prepare again, into another folder"
        )
    return out


def _read_at(filename: str, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``filename`` at ``offset``; the bytes read (fewer at the end of the file)."""
    got = 0
    if hasattr(os, "preadv"):  # one system call, ~2 µs: no Python file object
        fd = os.open(filename, os.O_RDONLY)
        try:
            while got < len(buf) and (n := os.preadv(fd, [buf[got:]], offset + got)):
                got += n
        finally:
            os.close(fd)
        return got
    with open(filename, "rb", buffering=0) as f:
        f.seek(offset)
        while got < len(buf) and (n := f.readinto(buf[got:])):
            got += n
    return got


def _open_shards(root: Path, meta: dict[str, Any], split: str, n_vocab: int) -> list[np.ndarray]:
    """The split's shards as :class:`ShardMemmap`s, each checked once: size against meta.json, every token id
    below ``n_vocab`` (one pass over the file, so a bad id is reported here, not as an IndexError mid-run)."""
    dtype = np.dtype(meta["dtype"])
    parts = []
    for shard in meta["shards"][split]:
        n, p = int(shard["tokens"]), root / shard["file"]
        if not p.is_file() or p.stat().st_size != n * dtype.itemsize:
            raise ValueError(f"{p}: missing or truncated shard (meta.json expects {n} {dtype} tokens)")
        if n:
            arr = ShardMemmap(p, dtype=dtype, mode="r", shape=(n,))
            top = max(int(np.asarray(arr[i : i + _CHECK_CHUNK]).max()) for i in range(0, n, _CHECK_CHUNK))
            if top >= n_vocab:
                raise ValueError(
                    f"{p}: token id {top} is outside the vocabulary of {n_vocab} tokens (a damaged shard, or one "
                    "written with another tokenizer); prepare the folder again"
                )
            parts.append(arr)
    return parts


def _spec_or_none(tok: Any) -> dict[str, Any] | None:
    try:
        return tokenizer_to_spec(tok)
    except ValueError:
        return None


def _check_prepared_tokenizer(root: Path, meta: dict[str, Any], tok: Any) -> None:
    theirs, ours = meta["tokenizer"], _spec_or_none(tok)
    if ours is not None:
        ok = same_tokenizer(theirs, ours)
    else:  # a custom tokenizer: only its size and end-of-text id can be compared
        ok = (theirs.get("n_vocab"), theirs.get("eot_token")) == (tok.n_vocab, tok.eot_token)
    if not ok:
        raise ValueError(
            f"{root}: shard written by another tokenizer ({theirs.get('name')}, n_vocab={theirs.get('n_vocab')}) "
            f"than the one given ({getattr(tok, 'name', type(tok).__name__)}, n_vocab={tok.n_vocab}); give "
            f"the folder's own ({theirs.get('name')}) or none, which uses it"
        )


def _join(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    if not parts:
        return np.empty(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)  # one part: the memmap itself, no copy


def _group_sources(parsed: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Consecutive raw sources are one corpus ("raw", [(kind, value), ...]); each prepared folder stands alone."""
    groups: list[tuple[str, Any]] = []
    for kind, value in parsed:
        if kind == "prepared":
            groups.append(("prepared", value))
        elif groups and groups[-1][0] == "raw":
            groups[-1][1].append((kind, value))
        else:
            groups.append(("raw", [(kind, value)]))
    return groups


def resolve_tokenizer(
    tokenizer: Any,
    sources: Sequence[str | os.PathLike[str]] | str,
    *,
    max_documents: int | None = None,
    text_column: str = "text",
) -> Any:
    """The tokenizer that :func:`load_tokens` would use for ``sources``: ``None`` is a prepared folder's own (gpt2
    for raw sources); ``"char"`` is a prepared char folder's vocabulary, or one built from the raw sources; a name
    or tokenizer object is itself. Training calls this so that ``--tokenizer char`` (or none) on a folder
    prepared with the char tokenizer uses the vocabulary stored in its meta.json."""
    return _resolve_tokenizer(tokenizer, _group_sources(_parse_sources(sources)), max_documents, text_column)


def _resolve_tokenizer(
    tokenizer: Any, groups: list[tuple[str, Any]], max_documents: int | None, text_column: str
) -> Any:
    """``None``: the first prepared folder's tokenizer (else gpt2). ``"char"``, ``"bpe:<N>"``: a vocabulary built
    from the raw sources in one streaming pass (or a prepared folder's own one when there are no raw sources)."""
    prepared = [value for kind, value in groups if kind == "prepared"]
    raw = [value for kind, value in groups if kind == "raw"]
    if tokenizer is None:
        return tokenizer_from_spec(read_meta(prepared[0])["tokenizer"]) if prepared else get_tokenizer("gpt2")
    if needs_training_text(tokenizer):  # "char", "bpe:<N>": built from the raw sources
        if raw:
            docs = (text for group in raw for text in _documents(group, max_documents, text_column, {}))
            return get_tokenizer(tokenizer, text=docs)
        spec = read_meta(prepared[0])["tokenizer"]
        if spec["name"] != tokenizer.partition(":")[0]:
            raise ValueError(
                f"tokenizer {tokenizer}: {prepared[0]} was prepared with the {spec['name']} tokenizer; "
                "give that one or none"
            )
        return tokenizer_from_spec(spec)
    return get_tokenizer(tokenizer)


def load_tokens(
    sources: Sequence[str | os.PathLike[str]] | str,
    tokenizer: Any = "gpt2",
    *,
    val_fraction: float = 0.1,
    max_tokens: int | None = None,
    max_documents: int | None = None,
    num_workers: int | None = None,
    text_column: str = "text",
) -> TokenSplit:
    """Tokenize ``sources`` (or read prepared folders) and split them into train and validation tokens.

    Args:
        sources: see the module docstring. Consecutive raw sources form one corpus, tokenized and split here;
            a prepared folder brings its own train/val split (its ``val_fraction`` applies, not this one) and is
            read as memmaps after checking that it was written by ``tokenizer`` (a split held in one shard is
            the memmap itself; several shards are concatenated in memory).
        tokenizer: a tokenizer or its name (``"char"`` builds its vocabulary from the raw sources first);
            ``None``: the prepared folder's own (``gpt2`` for raw sources).
        val_fraction: the last fraction of each raw corpus (document-aligned when a boundary is near) for
            validation; non-empty when > 0.
        max_tokens: stop reading raw sources after this many tokens (in total).
        max_documents, num_workers, text_column: as in :func:`iter_documents` and :func:`tokenize_documents`.
    Returns:
        :class:`TokenSplit`; ``stats`` has documents, tokens, train_tokens, val_tokens, replaced_bytes,
        skipped_files and sources.
    """
    parsed = _parse_sources(sources)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    groups = _group_sources(parsed)
    tok = _resolve_tokenizer(tokenizer, groups, max_documents, text_column)
    dtype = token_dtype(tok.n_vocab)

    stats: dict[str, Any] = {"documents": 0, "replaced_bytes": 0, "skipped_files": 0}
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    budget = max_tokens
    for kind, value in groups:
        if kind == "prepared":
            meta = read_meta(value)
            _check_prepared_tokenizer(value, meta, tok)
            train_parts += _open_shards(value, meta, "train", tok.n_vocab)
            val_parts += _open_shards(value, meta, "val", tok.n_vocab)
            stats["documents"] += int(meta.get("documents", 0))
            stats["replaced_bytes"] += int(meta.get("replaced_bytes", 0))
            stats["skipped_files"] += int(meta.get("skipped_files", 0))
            continue
        if budget is not None and budget <= 0:
            continue
        doc_stats: dict[str, Any] = {}
        arrays, n = [], 0
        tokens_iter = tokenize_documents(
            _documents(value, max_documents, text_column, doc_stats), tok, num_workers=num_workers
        )
        for arr in tokens_iter:
            if budget is not None and n + len(arr) >= budget:
                arrays.append(arr[: budget - n])
                n = budget
                tokens_iter.close()  # stops the workers and the (possibly streamed) sources
                break
            arrays.append(arr)
            n += len(arr)
        stats["documents"] += len(arrays)
        stats["replaced_bytes"] += doc_stats.get("replaced_bytes", 0)
        stats["skipped_files"] += doc_stats.get("skipped_files", 0)
        if budget is not None:
            budget -= n
        tokens = np.concatenate(arrays)
        cut = split_point(tokens, tok.eot_token, val_fraction)
        train_parts.append(tokens[:cut])
        val_parts.append(tokens[cut:])

    train, val = _join(train_parts, dtype), _join(val_parts, dtype)
    stats.update(
        tokens=len(train) + len(val),
        train_tokens=len(train),
        val_tokens=len(val),
        sources=[os.fspath(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)],
    )
    return TokenSplit(train=train, val=val, stats=stats, tokenizer=tok)


# ---------------------------------------------------------------------------------------------------------------
# Windows
class WindowDataset(Dataset):
    """Fixed-length training windows over a 1-D token array (read lazily: memmaps are never copied whole).

    Window ``i`` starts at token ``i * stride`` (``stride < max_length`` makes windows overlap).

    * ``shift="explicit"``: the window holds ``max_length + 1`` tokens; the item is ``(input, target)``, two
      (max_length,) int64 tensors with ``target[t] == input[t + 1]`` — for ``model(input, target)``.
    * ``shift="implicit"`` (Hugging Face style): the window holds ``max_length`` tokens; the item is
      ``{"input_ids": x, "labels": x}`` and the shift happens in the loss
      (``model(x, gptkernels.model.shift_labels(labels))``).
    """

    def __init__(self, tokens: Any, max_length: int, stride: int | None = None, shift: str = "explicit") -> None:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        elif not isinstance(tokens, np.ndarray):
            tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} of {tokens.dtype}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        stride = max_length if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        if shift not in ("explicit", "implicit"):
            raise ValueError(f"shift must be 'explicit' or 'implicit', got {shift!r}")
        self.tokens, self.max_length, self.stride, self.shift = tokens, max_length, stride, shift
        self.window = max_length + 1 if shift == "explicit" else max_length
        n = len(tokens)
        if n < self.window:
            what = "max_length+1" if shift == "explicit" else "max_length"
            raise ValueError(f"corpus of {n} tokens is shorter than one window of {what} = {self.window} tokens")
        self.n_windows = (n - self.window) // stride + 1

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        i = operator.index(i)
        if i < 0:
            i += self.n_windows
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} out of range for {self.n_windows} windows")
        start = i * self.stride
        w = torch.from_numpy(np.asarray(self.tokens[start : start + self.window]).astype(np.int64))
        if self.shift == "explicit":
            return w[:-1], w[1:]
        return {"input_ids": w, "labels": w.clone()}

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn pickle the dataset: send a whole-file memmap as its path, not its data.
        state = self.__dict__.copy()
        t = self.tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap) and t.filename:
            state["tokens"] = ("memmap", t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens"], tuple):
            _, filename, dtype, offset, shape = state["tokens"]
            state["tokens"] = ShardMemmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"WindowDataset({len(self.tokens)} tokens, max_length={self.max_length}, stride={self.stride}, "
            f"shift={self.shift!r}: {self.n_windows} windows)"
        )


def create_dataloader(
    tokens: Any,
    batch_size: int,
    max_length: int,
    stride: int | None = None,
    *,
    shift: str = "explicit",
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` over :class:`WindowDataset` windows (batches of (B, max_length) int64 tensors)."""
    ds = WindowDataset(tokens, max_length, stride, shift)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers, **kwargs
    )


__all__ = [
    "BUILTIN",
    "META_FILE",
    "ShardMemmap",
    "TokenSplit",
    "WindowDataset",
    "create_dataloader",
    "decode_bytes",
    "default_num_workers",
    "is_prepared",
    "iter_documents",
    "load_tokens",
    "read_meta",
    "resolve_tokenizer",
    "split_point",
    "tokenize_documents",
]
