"""Tokenizers: GPT-2 BPE from local files, character and byte level, a BPE trained on the corpus, Hugging Face
folders, and their specs."""

import json
import pickle

import pytest

from gptkernels.tokenizer import (
    ENDOFTEXT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    encode_ordinary,
    get_tokenizer,
    gpt2_files,
    needs_training_text,
    same_tokenizer,
    token_byte_lengths,
    token_dtype,
    tokenizer_from_spec,
    tokenizer_to_spec,
)

UNICODE_TEXT = "Héllo, wörld! 你好 🙂 — naïve café\n\n\tindented  double  spaces 12345 it's we'll"


# ---------------------------------------------------------------------------------------------------------------
# GPT-2
def test_gpt2_known_encodings():
    enc = get_tokenizer("gpt2")
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" Hello world") == [18435, 995]
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.decode([50256]) == ENDOFTEXT


def test_gpt2_is_cached_and_default():
    assert get_tokenizer() is get_tokenizer("gpt2")


def test_gpt2_unicode_round_trip():
    enc = get_tokenizer("gpt2")
    ids = enc.encode(UNICODE_TEXT)
    assert all(0 <= i < 50256 for i in ids)
    assert enc.decode(ids) == UNICODE_TEXT


def test_gpt2_endoftext_text_is_ordinary_in_the_data_path():
    enc = get_tokenizer("gpt2")
    ids = encode_ordinary(enc, f"a{ENDOFTEXT}b")
    assert 50256 not in ids
    assert enc.decode(ids) == f"a{ENDOFTEXT}b"
    with pytest.raises(ValueError):  # tiktoken's encode refuses special-token text unless allowed
        enc.encode(ENDOFTEXT)


def test_gpt2_files_are_local():
    vocab_bpe, encoder_json = gpt2_files()
    with open(encoder_json, encoding="utf-8") as f:
        vocab = json.load(f)
    assert len(vocab) == 50257 and vocab[ENDOFTEXT] == 50256
    with open(vocab_bpe, encoding="utf-8") as f:
        assert len(f.read().split("\n")[1:-1]) == 50000  # merges


def test_gpt2_spec_round_trip():
    enc = get_tokenizer("gpt2")
    spec = tokenizer_to_spec(enc)
    assert json.loads(json.dumps(spec)) == spec
    assert spec["name"] == "gpt2" and spec["n_vocab"] == 50257 and spec["eot_token"] == 50256
    assert tokenizer_from_spec(spec) is enc


# ---------------------------------------------------------------------------------------------------------------
# Character level
def test_char_round_trip_and_ids():
    text = "hello world\nthe end <|endoftext|> ü"
    tok = get_tokenizer("char", text=text)
    assert isinstance(tok, CharTokenizer)
    assert tok.eot_token == 0
    assert tok.n_vocab == len(set(text)) + 1
    ids = tok.encode(text)
    assert len(ids) == len(text) and 0 not in ids  # "<|endoftext|>" inside text stays characters
    assert tok.decode(ids) == text
    assert tok.decode([0]) == ENDOFTEXT
    assert sorted(set(ids)) == list(range(1, tok.n_vocab))


def test_char_from_documents_equals_from_text():
    a = CharTokenizer.from_text(["abc", "cde"])
    assert a == CharTokenizer.from_text("abcde")
    assert a.chars == "abcde"


def test_char_unknown_character_is_an_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])


def test_char_spec_and_pickle_round_trip():
    tok = CharTokenizer.from_text(UNICODE_TEXT)
    spec = json.loads(json.dumps(tokenizer_to_spec(tok)))
    back = tokenizer_from_spec(spec)
    assert back == tok
    assert back.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    assert pickle.loads(pickle.dumps(tok)).encode("naïve") == tok.encode("naïve")


