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
