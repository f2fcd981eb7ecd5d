import math

import pytest
import torch

from gptkernels import GPT, GPTConfig, generate_text


def small_model(**kw) -> GPT:
    base = dict(vocab_size=50257, context_length=24, emb_dim=32, n_heads=4, n_layers=2, kernels="torch")
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**base, **kw})).eval()


def test_kv_cache_greedy_equals_recompute_including_sliding_window():
    model = small_model()
    idx = torch.randint(0, 50257, (2, 5))
    # 5 + 40 > context_length 24: the window slides and the cache is rebuilt
    with_cache = model.generate(idx, 40, temperature=0, use_cache=True)
    without = model.generate(idx, 40, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 45)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :5], idx)


def test_kv_cache_feeds_one_position_per_step():
    model = small_model()
    seen = []
    hook = model.transformer.wte.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    model.generate(torch.randint(0, 50257, (1, 7)), 5, temperature=0)
    hook.remove()
    assert seen == [7, 1, 1, 1, 1]


def test_kv_cache_logits_match_full_forward():
    model = small_model()
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        full = model(idx)
        caches = model.new_kv_caches(2)
        first = model(idx[:, :8], kv_caches=caches)
        rest = [model(idx[:, t : t + 1], kv_caches=caches) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_seed_reproducible_sampling():
    model = small_model()
    idx = torch.randint(0, 50257, (1, 3))
    a = model.generate(idx, 10, temperature=1.0, top_k=50, seed=123)
    b = model.generate(idx, 10, temperature=1.0, top_k=50, seed=123)
    c = model.generate(idx, 10, temperature=1.0, top_k=50, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_restores_training_mode():
    model = small_model().train()
    model.generate(torch.zeros(1, 1, dtype=torch.long), 2, temperature=0)
    assert model.training


def test_string_prompt_returns_string():
    model = small_model()
    text = model.generate(prompt="The future of AI is", max_length=10, temperature=0.8, seed=0)
    assert isinstance(text, str) and text.startswith("The future of AI is") and len(text) > len("The future of AI is")
    text2 = generate_text(model, "The future of AI is", max_new_tokens=10, temperature=0.8, seed=0)
    assert text2 == text


def test_streaming_callback_sees_the_whole_text():
    model = small_model()
    pieces = []
    text = generate_text(model, "Hello", max_new_tokens=12, temperature=0, on_text=pieces.append)
    assert "Hello" + "".join(pieces) == text


def test_text_without_streaming_reads_the_ids_once(monkeypatch):
    # Without on_text nothing needs each token as it comes: the ids are read back once at the end, not one host
    # read (a device sync on CUDA) per token; the text is the streamed one.
    model = small_model()
    streamed = generate_text(model, "Hello", max_new_tokens=12, temperature=0, on_text=lambda piece: None)
    reads = []
    to_int = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: (reads.append(1), to_int(t))[1])
    assert generate_text(model, "Hello", max_new_tokens=12, temperature=0) == streamed
    assert reads == []


def test_stops_at_end_of_text():
    model = small_model()
    with torch.no_grad():  # make <|endoftext|> the only likely token
        model.lm_head.weight[50256] = 0
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[50256, 0] = 100.0
    text = generate_text(model, "Hi", max_new_tokens=20, temperature=0, stop_at_eos=True)
    assert text == "Hi"
    ids = model.generate(torch.tensor([[10, 11]]), 20, temperature=0)
    assert ids.shape == (1, 22)  # without stop_at_eos it keeps going


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=3, temperature=-1.0), "temperature"),
    ],
)
def test_bad_arguments(kwargs, message):
    model = small_model()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **kwargs)


def test_needs_ids_or_prompt():
    model = small_model()
    with pytest.raises(ValueError, match="needs idx"):
        model.generate()
    with pytest.raises(ValueError, match="not both"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), prompt="x")


def test_all_sampling_settings_reach_the_sampling_op(monkeypatch):
    import gptkernels.generation as generation

    calls = []
    real = generation.sample

    def spy(logits, **kwargs):
        calls.append(kwargs)
        return real(logits, **kwargs)

    monkeypatch.setattr(generation, "sample", spy)
    model = small_model()
    idx = torch.randint(0, 50257, (1, 4))
    model.generate(idx, 3, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=0)
    assert len(calls) == 3
    last = calls[-1]
    assert (last["temperature"], last["top_k"], last["top_p"], last["min_p"], last["repetition_penalty"]) == (
        0.7,
        40,
        0.9,
        0.05,
        1.3,
    )
    assert last["prev_tokens"].shape == (1, 6) and torch.equal(last["prev_tokens"][:, :4], idx)
    assert isinstance(last["generator"], torch.Generator)


# ---- sampling errors: checked at once on the CPU, every 16 tokens on CUDA (forced here on the CPU) ----------