def test_char_bad_inputs():
    with pytest.raises(ValueError, match="text="):
        get_tokenizer("char")
    with pytest.raises(ValueError, match="empty"):
        get_tokenizer("char", text="")
    with pytest.raises(ValueError, match="repeat"):
        CharTokenizer("aa")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """GPT-2's tokenizer saved as a Hugging Face folder, built from the same local files (no hub)."""
    transformers = pytest.importorskip("transformers")
    vocab_bpe, encoder_json = gpt2_files()
    if int(transformers.__version__.split(".")[0]) >= 5:
        with open(encoder_json, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(vocab_bpe, encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
        hf = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    else:
        hf = transformers.GPT2TokenizerFast(vocab_file=encoder_json, merges_file=vocab_bpe)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return folder


def test_hf_folder_equals_tiktoken(hf_folder):
    tok = get_tokenizer(f"hf:{hf_folder}")
    assert isinstance(tok, HFTokenizer)
    enc = get_tokenizer("gpt2")
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    text = UNICODE_TEXT + f" with {ENDOFTEXT} inside"
    assert tok.encode(text) == encode_ordinary(enc, text)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_hf_spec_pickle_and_keyword_form(hf_folder, tmp_path):
    tok = get_tokenizer("hf", path=str(hf_folder))
    spec = json.loads(json.dumps(tokenizer_to_spec(tok)))
    assert spec["name"] == "hf" and len(spec["fingerprint"]) == 64
    assert tokenizer_from_spec(spec).encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    assert pickle.loads(pickle.dumps(tok)).encode("café") == tok.encode("café")
    moved = dict(spec, path=str(tmp_path))  # the same vocabulary in another folder still matches
    assert same_tokenizer(spec, moved)
    assert not same_tokenizer(spec, tokenizer_to_spec(get_tokenizer("gpt2")))


def test_hf_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        get_tokenizer("hf")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        get_tokenizer(f"hf:{tmp_path / 'missing'}")


# ---------------------------------------------------------------------------------------------------------------
# Byte level
def test_byte_round_trip_ids_and_exact_byte_lengths():
    tok = get_tokenizer("byte")
    ids = tok.encode(UNICODE_TEXT)
    assert isinstance(tok, ByteTokenizer) and tok.n_vocab == 257 and tok.eot_token == 256
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.decode([104, 105, 256, 104]) == f"hi{ENDOFTEXT}h"
    assert tok.encode(ENDOFTEXT) == list(ENDOFTEXT.encode())  # special-token text is ordinary bytes
    lengths = token_byte_lengths(tok)
    assert int(lengths[ids].sum()) == len(UNICODE_TEXT.encode("utf-8"))
    assert lengths[256] == len(ENDOFTEXT)  # eot counts its text's 13 bytes, as for gpt2 and char
    assert tokenizer_from_spec(tokenizer_to_spec(tok)) == tok == pickle.loads(pickle.dumps(tok))
    assert tokenizer_to_spec(tok) == {"name": "byte", "n_vocab": 257, "eot_token": 256}
    with pytest.raises(ValueError, match="257"):
        tok.decode([257])
    with pytest.raises(TypeError, match="no options"):
        get_tokenizer("byte", text="abc")


# ---------------------------------------------------------------------------------------------------------------
# A BPE trained on the corpus
@pytest.fixture(scope="module")
def corpus_docs() -> list[str]:
    from gptkernels.data import iter_documents

    return list(iter_documents(["builtin"]))[:20]  # about 120 KB: trains in well under a second


@pytest.fixture(scope="module")
def bpe512(corpus_docs) -> BPETokenizer:
    return get_tokenizer("bpe:512", text=iter(corpus_docs))  # an iterator: read once, as train streams it


def test_bpe_trains_to_the_vocabulary_size_and_round_trips(bpe512, corpus_docs):
    tok = bpe512
    assert isinstance(tok, BPETokenizer) and tok.n_vocab == 512 and tok.eot_token == 0
    for text in [UNICODE_TEXT, corpus_docs[0][:2000], "", " ", f"a{ENDOFTEXT}b"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.n_vocab for i in ids)
    assert 0 not in tok.encode(f"a{ENDOFTEXT}b")  # ordinary text, as tiktoken's encode_ordinary
    assert tok.decode([5, 0, 5]).count(ENDOFTEXT) == 1
    # it learned merges: fewer tokens than bytes on text like the corpus, and GPT-2's split keeps " the" whole
    sample = corpus_docs[1][:3000]
    assert len(tok.encode(sample)) < 0.6 * len(sample.encode("utf-8"))
    assert len(tok.encode(" the")) == 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([512])


def test_bpe_byte_lengths_sum_to_the_utf8_length(bpe512, corpus_docs):
    lengths = token_byte_lengths(bpe512)
    assert lengths.shape == (512,) and lengths[0] == len(ENDOFTEXT)
    for text in [UNICODE_TEXT, corpus_docs[2][:5000]]:
        assert int(lengths[bpe512.encode(text)].sum()) == len(text.encode("utf-8"))
    # each token alone decodes to exactly that many bytes (single bytes of a multi-byte character do not)
    for i in range(1, 512):
        piece = bpe512.decode([i])
        if "\ufffd" not in piece:
            assert len(piece.encode("utf-8")) == lengths[i], i


def test_bpe_training_is_deterministic(bpe512, corpus_docs):
    again = get_tokenizer("bpe:512", text=corpus_docs)  # a list this time, same documents
    assert again == bpe512 and again.json == bpe512.json


def test_bpe_spec_pickle_and_file_round_trip(bpe512, tmp_path):
    spec = tokenizer_to_spec(bpe512)
    assert spec["name"] == "bpe" and spec["n_vocab"] == 512 and spec["eot_token"] == 0
    assert json.loads(json.dumps(spec)) == spec  # plain strings and ints: JSON, and weights_only torch.load
    back = tokenizer_from_spec(spec)
    assert back == bpe512 and back.encode(UNICODE_TEXT) == bpe512.encode(UNICODE_TEXT)
    assert same_tokenizer(spec, tokenizer_to_spec(back))
    assert pickle.loads(pickle.dumps(bpe512)) == bpe512
    path = bpe512.save(tmp_path / "run")  # a folder: writes run/tokenizer.json
    assert path.endswith("tokenizer.json")
    assert get_tokenizer(f"bpe:{path}") == bpe512 == get_tokenizer("bpe", path=path)


def test_bpe_spec_survives_a_weights_only_checkpoint(bpe512, tmp_path):
    import torch

    torch.save({"tokenizer": tokenizer_to_spec(bpe512)}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert tokenizer_from_spec(state["tokenizer"]) == bpe512


def test_bpe_bad_inputs(tmp_path, corpus_docs):
    with pytest.raises(ValueError, match="text="):
        get_tokenizer("bpe:512")
    with pytest.raises(ValueError, match=">= 257"):
        get_tokenizer("bpe:100", text=corpus_docs)
    with pytest.raises(ValueError, match="vocabulary size"):
        get_tokenizer("bpe")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        get_tokenizer(f"bpe:{tmp_path / 'missing.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="tokenizers JSON"):
        get_tokenizer(f"bpe:{bad}")


def test_needs_training_text():
    assert needs_training_text("char") and needs_training_text("bpe:4096")
    assert not any(needs_training_text(n) for n in ["gpt2", "byte", "bpe:tok.json", "hf:x", None])


def test_data_pipeline_trains_a_bpe_on_the_raw_sources(tmp_path):
    from gptkernels.data import load_tokens

    text = "The cat sat on the mat. The dog sat on the log. " * 40
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    split = load_tokens([str(tmp_path / "a.txt")], "bpe:300", val_fraction=0.0, num_workers=1)
    tok = split.tokenizer
    assert isinstance(tok, BPETokenizer) and tok == get_tokenizer("bpe:300", text=[text])
    assert list(split.train) == [*tok.encode(text), tok.eot_token]


def test_prepared_folder_keeps_its_trained_bpe(tmp_path):
    from gptkernels.data import load_tokens
    from gptkernels.prepare import prepare

    (tmp_path / "a.txt").write_text("One cup of tea, two cups of tea. " * 30, encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], tmp_path / "prep", "bpe:300", num_workers=1, progress=False)
    raw = load_tokens([str(tmp_path / "a.txt")], "bpe:300", num_workers=1)
    for name in ("bpe:300", None):  # the folder's own BPE, trained once by prepare
        split = load_tokens([str(tmp_path / "prep")], name)
        assert split.tokenizer == raw.tokenizer and list(split.train) == list(raw.train)


# ---------------------------------------------------------------------------------------------------------------
def test_unknown_names_and_objects():
    with pytest.raises(ValueError, match="gpt2.*char.*byte.*bpe.*hf"):
        get_tokenizer("wordpiece")  # "bpe" was the example of an unknown name until BPETokenizer
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer_from_spec({"name": "wordpiece"})
    with pytest.raises(ValueError, match="name"):
        tokenizer_from_spec({"chars": "ab"})
    with pytest.raises(ValueError, match="cannot describe"):
        tokenizer_to_spec(object())
    with pytest.raises(TypeError):
        get_tokenizer(3)
    tok = CharTokenizer("ab")
    assert get_tokenizer(tok) is tok  # a tokenizer object passes through


def test_token_dtype():
    assert token_dtype(50257).name == "uint16"
    assert token_dtype(65536).name == "uint16"
    assert token_dtype(65537).name == "uint32"
