"""Multiple-choice scoring (HellaSwag style) and the batched continuation log-likelihoods under it: equal to one
unbatched forward per sequence, lm-eval's HellaSwag preprocessing, acc vs acc_norm, the hub and bad input."""

import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels.evaluation import multiple_choice
from gptkernels.evaluation.loglikelihood import score_continuations
from gptkernels.evaluation.multiple_choice import (
    MultipleChoice,
    arc_example,
    encode_pair,
    hellaswag_example,
    load_arc,
    load_hellaswag,
    parse_task,
    read_jsonl,
    run_task,
    score_multiple_choice,
)
from gptkernels.tokenizer import get_tokenizer

from .cli_helpers import ROOT, one_thread  # noqa: F401 (fixture)

SAMPLE = ROOT / "tests" / "data" / "hellaswag_sample.jsonl"
ARC = ROOT / "tests" / "data" / "arc_sample.jsonl"


@pytest.fixture(scope="module")
def byte_model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=257, context_length=96, emb_dim=32, n_heads=2, n_layers=2, kernels="torch")
    return GPT(cfg).eval(), get_tokenizer("byte")


@torch.no_grad()
def reference_logprob(model, context: list[int], continuation: list[int]) -> float:
    """One sequence, no batch, no padding: sum of log p(continuation token | all before it), cut from the left."""
    whole = (context + continuation)[-(model.config.context_length + 1) :]
    x = torch.tensor([whole[:-1]])
    logp = model(x)[0].double().log_softmax(-1)
    n = len(continuation)
    return sum(float(logp[len(whole) - 1 - n + j, continuation[j]]) for j in range(n))


def test_batched_scores_equal_one_sequence_at_a_time(byte_model):
    model, tok = byte_model
    texts = [("The kettle", " boils."), ("A", " b"), ("x" * 150, " truncated from the left"), ("Tea", " " * 3 + "!")]
    requests = [(tok.encode(c), tok.encode(e)) for c, e in texts]
    for batch_size in (1, 3, 16):
        got = score_continuations(model, requests, batch_size=batch_size)
        for (ctx, cont), (lp, greedy) in zip(requests, got):
            assert lp == pytest.approx(reference_logprob(model, ctx, cont), abs=1e-4)
            assert isinstance(greedy, bool)


def test_greedy_flag_is_true_exactly_for_the_argmax_continuation(byte_model):
    model, tok = byte_model
    ctx = tok.encode("Once upon a time")
    nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
    other = (nxt + 1) % 256
    (lp_best, g_best), (lp_other, g_other) = score_continuations(model, [(ctx, [nxt]), (ctx, [other])])
    assert g_best and not g_other and lp_best > lp_other


def test_score_continuations_rejects_bad_requests(byte_model):
    model, _ = byte_model
    with pytest.raises(ValueError, match="context is empty"):
        score_continuations(model, [([], [1])])
    with pytest.raises(ValueError, match="continuation is empty"):
        score_continuations(model, [([1], [])])
    with pytest.raises(ValueError, match="more than the context length 96"):
        score_continuations(model, [([1], [2] * 97)])
    with pytest.raises(ValueError, match="batch_size"):
        score_continuations(model, [([1], [2])], batch_size=0)


def test_hellaswag_preprocessing_is_lm_evals():
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    import datasets

    docs = read_jsonl(SAMPLE)
    theirs = utils.process_docs(datasets.Dataset.from_list(docs))  # lm-eval's own hellaswag process_docs
    for doc, processed in zip(docs, theirs):
        ours = hellaswag_example(doc)
        assert (ours.context, ours.endings, ours.label) == (processed["query"], processed["choices"], processed["gold"])
    wikihow = hellaswag_example(read_jsonl(SAMPLE)[2])
    assert "[" not in wikihow.context and "Check the soil first." in wikihow.context


def test_encode_pair_splits_like_lm_eval():
    tok = get_tokenizer("gpt2")
    ctx, cont = encode_pair(tok, "The cat sat on the ", "mat")  # the trailing space moves to the ending
    assert ctx == tok.encode("The cat sat on the") and cont == tok.encode(" mat")
    assert encode_pair(tok, "", "Hi") == ([tok.eot_token], tok.encode("Hi"))


