"""The continuous-batching engine: greedy parity with model.generate under mixed load, joins and leaves, chunked
prefill, stop strings, max tokens, end-of-text, slot reuse, aborts and bad requests."""

import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels.serving import Engine, SamplingParams
from gptkernels.serving.engine import _held_back
from gptkernels.tokenizer import get_tokenizer

CTX = 96


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, context_length=CTX, emb_dim=32, n_heads=4, n_layers=2, kernels="torch")
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def reference(model, prompt, n, **kw):
    return model.generate(torch.tensor([prompt]), n, **kw)[0, len(prompt) :].tolist()


def random_prompts(count, seed, longest=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (count,), generator=g).tolist()
    return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]


def run(engine, limit=2000, acc=None):
    """Step until idle (or ``limit`` steps); {request id: Output with the whole text and ids so far}."""
    acc = {} if acc is None else acc
    for _ in range(limit):
        if not engine.has_unfinished():
            return acc
        for o in engine.step():
            prev = acc.get(o.request_id)
            assert prev is None or not prev.finished, "output after the end"
            if prev is not None:
                o.text, o.token_ids = prev.text + o.text, prev.token_ids + o.token_ids
                o.logprobs = prev.logprobs + o.logprobs
            acc[o.request_id] = o
    assert limit < 2000, "engine did not finish"
    return acc


def test_greedy_equals_generate_under_mixed_load(model, tok):
    # 5 slots for 16 requests: sequences join as others leave; 16 prefill tokens per step: long prompts are
    # prefilled in chunks while the others decode; sampled requests with other settings share every batch.
    engine = Engine(model, tok, max_batch_size=5, max_prefill_tokens=16, eos_token_id=None)
    prompts = random_prompts(16, seed=1)
    lengths = [3 + (7 * i) % 29 for i in range(16)]
    greedy, outs = {}, {}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        if i == 8:  # the second half joins a running batch
            run(engine, limit=5, acc=outs)
            assert engine.num_running == 5
        if i % 3 == 2:
            sp = SamplingParams(max_tokens=n, temperature=1.3, top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.2)
            engine.add_request(p, sp)
        else:
            greedy[engine.add_request(p, SamplingParams(max_tokens=n, temperature=0))] = (p, n)
    run(engine, acc=outs)
    assert len(outs) == 16 and all(o.finished for o in outs.values())
    for rid, (p, n) in greedy.items():
        assert outs[rid].token_ids == reference(model, p, n, temperature=0), f"request {rid}"
        assert outs[rid].finish_reason == "length"
    assert engine.num_free_slots == 5 and engine.num_running == 0


def test_seeded_sampling_equals_generate(model, tok):
    engine = Engine(model, tok, max_batch_size=4, eos_token_id=None)
    prompts = random_prompts(4, seed=2)
    settings = [
        dict(temperature=0.8, top_k=50),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=0.7, min_p=0.05, repetition_penalty=1.3),
        dict(temperature=0.0, repetition_penalty=1.5),
    ]
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=12, seed=10 + i, **s))
        for i, (p, s) in enumerate(zip(prompts, settings))
    ]
    outs = run(engine)
    for i, (p, s) in enumerate(zip(prompts, settings)):
        assert outs[ids[i]].token_ids == reference(model, p, 12, seed=10 + i, **s), s
    again = Engine(model, tok, max_batch_size=4, eos_token_id=None).generate(
        [prompts[0]], SamplingParams(max_tokens=12, seed=10, **settings[0])
    )
    assert again[0].token_ids == outs[ids[0]].token_ids


def test_stop_string_cuts_the_text_and_is_never_emitted(model, tok):
    prompt = tok.encode("The quick brown fox")
    full = tok.decode(reference(model, prompt, 30, temperature=0))
    stop = full[12:15]
    cut = full.find(stop)
    engine = Engine(model, tok, max_batch_size=2, eos_token_id=None)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=30, temperature=0, stop=("never-there", stop)))
    deltas = []
    while engine.has_unfinished():
        deltas += [o for o in engine.step() if o.request_id == rid]
    text = "".join(o.text for o in deltas)
    assert text == full[:cut] and stop not in text
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert all(not o.finished for o in deltas[:-1])


