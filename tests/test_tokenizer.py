"""Tokenizers: GPT-2 BPE from local files, character level, Hugging Face folders, and their specs."""

import json
import pickle

import pytest

from gptkernels.tokenizer import (
    ENDOFTEXT,
    CharTokenizer,
    HFTokenizer,
    encode_ordinary,
    get_tokenizer,
    gpt2_files,
    same_tokenizer,
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
def test_unknown_names_and_objects():
    with pytest.raises(ValueError, match="gpt2.*char.*hf"):
        get_tokenizer("bpe")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer_from_spec({"name": "bpe"})
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
