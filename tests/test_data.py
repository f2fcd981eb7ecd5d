"""Data pipeline: every source kind, tokenization (serial and parallel), splits, windows, and the prepare CLI."""

import itertools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels import data as gdata
from gptkernels.data import (
    TokenSplit,
    WindowDataset,
    create_dataloader,
    iter_documents,
    load_tokens,
    read_meta,
    split_point,
    tokenize_documents,
)
from gptkernels.model import shift_labels
from gptkernels.prepare import main as prepare_main
from gptkernels.prepare import prepare
from gptkernels.tokenizer import ENDOFTEXT, CharTokenizer, encode_ordinary, get_tokenizer

REPO = Path(__file__).resolve().parents[1]
EOT = 50256


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def builtin_docs():
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics) if topics[k]]


@pytest.fixture
def corpus(tmp_path):
    """A folder tree: nested text files, a hidden file and folder, a binary file."""
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("first document.\n", encoding="utf-8")
    (root / "b" / "deep" / "c.md").write_text("third, nested — ünïcode 🙂", encoding="utf-8")
    (root / "b" / "b.txt").write_text(f"second {ENDOFTEXT} document", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (root / ".git" / "config").write_text("hidden too", encoding="utf-8")
    (root / "b" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return root


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Sources
def test_text_file_is_one_document(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("line one\nline two\n", encoding="utf-8")
    assert list(iter_documents([str(p)])) == ["line one\nline two\n"]
    assert list(iter_documents(p)) == ["line one\nline two\n"]  # a single path is one source


def test_folder_recursive_sorted_skips_hidden_and_binary(corpus):
    stats = {}
    docs = list(iter_documents([str(corpus)], stats=stats))
    assert docs == ["first document.\n", f"second {ENDOFTEXT} document", "third, nested — ünïcode 🙂"]
    assert stats == {"documents": 3, "replaced_bytes": 0, "skipped_files": 1}


def test_builtin_corpus(builtin_docs):
    docs = list(iter_documents(["builtin"]))
    assert docs == builtin_docs
    assert len(docs) > 50
    assert list(iter_documents(["builtin"], max_documents=3)) == builtin_docs[:3]


def test_local_jsonl_and_parquet_through_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    jsonl = _write_jsonl(tmp_path / "d.jsonl", ["json one", "", "json two"])
    pq.write_table(pa.table({"text": ["pq one", None, "pq two"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(iter_documents([str(jsonl)])) == ["json one", "json two"]  # empty and null rows skipped
    assert list(iter_documents([str(tmp_path / "d.parquet")])) == ["pq one", "pq two"]
    with pytest.raises(ValueError, match="'body'.*columns"):
        list(iter_documents([str(jsonl)], text_column="body"))


def test_hf_source_streams_train_split(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    local = _write_jsonl(tmp_path / "hub.jsonl", ["hub doc one", "hub doc two"])
    real_load, calls = datasets.load_dataset, []

    def fake_load_dataset(*args, **kwargs):  # the hub is unreachable here: serve a local file instead
        calls.append((args, kwargs))
        return real_load("json", data_files=str(local), split=kwargs["split"], streaming=kwargs["streaming"])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(iter_documents(["hf:HuggingFaceFW/fineweb:sample-10BT"])) == ["hub doc one", "hub doc two"]
    assert list(iter_documents(["hf:someone/corpus"])) == ["hub doc one", "hub doc two"]
    assert calls == [
        (("HuggingFaceFW/fineweb", "sample-10BT"), {"split": "train", "streaming": True}),
        (("someone/corpus", None), {"split": "train", "streaming": True}),
    ]
    with pytest.raises(ValueError, match="hf:NAME"):
        iter_documents(["hf:"])


def test_max_tokens_stops_an_endless_stream(monkeypatch, gpt2):
    datasets = pytest.importorskip("datasets")
    pulled = []

    def endless(*args, **kwargs):
        for i in itertools.count():
            pulled.append(i)
            yield {"text": f"streamed document number {i}"}

    monkeypatch.setattr(datasets, "load_dataset", endless)
    split = load_tokens(["hf:big/corpus"], gpt2, max_tokens=100, val_fraction=0.1)
    assert len(split.train) + len(split.val) == 100 and len(split.val) > 0
    assert len(pulled) < 50


def test_sources_merge_in_order(tmp_path, corpus, builtin_docs):
    p = tmp_path / "x.txt"
    p.write_text("standalone", encoding="utf-8")
    docs = list(iter_documents([str(p), "builtin", str(corpus)]))
    assert docs[0] == "standalone"
    assert docs[1 : 1 + len(builtin_docs)] == builtin_docs
    assert docs[-3:] == list(iter_documents([str(corpus)]))
    assert list(iter_documents([str(p), "builtin"], max_documents=2)) == ["standalone", builtin_docs[0]]


def test_missing_and_empty_sources(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        iter_documents([str(missing)])  # raised at the call, before iterating
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        list(iter_documents([str(empty)]))
    with pytest.raises(ValueError, match="empty corpus"):
        load_tokens([str(empty)], "gpt2")
    with pytest.raises(ValueError, match="no data sources"):
        iter_documents([])
    with pytest.raises(ValueError, match="max_documents"):
        iter_documents(["builtin"], max_documents=0)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, gpt2):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok \xff\xfe then \xc3 end")  # two invalid bytes, then a truncated 2-byte sequence
    stats = {}
    with pytest.warns(UnicodeWarning, match="3 undecodable byte"):
        docs = list(iter_documents([str(p)], stats=stats))
    assert docs == ["ok \ufffd\ufffd then \ufffd end"]
    assert stats["replaced_bytes"] == 3
    with pytest.warns(UnicodeWarning):
        split = load_tokens([str(p)], gpt2, val_fraction=0.0)
    assert split.stats["replaced_bytes"] == 3


# ---------------------------------------------------------------------------------------------------------------
# Tokenization
def test_tokenize_documents_appends_eot(gpt2, corpus):
    docs = list(iter_documents([str(corpus)]))
    arrays = list(tokenize_documents(docs, gpt2, num_workers=0))
    assert len(arrays) == len(docs)
    for doc, arr in zip(docs, arrays):
        assert arr.dtype == np.uint16
        assert arr.tolist() == encode_ordinary(gpt2, doc) + [EOT]
    assert np.count_nonzero(np.concatenate(arrays) == EOT) == len(docs)  # "<|endoftext|>" text is not the token


def test_parallel_tokenization_equals_serial(gpt2, builtin_docs, monkeypatch):
    serial = np.concatenate(list(tokenize_documents(builtin_docs, gpt2, num_workers=1)))
    parallel = np.concatenate(list(tokenize_documents(iter(builtin_docs), gpt2, num_workers=2, chunk_docs=7)))
    np.testing.assert_array_equal(parallel, serial)
    # Automatic mode: serial for the first characters, then worker processes for the rest.
    monkeypatch.setattr(gdata, "_PARALLEL_MIN_CHARS", 50_000)
    monkeypatch.setattr(gdata, "default_num_workers", lambda: 2)
    auto = np.concatenate(list(tokenize_documents(builtin_docs, gpt2, chunk_docs=5)))
    np.testing.assert_array_equal(auto, serial)
    # A char tokenizer is rebuilt in the workers from its spec.
    char = CharTokenizer.from_text(builtin_docs)
    ids = np.concatenate(list(tokenize_documents(builtin_docs[:20], char, num_workers=2, chunk_docs=3)))
    assert char.decode(ids) == "".join(d + ENDOFTEXT for d in builtin_docs[:20])


def test_tokenize_bad_arguments(gpt2):
    with pytest.raises(ValueError, match="num_workers"):
        list(tokenize_documents(["a"], gpt2, num_workers=-1))
    with pytest.raises(ValueError, match="chunk_docs"):
        list(tokenize_documents(["a"], gpt2, chunk_docs=0))


# ---------------------------------------------------------------------------------------------------------------
# Splits
def test_split_point_prefers_a_nearby_document_boundary():
    e = 9
    tokens = np.array([1, 2, 3, e, 4, 5, 6, 7, 8, e, 1, 2, 3, 4, 5, 6, 7, 8, 1, e], dtype=np.uint16)
    # 20 tokens, 30% val → target 14; boundaries at 4, 10 (20 is the end); window ±3 holds none → mid-document.
    assert split_point(tokens, e, 0.3) == 14
    # 40% val → target 12, window ±4 = [8, 16] holds boundary 10.
    assert split_point(tokens, e, 0.4) == 10
    # Chunked scanning finds the same boundary.
    assert split_point(tokens, e, 0.4, chunk=1) == 10
    assert split_point(tokens, e, 0.0) == 20
    assert split_point(tokens[:2], e, 0.01) == 1  # never an empty val split
    with pytest.raises(ValueError, match="val_fraction"):
        split_point(tokens, e, 1.0)
    with pytest.raises(ValueError, match="too small"):
        split_point(tokens[:1], e, 0.5)


def test_load_tokens_split(gpt2, builtin_docs):
    split = load_tokens(["builtin"], gpt2, val_fraction=0.1)
    assert isinstance(split, TokenSplit) and split.tokenizer is gpt2
    expected = np.concatenate([encode_ordinary(gpt2, d) + [EOT] for d in builtin_docs]).astype(np.uint16)
    np.testing.assert_array_equal(np.concatenate([split.train, split.val]), expected)
    s = split.stats
    assert s["documents"] == len(builtin_docs) and s["tokens"] == len(expected)
    assert s["train_tokens"] == len(split.train) and s["val_tokens"] == len(split.val)
    assert 0.05 < s["val_tokens"] / s["tokens"] < 0.15
    assert split.train[-1] == EOT  # the val split starts at a document
    assert s["sources"] == ["builtin"]


def test_load_tokens_max_tokens_and_no_val(gpt2):
    split = load_tokens(["builtin"], gpt2, val_fraction=0.0, max_tokens=1000)
    assert len(split.train) == 1000 and len(split.val) == 0
    tiny = load_tokens(["builtin"], gpt2, val_fraction=0.5, max_tokens=2)
    assert len(tiny.train) == 1 and len(tiny.val) == 1
    with pytest.raises(ValueError, match="max_tokens"):
        load_tokens(["builtin"], gpt2, max_tokens=0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_tokens(["builtin"], gpt2, val_fraction=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Windows
def test_explicit_windows_with_stride_and_overlap():
    tokens = np.arange(20, dtype=np.uint16)
    ds = WindowDataset(tokens, max_length=4)
    assert len(ds) == 4  # starts 0, 4, 8, 12; each needs 5 tokens
    x, y = ds[1]
    assert x.dtype == torch.int64 and x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8]
    assert ds[-1][1].tolist() == [13, 14, 15, 16]
    overlap = WindowDataset(tokens, max_length=4, stride=2)
    assert len(overlap) == 8
    assert overlap[1][0].tolist() == [2, 3, 4, 5] and overlap[7][1].tolist() == [15, 16, 17, 18]
    with pytest.raises(IndexError):
        ds[4]


def test_implicit_windows():
    tokens = np.arange(20, dtype=np.uint16)
    ds = WindowDataset(tokens, max_length=4, shift="implicit")
    assert len(ds) == 5  # starts 0, 4, 8, 12, 16; each needs 4 tokens
    item = ds[4]
    assert item["input_ids"].tolist() == [16, 17, 18, 19]
    assert torch.equal(item["labels"], item["input_ids"]) and item["labels"] is not item["input_ids"]


def test_windows_read_memmaps_without_copying(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    ds = WindowDataset(mm, max_length=10, stride=7)
    assert ds.tokens is mm
    assert ds[3][0].tolist() == list(range(21, 31))
    back = pickle.loads(pickle.dumps(ds))  # as a spawned DataLoader worker gets it: the file, not a copy
    assert isinstance(back.tokens, np.memmap) and back.tokens.filename == mm.filename
    assert back[3][1].tolist() == list(range(22, 32))
    batch = next(iter(create_dataloader(mm, batch_size=3, max_length=10, shuffle=False)))
    assert [t.shape for t in batch] == [(3, 10), (3, 10)]
    assert torch.equal(batch[1][:, :-1], batch[0][:, 1:])


def test_window_bad_inputs():
    with pytest.raises(ValueError, match="corpus of 8 tokens is shorter than one window of max_length\\+1 = 9"):
        WindowDataset(np.arange(8), max_length=8)
    assert len(WindowDataset(np.arange(8), max_length=8, shift="implicit")) == 1
    with pytest.raises(ValueError, match="shorter than one window of max_length = 9"):
        WindowDataset(np.arange(8), max_length=9, shift="implicit")
    with pytest.raises(ValueError, match="max_length"):
        WindowDataset(np.arange(8), max_length=0)
    with pytest.raises(ValueError, match="stride"):
        WindowDataset(np.arange(8), max_length=2, stride=0)
    with pytest.raises(ValueError, match="shift"):
        WindowDataset(np.arange(8), max_length=2, shift="left")
    with pytest.raises(ValueError, match="1-D integer"):
        WindowDataset(np.zeros((2, 8), dtype=np.int64), max_length=2)


def test_explicit_and_implicit_shift_give_the_same_loss(builtin_docs):
    tok = CharTokenizer.from_text(builtin_docs[:5])
    tokens = np.concatenate(list(tokenize_documents(builtin_docs[:5], tok, num_workers=0)))
    L = 12
    cfg = GPTConfig(vocab_size=tok.n_vocab, context_length=L + 1, emb_dim=16, n_heads=2, n_layers=2, kernels="torch")
    model = GPT(cfg).eval()
    explicit = create_dataloader(tokens, batch_size=4, max_length=L, stride=L, shuffle=False)
    implicit = create_dataloader(tokens, batch_size=4, max_length=L + 1, stride=L, shift="implicit", shuffle=False)
    n = 0
    with torch.no_grad():
        for (x, y), batch in zip(explicit, implicit):
            _, loss_explicit = model(x, y)
            ids = batch["input_ids"]
            _, loss_implicit = model(ids, shift_labels(batch["labels"]))
            torch.testing.assert_close(loss_implicit, loss_explicit)
            n += 1
            if n == 3:
                break
    assert n == 3


# ---------------------------------------------------------------------------------------------------------------
# Prepared shards
def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "gptkernels.prepare", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_prepare_cli_end_to_end(tmp_path, corpus, gpt2):
    out = tmp_path / "shards"
    r = _run_cli("builtin", str(corpus), "--out", str(out), "--shard-tokens", "30000", "--num-workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "tokens" in r.stdout
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["name"] == "gpt2"
    assert len(meta["shards"]["train"]) > 1
    assert sum(s["tokens"] for s in meta["shards"]["train"]) == meta["train_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "shards"]  # no temporary folder left
    from_shards = load_tokens([str(out)], gpt2)
    in_memory = load_tokens(["builtin", str(corpus)], gpt2)
    np.testing.assert_array_equal(from_shards.train, in_memory.train)
    np.testing.assert_array_equal(from_shards.val, in_memory.val)
    assert from_shards.stats["documents"] == in_memory.stats["documents"] == meta["documents"]
    # A failing run: one line on stderr, exit code 2, no traceback.
    r = _run_cli(str(tmp_path / "missing.txt"), "--out", str(tmp_path / "other"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.txt" in r.stderr and "Traceback" not in r.stderr


def test_prepared_single_shard_is_a_memmap_and_checks_the_tokenizer(tmp_path, corpus, gpt2):
    out = tmp_path / "one"
    meta = prepare([str(corpus), "builtin"], out, gpt2, progress=False, max_tokens=5000)
    assert meta["tokens"] == 5000 and len(meta["shards"]["train"]) == len(meta["shards"]["val"]) == 1
    split = load_tokens([str(out)], "gpt2")
    assert isinstance(split.train, np.memmap) and isinstance(split.val, np.memmap)  # read in place, no copy
    assert len(split.train) + len(split.val) == 5000
    with pytest.raises(ValueError, match="shard written by another tokenizer"):
        load_tokens([str(out)], CharTokenizer.from_text("abc"))
    both = load_tokens([str(out), "builtin"], gpt2, max_tokens=1000)  # a prepared folder and a raw source
    assert len(both.train) + len(both.val) == 6000


def test_prepare_char_tokenizer_round_trip(tmp_path, corpus):
    out = tmp_path / "char"
    assert (
        prepare_main([str(corpus), "--out", str(out), "--tokenizer", "char", "--val-fraction", "0.3", "--quiet"]) == 0
    )
    split = load_tokens([str(out)], None)  # the tokenizer comes from meta.json
    assert isinstance(split.tokenizer, CharTokenizer)
    text = split.tokenizer.decode(np.concatenate([split.train, split.val]))
    assert text == "".join(d + ENDOFTEXT for d in iter_documents([str(corpus)]))
    assert len(split.val) > 0
    in_memory = load_tokens([str(corpus)], "char", val_fraction=0.3)  # vocabulary built from the corpus here too
    assert in_memory.tokenizer == split.tokenizer
    np.testing.assert_array_equal(in_memory.train, split.train)
    np.testing.assert_array_equal(in_memory.val, split.val)


def test_prepare_refuses_to_overwrite(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    assert prepare_main([str(corpus), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    assert (out / "keep.txt").exists()
    assert prepare_main([str(corpus), "--out", str(out), "--quiet", "--overwrite"]) == 0
    # --overwrite replaces what prepare writes, never the user's own files (issue 13: it deleted them).
    assert (out / "keep.txt").read_text(encoding="utf-8") == "precious" and (out / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_prepare_bad_inputs(tmp_path, capsys):
    a_file = tmp_path / "f.txt"
    a_file.write_text("text", encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(a_file), "--out", str(a_file)], "is a file"),
        ([str(empty), "--out", str(tmp_path / "o1")], "empty corpus"),
        ([str(a_file), "--out", str(tmp_path / "o2"), "--val-fraction", "1.5"], "val-fraction"),
        ([str(a_file), "--out", str(tmp_path / "o3"), "--tokenizer", "nope"], "unknown tokenizer"),
    ]
    for argv, message in cases:
        assert prepare_main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "f.txt"]  # nothing half-written left behind


# ---------------------------------------------------------------------------------------------------------------
# Damaged prepared folders and files that are not UTF-8 (issue 13)
@pytest.fixture
def char_prepared(tmp_path, corpus):
    out = tmp_path / "charprep"
    prepare([str(corpus)], out, "char", progress=False, val_fraction=0.3)
    return out


def test_damaged_meta_json_is_an_error_naming_it(char_prepared):
    meta = char_prepared / "meta.json"
    good = meta.read_text(encoding="utf-8")
    meta.write_text(good[: len(good) // 2], encoding="utf-8")  # cut mid-way, as a crash or a bad copy leaves it
    for read in (lambda: load_tokens([str(char_prepared)], None), lambda: list(iter_documents([str(char_prepared)]))):
        with pytest.raises(ValueError, match=r"meta\.json is damaged"):
            read()  # before: read as a folder of text, the JSON trained on with exit 0
    meta.write_text(good.replace('"uint16"', '"float64"'), encoding="utf-8")
    with pytest.raises(ValueError, match=r"meta\.json is damaged: dtype"):
        load_tokens([str(char_prepared)], None)
    meta.unlink()  # shards without their meta.json: an interrupted prepare, not a text folder
    with pytest.raises(ValueError, match=r"meta\.json is missing"):
        load_tokens([str(char_prepared)], None)
    # A meta.json of another program in a text folder is just a document.
    (char_prepared.parent / "notes").mkdir()
    (char_prepared.parent / "notes" / "meta.json").write_text('{"title": "my notes"}', encoding="utf-8")
    assert list(iter_documents([str(char_prepared.parent / "notes")])) == ['{"title": "my notes"}']


def test_token_id_outside_the_vocabulary_names_the_shard(char_prepared):
    n_vocab = read_meta(char_prepared)["tokenizer"]["n_vocab"]
    shard = char_prepared / "val_000000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[len(ids) // 2] = n_vocab  # one id just past the end, as a flipped bit or another tokenizer would leave
    ids.tofile(shard)
    with pytest.raises(ValueError, match=rf"val_000000\.bin: token id {n_vocab} is outside the vocabulary"):
        load_tokens([str(char_prepared)], None)


def test_shard_truncated_while_training_is_an_error_not_sigbus(char_prepared):
    # In a child process: before the fix, reading the mapped pages past the new end killed it with SIGBUS.
    code = f"""
import os, sys
from gptkernels.data import WindowDataset, load_tokens
split = load_tokens([{str(char_prepared)!r}], None)
ds = WindowDataset(split.train, 16)
ds[len(ds) - 1]
os.truncate(split.train.filename, 64)
try:
    ds[len(ds) - 1]
except ValueError as e:
    print("caught:", e)
    sys.exit(0)
sys.exit(5)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "train_000000.bin: token shard shrank to 64 bytes while in use" in r.stdout


def test_utf16_file_in_a_folder_is_decoded_and_binary_files_are_reported(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a_utf16.txt").write_bytes("héllo from Notepad".encode("utf-16"))  # with its byte-order mark
    (root / "b_utf32.txt").write_bytes("utf-32 text".encode("utf-32"))
    (root / "c.bin").write_bytes(b"\x00\x01\x02 not text")
    stats = {}
    with pytest.warns(UserWarning, match=r"skipped 1 binary file\(s\).*c\.bin"):
        docs = list(iter_documents([str(root)], stats=stats))
    assert docs == ["héllo from Notepad", "utf-32 text"]
    assert stats["skipped_files"] == 1


def test_char_prepared_folder_brings_its_own_tokenizer(char_prepared):
    from gptkernels.data import resolve_tokenizer

    own = CharTokenizer(read_meta(char_prepared)["tokenizer"]["chars"])
    assert resolve_tokenizer("char", [str(char_prepared)]) == own  # training's --tokenizer char
    assert resolve_tokenizer(None, [str(char_prepared)]) == own  # no --tokenizer
    assert load_tokens([str(char_prepared)], "char").tokenizer == own
    with pytest.raises(ValueError, match="another tokenizer.*give the folder's own"):
        load_tokens([str(char_prepared)], "gpt2")


def test_prepare_overwrite_replaces_only_its_own_files(tmp_path, corpus, gpt2):
    out = tmp_path / "out"
    prepare(["builtin"], out, gpt2, progress=False, max_tokens=4000, shard_tokens=1000)
    assert len(read_meta(out)["shards"]["train"]) == 4
    (out / "notes.md").write_text("mine", encoding="utf-8")
    (out / "sub").mkdir()
    (out / "sub" / "data.txt").write_text("also mine", encoding="utf-8")
    meta = prepare([str(corpus)], out, gpt2, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "notes.md",
        "sub",
        "train_000000.bin",
        "val_000000.bin",
    ]
    assert (out / "sub" / "data.txt").read_text(encoding="utf-8") == "also mine"
    assert len(load_tokens([str(out)], gpt2).train) == meta["train_tokens"]
    (out / "meta.json").write_text('{"mine": true}', encoding="utf-8")  # not prepare's: never replaced
    with pytest.raises(FileExistsError, match="meta.json exists and was not written by gptkernels.prepare"):
        prepare([str(corpus)], out, gpt2, progress=False, overwrite=True)
    assert (out / "meta.json").read_text(encoding="utf-8") == '{"mine": true}'


def test_prepare_write_failure_exits_3_naming_the_file(tmp_path, corpus):
    # `ulimit -f` in the child: the shard write fails with EFBIG (Python ignores SIGXFSZ).
    out, text = tmp_path / "out", tmp_path / "big.txt"
    text.write_text("some text to tokenize. " * 1000, encoding="utf-8")  # 23,000 chars: 46 KB of uint16 ids
    code = f"""
import resource, sys
from gptkernels.prepare import main
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
sys.exit(main([{str(text)!r}, "--out", {str(out)!r}, "--quiet", "--tokenizer", "char"]))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "cannot write" in r.stderr and "train_000000.bin" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "corpus"]  # the temporary folder is gone
