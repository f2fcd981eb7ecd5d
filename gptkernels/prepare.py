"""Tokenize a corpus once into token shards that training reads as memmaps.

    python -m gptkernels.prepare builtin --out data/builtin
    python -m gptkernels.prepare hf:HuggingFaceFW/fineweb:sample-10BT --out data/fineweb --max-tokens 1e9 \
        --shard-tokens 100000000

The output folder holds ``train_000000.bin, ...`` and ``val_000000.bin, ...`` (raw uint16 token ids, uint32 for
vocabularies over 65,536 tokens; each document followed by ``<|endoftext|>``) and ``meta.json`` (format version,
tokenizer spec, dtype, the token count of every shard, documents). ``gptkernels.data.load_tokens([folder], tok)``
reads it back. The corpus streams through (never whole in memory); the output is written under a temporary
name and renamed into place, so a crash never leaves a half-written output behind. ``--overwrite`` replaces only
what an earlier prepare wrote there (its ``meta.json`` and shards); other files in the folder are kept. A failed
write (disk full, file size limit) is one ``error:`` line and exit status 3.
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

from .checkpoint import output_errors
from .cli import OutputWriteError
from .data import (
    _SHARD_NAME,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    _documents,
    _parse_sources,
    _prepared_state,
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
            with output_errors(self.folder / self.shards[-1]["file"]):
                self._file.write(arr[:room].data)
            self.shards[-1]["tokens"] += room
            arr = arr[room:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        with output_errors(self.folder / name):
            self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in close()
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            with output_errors(f.name):  # buffered bytes reach the disk here
                f.close()

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
        raise FileExistsError(
            f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace an earlier prepare's "
            "meta.json and shards there (other files are kept)"
        )


def _written_by_prepare(out: Path) -> list[Path]:
    """The files of an earlier prepare in ``out``: its meta.json (when it is ours, even damaged) and shards."""
    if not out.is_dir():
        return []
    shards = sorted(p for p in out.iterdir() if _SHARD_NAME.match(p.name) and p.is_file())
    meta = out / META_FILE
    try:  # ours: a meta.json of this format, or a damaged one beside shards; valid JSON of another kind is not
        ours = json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = meta.is_file() and _prepared_state(out) is not None
    return ([meta] if ours else []) + shards


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
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with output_errors(tmp):
        out.parent.mkdir(parents=True, exist_ok=True)
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
                with output_errors(p):
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
        with output_errors(tmp / META_FILE):
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        _check_out(out, overwrite)  # once more: something may have appeared there meanwhile
        with output_errors(out):
            _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _move_into_place(tmp: Path, out: Path) -> None:
    """Make the finished ``tmp`` folder the output. A new or empty ``out`` is replaced in one rename. Otherwise
    only an earlier prepare's files are replaced: its meta.json goes first (the folder is then no longer a
    prepared one), the new shards move in, and the new meta.json comes last, so a crash in between leaves a
    folder that readers refuse ("shards but no meta.json") rather than a mix of two outputs."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)
        return
    old = _written_by_prepare(out)
    new = sorted(p for p in tmp.iterdir() if p.name != META_FILE)
    clash = [p.name for p in [*new, tmp / META_FILE] if (out / p.name).exists() and out / p.name not in old]
    if clash:
        raise FileExistsError(f"--out {str(out)!r}: {clash[0]} exists and was not written by gptkernels.prepare")
    for p in old:  # meta.json first
        p.unlink()
    for p in new:
        os.replace(p, out / p.name)
    os.replace(tmp / META_FILE, out / META_FILE)
    tmp.rmdir()


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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing an earlier prepare's meta.json and shards (other files stay)",
    )
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
    except OutputWriteError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 3
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