def test_held_back_text():
    assert _held_back("hello wor", ("world",)) == 3
    assert _held_back("hello", ("world",)) == 0
    assert _held_back("ab\ufffd", ()) == 1
    assert _held_back("xx ab", ("abc", "b")) == 2


def test_max_tokens_and_eos(model, tok):
    prompt = random_prompts(1, seed=3)[0]
    ref = reference(model, prompt, 20, temperature=0)
    out = Engine(model, tok, eos_token_id=None, max_batch_size=2).generate([prompt], SamplingParams(7, temperature=0))
    assert out[0].token_ids == ref[:7] and out[0].finish_reason == "length" and out[0].completion_tokens == 7
    # Make the 6th greedy token the end-of-text token: generation stops before it and leaves it out.
    eos = ref[5]
    k = ref.index(eos)
    out = Engine(model, tok, eos_token_id=eos, max_batch_size=2).generate([prompt], SamplingParams(20, temperature=0))
    assert out[0].token_ids == ref[:k] and out[0].finish_reason == "stop"
    assert out[0].text == tok.decode(ref[:k])
    sp = SamplingParams(20, temperature=0, ignore_eos=True)
    out = Engine(model, tok, eos_token_id=eos, max_batch_size=2).generate([prompt], sp)
    assert out[0].token_ids == ref


def test_slots_are_reused_without_reallocation(model, tok):
    engine = Engine(model, tok, max_batch_size=2, eos_token_id=None)
    pool = engine.k.data_ptr(), engine.v.data_ptr()
    prompts = random_prompts(7, seed=4, longest=20)
    outs = engine.generate(prompts, [SamplingParams(max_tokens=2 + i, temperature=0) for i in range(7)])
    assert [len(o.token_ids) for o in outs] == [2 + i for i in range(7)]
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference(model, p, len(o.token_ids), temperature=0)
    assert (engine.k.data_ptr(), engine.v.data_ptr()) == pool
    assert engine.num_free_slots == 2


def test_abort_frees_the_slot(model, tok):
    engine = Engine(model, tok, max_batch_size=1, eos_token_id=None)
    a = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, temperature=0))
    b = engine.add_request([4, 5], SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    assert engine.num_free_slots == 0 and len(engine.waiting) == 1
    assert engine.abort_request(a) and not engine.abort_request(a)
    assert engine.num_free_slots == 1
    outs = run(engine)
    assert list(outs) == [b] and outs[b].token_ids == reference(model, [4, 5], 3, temperature=0)


def test_logprobs_are_the_models(model, tok):
    prompt = random_prompts(1, seed=5)[0]
    out = Engine(model, tok, eos_token_id=None).generate([prompt], SamplingParams(3, temperature=0, logprobs=3))[0]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), dim=-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] == int(lp.argmax())
    assert first.logprob == pytest.approx(float(lp.max()), abs=1e-5)
    assert [t for t, _ in first.top] == lp.topk(3).indices.tolist() and len(out.logprobs) == 3


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        (list(range(CTX)), SamplingParams(max_tokens=1), "prompt has 96 tokens"),
        ([1, 2], SamplingParams(max_tokens=CTX), "exceeds the context"),
        ([1, 2], SamplingParams(temperature=-0.5), "temperature"),
        ([], SamplingParams(), "prompt is empty"),
        ([50257], SamplingParams(), "outside the vocabulary"),
        ([1], SamplingParams(top_p=0), "top_p"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(stop=("",)), "stop strings"),
        ([1], SamplingParams(logprobs=99), "logprobs"),
        ([1], SamplingParams(seed=2**64), "seed"),
    ],
)
def test_bad_requests_are_refused(model, tok, prompt, params, message):
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()