def test_acc_sums_and_acc_norm_divides_by_the_endings_length(byte_model, monkeypatch):
    model, tok = byte_model
    examples = [
        MultipleChoice("c", ["a much longer ending here", "short"], label=0),  # 25 chars, 5 chars
        MultipleChoice("c", ["x", "yy"], label=1),
    ]
    fixed = iter([(-20.0, False), (-10.0, False), (-1.0, False), (-1.5, False)])
    monkeypatch.setattr(multiple_choice, "score_continuations", lambda m, reqs, **kw: [next(fixed) for _ in reqs])
    r = score_multiple_choice(model, tok, examples)
    # example 1: sum picks "short" (-10 > -20), per character picks the long one (-0.8 > -2): acc_norm only
    # example 2: sum picks "x" (-1 > -1.5), per character picks "yy" (-0.75 > -1): acc_norm only
    assert (r["acc"], r["acc_norm"], r["acc_bytes"], r["n"]) == (0.0, 1.0, 1.0, 2)
    assert r["loglikelihoods"] == [[-20.0, -10.0], [-1.0, -1.5]]


def test_scores_equal_the_reference_on_the_sample_file(byte_model):
    model, tok = byte_model
    examples = load_hellaswag(str(SAMPLE))
    assert len(examples) == 6 and load_hellaswag(str(SAMPLE), limit=2) == examples[:2]
    r = score_multiple_choice(model, tok, examples, batch_size=5)
    acc = acc_norm = 0
    for ex, lls in zip(examples, r["loglikelihoods"]):
        ref = [reference_logprob(model, *encode_pair(tok, ex.context, " " + e)) for e in ex.endings]
        assert lls == pytest.approx(ref, abs=1e-4)
        acc += max(range(4), key=ref.__getitem__) == ex.label
        acc_norm += max(range(4), key=lambda i: ref[i] / len(ex.endings[i])) == ex.label
    assert r["acc"] == acc / 6 and r["acc_norm"] == acc_norm / 6
    assert run_task(f"hellaswag={SAMPLE}", model, tok)["acc"] == r["acc"]
    arc = run_task(f"arc_easy={ARC}", model, tok, limit=2)
    assert arc["task"] == "arc_easy" and arc["n"] == 2 and [len(x) for x in arc["loglikelihoods"]] == [4, 3]


def test_hub_sources_read_the_right_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return read_jsonl(ARC if name == "allenai/ai2_arc" else SAMPLE)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_hellaswag("hf:Rowan/hellaswag", limit=3) == load_hellaswag(str(SAMPLE), limit=3)
    assert load_arc("hf:allenai/ai2_arc:ARC-Easy") == load_arc(str(ARC))
    assert calls == [("Rowan/hellaswag", None, "validation"), ("allenai/ai2_arc", "ARC-Easy", "test")]
    assert parse_task("hellaswag") == ("hellaswag", "hf:Rowan/hellaswag")
    assert parse_task("arc_challenge") == ("arc_challenge", "hf:allenai/ai2_arc:ARC-Challenge")


def test_arc_official_and_hub_records_give_lm_evals_prompt():
    official = read_jsonl(ARC)[1]
    hub = {  # the same question as allenai/ai2_arc stores it
        "id": official["id"],
        "question": official["question"]["stem"],
        "choices": {
            "text": [c["text"] for c in official["question"]["choices"]],
            "label": [c["label"] for c in official["question"]["choices"]],
        },
        "answerKey": official["answerKey"],
    }
    ex = arc_example(official)
    assert ex == arc_example(hub)
    assert ex.context == "Question: What happens to ice left in a warm room?\nAnswer:"  # lm-eval's arc_easy prompt
    assert ex.endings == ["It melts.", "It grows.", "It turns into sand."] and ex.label == 0
    with pytest.raises(ValueError, match="answerKey 'E'"):
        arc_example({**hub, "answerKey": "E"})
    with pytest.raises(ValueError, match="not an ARC record"):
        arc_example({"question": "q"})


def test_bad_hellaswag_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_hellaswag(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx_a": "x", "ctx_b": "y", "endings": ["a"], "label": 0}\n')
    with pytest.raises(ValueError, match="record 1: .*missing activity_label"):
        load_hellaswag(str(bad))
    bad.write_text('{"ctx_a": "x", "ctx_b": "y", "activity_label": "z", "endings": ["a"], "label": ""}\n')
    with pytest.raises(ValueError, match="without a label"):
        load_hellaswag(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not JSON"):
        load_hellaswag(str(bad))
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no HellaSwag records"):
        load_hellaswag(str(bad))
    with pytest.raises(ValueError, match="unknown task 'piqa'.*arc_easy"):
        parse_task("piqa=x.jsonl")
    with pytest.raises(ValueError, match="source after"):
        parse_task("hellaswag=")


def test_no_lm_eval_import_for_multiple_choice():
    import subprocess
    import sys

    code = "import sys, gptkernels.evaluation, gptkernels.evaluate; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
