import pytest

from gptkernels import GPTConfig

TINY_DICT = {
    "vocab_size": 50257,
    "context_length": 128,
    "emb_dim": 64,
    "n_heads": 8,
    "n_layers": 8,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


def test_from_dict_classic_form():
    cfg = GPTConfig.from_dict(TINY_DICT)
    assert (cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.context_length) == (64, 8, 8, 128)
    assert cfg.head_dim == 8 and cfg.qkv_bias is False and cfg.drop_rate == 0.1


def test_from_dict_ignores_training_keys_with_warning():
    with pytest.warns(UserWarning) as record:
        cfg = GPTConfig.from_dict({**TINY_DICT, "max_length": 128, "batch_size": 8, "output_dimension": 50257})
    assert cfg.emb_dim == 64
    messages = " ".join(str(w.message) for w in record)
    assert all(key in messages for key in ("'max_length'", "'batch_size'", "'output_dimension'"))


def test_from_dict_unknown_key_names_it():
    with pytest.raises(ValueError, match="'n_embd'"):
        GPTConfig.from_dict({**TINY_DICT, "n_embd": 64})


@pytest.mark.parametrize(
    "name, width, heads, layers",
    [("gpt2", 768, 12, 12), ("gpt2-medium", 1024, 16, 24), ("gpt2-large", 1280, 20, 36), ("gpt2-xl", 1600, 25, 48)],
)
def test_gpt2_presets(name, width, heads, layers):
    cfg = GPTConfig.preset(name)
    assert (cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.context_length, cfg.vocab_size) == (
        width,
        heads,
        layers,
        1024,
        50257,
    )


def test_tiny_preset_matches_classic_dict():
    assert GPTConfig.preset("tiny") == GPTConfig.from_dict(TINY_DICT)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        GPTConfig.preset("gpt5")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"emb_dim": 65, "n_heads": 8}, "divisible"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"context_length": 1.5}, "context_length"),
        ({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"kernels": "cuda"}, "kernels must be one of"),
        ({"qkv_bias": "no"}, "qkv_bias must be true or false"),
        ({"qkv_bias": 1}, "qkv_bias must be true or false"),
        ({"drop_rate": "0.1"}, "drop_rate must be a finite number"),
        ({"layer_norm_eps": float("nan")}, "layer_norm_eps must be a finite number"),
        ({"n_layers": True}, "n_layers must be a positive integer"),
        ({"kernels": ["auto"]}, "kernels must be one of"),
    ],
)
def test_invalid_configs_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)
    with pytest.raises(ValueError, match=message):  # the dict form (YAML, checkpoints) goes through the same checks
        GPTConfig.from_dict(kwargs)
