"""Tokenize a corpus once into token shards that training reads as memmaps.

    python -m gptkernels.prepare builtin --out data/builtin
    python -m gptkernels.prepare hf:HuggingFaceFW/fineweb:sample-10BT --out data/fineweb --max-tokens 1e9 \
        --shard-tokens 100000000

The output folder holds ``train_000000.bin, ...`` and ``val_000000.bin, ...`` (raw uint16 token ids, uint32 for
vocabularies over 65,536 tokens; each document followed by ``<|endoftext|>``) and ``meta.json`` (format version,
tokenizer spec, dtype, the token count of every shard, documents). ``gptkernels.data.load_tokens([folder], tok)``
reads it back. The corpus streams through (never whole in memory); the folder is written under a temporary
name and renamed into place, so a crash never leaves a half-written output behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    _documents,
    _parse_sources,
    _resolve_tokenizer,
    split_point,
    tokenize_documents,
)
from .tokenizer import token_dtype, tokenizer_to_spec

_COPY_CHUNK = 1 << 24  # tokens moved at a time when the validation tail is copied out


class _ShardWriter:
    """Appends token arrays to ``{prefix}_000000.bin, ...``, starting a new file every ``shard_tokens`` tokens."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int | None) -> None:
        self.folder, self.prefix, self.dtype, self.cap = folder, prefix, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None

    def write(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        while arr.size:
            if self._file is None or (self.cap is not None and self.shards[-1]["tokens"] >= self.cap):
                self._open_next()
            room = arr.size if self.cap is None else min(arr.size, self.cap - self.shards[-1]["tokens"])
            self._file.write(arr[:room].data)
            self.shards[-1]["tokens"] += room
            arr = arr[room:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in close()
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def total(self) -> int:
        return sum(s["tokens"] for s in self.shards)


class _Concat:
    """Read-only slicing (step 1) across several memmapped shards; every slice is a copy."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(len(self))
        pieces = []
        for p, off in zip(self.parts, self.offsets[:-1]):
            a, b = max(start - int(off), 0), min(stop - int(off), len(p))
            if a < b:
                pieces.append(p[a:b])
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.parts[0].dtype)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it")


def prepare(
    sources: Sequence[str | os.PathLike[str]] | str,
    out: str | os.PathLike[str],
    tokenizer: Any = "gpt2",
    *,
    val_fraction: float = 0.1,
    num_workers: int | None = None,
    max_tokens: int | None = None,
    max_documents: int | None = None,
    shard_tokens: int | None = None,
    overwrite: bool = False,
    text_column: str = "text",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` into shards under ``out`` and return the ``meta.json`` written there.

    Args mirror the command-line flags; ``tokenizer`` is a tokenizer or a name (``"char"`` builds the vocabulary
    from the corpus first). ``shard_tokens=None`` writes one shard per split.
    """
    out = Path(out)
    parsed = _parse_sources(sources)  # checks every source now, before any work
    for kind, value in parsed:
        if kind == "prepared":
            raise ValueError(f"{str(value)!r} is already a prepared token folder")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    for name, value in (("--max-tokens", max_tokens), ("--shard-tokens", shard_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _check_out(out, overwrite)

    from tqdm.auto import tqdm

    tok = _resolve_tokenizer(tokenizer, [("raw", parsed)], max_documents, text_column)
    dtype = token_dtype(tok.n_vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        stats: dict[str, Any] = {}
        train = _ShardWriter(tmp, "train", dtype, shard_tokens)
        documents, n = 0, 0
        bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress or None)
        tokens_iter = tokenize_documents(
            _documents(parsed, max_documents, text_column, stats), tok, num_workers=num_workers
        )
        for arr in tokens_iter:
            if max_tokens is not None and n + len(arr) >= max_tokens:
                arr = arr[: max_tokens - n]
                tokens_iter.close()
            train.write(arr)
            documents += 1
            n += len(arr)
            bar.update(len(arr))
            if max_tokens is not None and n >= max_tokens:
                break
        bar.close()
        train.close()

        # The validation split is the tail of the token stream: copy it out, then cut it off the train shards.
        parts = [np.memmap(tmp / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],)) for s in train.shards]
        view = _Concat(parts)
        cut = split_point(view, tok.eot_token, val_fraction)
        val = _ShardWriter(tmp, "val", dtype, shard_tokens)
        for start in range(cut, n, _COPY_CHUNK):
            val.write(view[start : min(n, start + _COPY_CHUNK)])
        val.close()
        del view, parts  # unmap before truncating the files under them
        kept, offset = [], 0
        for shard in train.shards:
            p, keep = tmp / shard["file"], min(max(cut - offset, 0), shard["tokens"])
            offset += shard["tokens"]
            if keep == 0:
                p.unlink()
                continue
            if keep < shard["tokens"]:
                os.truncate(p, keep * dtype.itemsize)
            kept.append({"file": shard["file"], "tokens": keep})

        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": tokenizer_to_spec(tok),
            "dtype": dtype.name,
            "eot_token": int(tok.eot_token),
            "documents": documents,
            "tokens": n,
            "train_tokens": cut,
            "val_tokens": n - cut,
            "val_fraction": val_fraction,
            "replaced_bytes": stats.get("replaced_bytes", 0),
            "skipped_files": stats.get("skipped_files", 0),
            "sources": [os.fspath(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)],
            "shards": {"train": kept, "val": val.shards},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        _check_out(out, overwrite)  # once more: something may have appeared there meanwhile
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _int(text: str) -> int:
    """Integers also as ``1e9`` or ``100_000_000``."""
    value = float(text.replace("_", "")) if any(c in text for c in "eE.") else int(text.replace("_", ""))
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptkernels.prepare",
        description="Tokenize text into uint16 token shards with a train/val split, for gptkernels training.",
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a text file, a folder, 'builtin', 'hf:NAME[:CONFIG]' or a .json/.jsonl/.parquet file; "
        "several are merged in order",
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help="gpt2 (default), char (vocabulary built from the corpus) or hf:<folder>",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail fraction of the tokens for validation (0.1)")
    p.add_argument("--num-workers", type=int, default=None, help="tokenizer processes (default: one per core, ≤8)")
    p.add_argument("--max-tokens", type=_int, default=None, help="stop after this many tokens (e.g. 1e9)")
    p.add_argument("--max-documents", type=_int, default=None, help="stop after this many documents")
    p.add_argument("--shard-tokens", type=_int, default=None, help="tokens per shard file (default: one per split)")
    p.add_argument("--text-column", default="text", help="column read from hf:/.json/.jsonl/.parquet sources")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # warnings as one line each, not with source lines
            warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
            meta = prepare(
                args.sources,
                args.out,
                args.tokenizer,
                val_fraction=args.val_fraction,
                num_workers=args.num_workers,
                max_tokens=args.max_tokens,
                max_documents=args.max_documents,
                shard_tokens=args.shard_tokens,
                overwrite=args.overwrite,
                text_column=args.text_column,
                progress=not args.quiet,
            )
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    n_shards = len(meta["shards"]["train"]) + len(meta["shards"]["val"])
    print(
        f"wrote {meta['tokens']:,} tokens ({meta['train_tokens']:,} train, {meta['val_tokens']:,} val) from "
        f"{meta['documents']:,} documents in {n_shards} shard(s) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