@pytest.fixture
def deferred(monkeypatch):
    """Run generation with the CUDA policy: validate=False, the ids checked every CHECK_EVERY tokens."""
    import gptkernels.generation as generation

    monkeypatch.setattr(generation, "_check_every", lambda device: generation.CHECK_EVERY)


def _nan_at(model, step, row=1):
    """Make the logits of ``row`` NaN at generation step ``step`` (counted from 1)."""
    calls = []

    def hook(module, inputs, out):
        calls.append(1)
        if len(calls) == step:
            out = out.clone()
            out[row] = float("nan")
            return out

    return model.lm_head.register_forward_hook(hook)


def _yields_until_error(model, idx, n, **kw):
    from gptkernels.generation import generate_tokens

    cols = []
    with pytest.raises(ValueError) as err:
        for col in generate_tokens(model, idx, n, **kw):
            cols.append(col)
    return cols, str(err.value)


@pytest.mark.parametrize(
    "nan_step, n, eos, raised_at",
    [
        (5, 40, None, 16),  # the next check point
        (16, 40, None, 16),
        (17, 20, None, 20),  # the last token is a check point
        (5, 40, 50256, 5),  # with eos every step is read anyway: the check rides on that read
    ],
)
def test_deferred_checks_report_a_bad_row_by_the_next_check_point(deferred, nan_step, n, eos, raised_at):
    model = small_model()
    idx = torch.randint(0, 50257, (2, 3))
    _nan_at(model, nan_step)
    cols, message = _yields_until_error(model, idx, n, temperature=0.9, top_k=50, seed=1, eos_token=eos)
    assert message == f"generation step {nan_step}: sample: row 1: logits contain NaN"
    assert len(cols) == raised_at - 1  # raised before the column of the check point is yielded
    assert all(bool((c >= 0).all()) for c in cols)  # the bad row's id never reaches the caller or the model


def test_immediate_checks_raise_at_the_bad_step():
    model = small_model()
    _nan_at(model, 5)
    cols, message = _yields_until_error(model, torch.randint(0, 50257, (2, 3)), 40, temperature=0.9, seed=1)
    assert message == "generation step 5: sample: row 1: logits contain NaN"
    assert len(cols) == 4


@pytest.mark.parametrize("use_eos", [False, True])
def test_deferred_checks_draw_the_same_tokens(monkeypatch, use_eos):
    """Same seed, same tokens with checks at once and every 16 tokens (sliding window, penalty and eos included)."""
    from gptkernels import generation

    model = small_model()
    idx = torch.randint(0, 50257, (2, 5))
    kw = dict(temperature=1.1, top_k=100, top_p=0.95, repetition_penalty=1.3, seed=7)

    def run():
        return torch.stack(list(generation.generate_tokens(model, idx, 40, eos_token=eos, **kw)), dim=1)

    eos = None
    immediate = run()
    if use_eos:  # one row's 7th token, so that row finishes early and the other one goes on
        eos = int(immediate[0, 6])
        immediate = run()
        assert (immediate[0, 6:] == eos).all()
    monkeypatch.setattr(generation, "_check_every", lambda device: generation.CHECK_EVERY)
    assert torch.equal(run(), immediate)


def test_deferred_checks_read_the_host_once_per_16_tokens(monkeypatch, deferred):
    """No sync per token on CUDA cannot be shown on the CPU; the host reads of the check can be counted:
    ceil(40 / 16) = 3 for 40 tokens, every sample call without validation."""
    from gptkernels import generation

    reads, validates = [], []
    real_read, real_sample = generation._read_check, generation.sample

    def read(worst, done):
        reads.append(done is not None)
        return real_read(worst, done)

    def sample(logits, **kw):
        validates.append(kw["validate"])
        return real_sample(logits, **kw)

    monkeypatch.setattr(generation, "_read_check", read)
    monkeypatch.setattr(generation, "sample", sample)
    monkeypatch.setattr(generation, "check_sampled", lambda ids: pytest.fail("check_sampled runs only on failure"))
    model = small_model()
    out = model.generate(torch.randint(0, 50257, (2, 3)), 40, temperature=0.8, seed=0)
    assert out.shape == (2, 43)
    assert reads == [False] * math.ceil(40 / 16)
    assert validates == [False] * 40
    assert generation._check_every(torch.device("cuda")) == 16 and generation.CHECK_EVERY == 16


_HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy")


@pytest.mark.parametrize("eos, expected", [(None, 3), (50256, 40)])
def test_deferred_generation_reads_the_host_only_at_check_points(monkeypatch, deferred, eos, expected):
    """Every tensor -> host read of the whole loop (model included) is counted: ceil(40 / 16) = 3 without eos;
    with eos one per token, the eos read that was there before (the check rides on it)."""
    from gptkernels.generation import generate_tokens

    model = small_model()
    idx = torch.randint(0, 50257, (2, 3))
    reads = []
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cols = list(generate_tokens(model, idx, 40, temperature=0.8, seed=0, eos_token=eos))
    monkeypatch.undo()
    assert len(cols) == 40
    assert len(reads) == expected, reads