def test_decoding_rows_move_past_a_half_prefilled_sequence(model, tok):
    # 3 slots, 4 prefill tokens per step. A finishes early; D takes its slot 0 and B moves down into it; when C
    # (slot 2) starts decoding, it swaps with D, which holds slot 1 half prefilled: both caches must survive.
    engine = Engine(model, tok, max_batch_size=3, max_prefill_tokens=4, eos_token_id=None)
    long_c, long_d = random_prompts(2, seed=6, longest=2)[0] * 30, list(range(100, 130))
    jobs = {"A": ([1, 2], 2), "B": ([3, 4], 30), "C": (long_c[:30], 5)}
    for rid, (p, n) in jobs.items():
        engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, logprobs=0), request_id=rid)
    outs = run(engine, limit=2)
    assert outs["A"].finished
    jobs["D"] = (long_d, 5)
    engine.add_request(long_d, SamplingParams(max_tokens=5, temperature=0, logprobs=0), request_id="D")
    run(engine, acc=outs)
    for rid, (p, n) in jobs.items():
        out = outs[rid]
        assert out.token_ids == reference(model, p, n, temperature=0), rid
        # Greedy tokens hardly depend on a few early positions; the logprobs do: teacher-forced reference.
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + out.token_ids]))[0].float(), dim=-1)
        want = lp[len(p) - 1 : -1].gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        got = torch.tensor([t.logprob for t in out.logprobs])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=rid)


@pytest.mark.parametrize("logprobs", [None, 1], ids=["plain", "logprobs"])
def test_a_row_with_nan_logits_ends_alone(model, tok, monkeypatch, logprobs):
    engine = Engine(model, tok, max_batch_size=2, eos_token_id=None)
    decode = engine._decode

    def poisoned(seqs):
        logits = decode(seqs)
        return torch.where(torch.tensor([s.request_id == "bad" for s in seqs])[:, None], torch.nan, logits)

    monkeypatch.setattr(engine, "_decode", poisoned)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=10, temperature=0, logprobs=logprobs), request_id="bad")
    engine.add_request([4, 5], SamplingParams(max_tokens=10, temperature=0.7, seed=3), request_id="good")
    outs = run(engine)
    assert outs["bad"].finish_reason == "error" and len(outs["bad"].token_ids) == 1  # from the prefill
    assert outs["good"].token_ids == reference(model, [4, 5], 10, temperature=0.7, seed=3)
    assert engine.num_free_slots == 2


def test_tiny_temperature_is_greedy(model, tok):
    out = Engine(model, tok, eos_token_id=None).generate([[7, 8]], SamplingParams(max_tokens=6, temperature=1e-30))
    assert out[0].token_ids == reference(model, [7, 8], 6, temperature=0)


def test_logit_bias_and_presence_penalty(model, tok):
    engine = Engine(model, tok, eos_token_id=None)
    prompt = [11, 12, 13]
    ref = reference(model, prompt, 12, temperature=0)
    assert len(set(ref)) < len(ref)  # the random model repeats itself greedily
    biased, fresh = engine.generate(
        [prompt, prompt],
        [
            SamplingParams(max_tokens=5, temperature=0, logit_bias={777: 100.0}),
            SamplingParams(max_tokens=12, temperature=0, presence_penalty=2.0),
        ],
    )
    assert biased.token_ids == [777] * 5
    assert len(set(fresh.token_ids)) == 12 and fresh.token_ids[0] == ref[0]  # nothing generated yet at step 1


def test_benchmark_script_runs(capsys):
    from gptkernels.serving import bench

    rows, latency = bench.run_benchmark("tiny", concurrency=(1, 3), prompt_len=4, max_tokens=3, sequential_runs=1)
    assert [r["concurrency"] for r in rows] == [1, 3]
    assert all(r["engine"] > 0 and r["generate"] > 0 and r["hf_single"] > 0 and r["hf_batch"] > 0 for r in rows)
    assert latency["ttft"]["p50"] > 0 and latency["itl"]["p50"] > 0
    assert latency["http_ttft"]["p50"] > 0 and latency["http_itl"]["p50"] > 0 and latency["http_tokens_per_s"] > 0
    assert "| tiny (cpu) | 3 |" in bench.format_table(rows, latency)
