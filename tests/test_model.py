import math

import pytest
import torch
import torch.nn.functional as F

from gptkernels import GPT, GPTConfig
from gptkernels.model import shift_labels


def small_config(**kw) -> GPTConfig:
    base = dict(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, kernels="torch")
    return GPTConfig(**{**base, **kw})


def test_logits_shape_and_loss():
    model = GPT(small_config())
    idx = torch.randint(0, 97, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, 97)
    logits2, loss = model(idx, idx)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 97), idx.reshape(-1)))
    # untrained GPT-2 init: loss close to uniform
    assert abs(loss.item() - math.log(97)) < 0.5


def test_targets_minus_100_ignored():
    model = GPT(small_config())
    idx = torch.randint(0, 97, (2, 9))
    targets = idx.clone()
    targets[:, :4] = -100
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 97), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_return_logits_false_gives_same_loss_without_logits():
    model = GPT(small_config())
    idx = torch.randint(0, 97, (2, 9))
    _, loss = model(idx, idx)
    none, loss2 = model(idx, idx, return_logits=False)
    assert none is None
    torch.testing.assert_close(loss, loss2)


def test_sequence_longer_than_context_is_clear_error():
    model = GPT(small_config())
    with pytest.raises(ValueError, match="exceeds the model's context_length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_bad_idx_and_targets():
    model = GPT(small_config())
    with pytest.raises(ValueError, match="idx must be a"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_gpt2_parameter_names_and_tied_head():
    model = GPT(small_config())
    names = set(model.state_dict())
    for n in (
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.1.ln_2.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.ln_f.weight",
        "lm_head.weight",
    ):
        assert n in names, n
    assert model.lm_head.weight is model.transformer.wte.weight
    no_bias = GPT(small_config(qkv_bias=False))
    assert "transformer.h.0.attn.c_attn.bias" not in no_bias.state_dict()


@pytest.mark.parametrize("kernels", ["torch", "triton", "auto"])
def test_state_dict_identical_whatever_the_kernels(kernels):
    ref = GPT(small_config(kernels="torch")).state_dict()
    sd = GPT(small_config(kernels=kernels)).state_dict()
    assert list(sd) == list(ref)
    assert all(sd[k].shape == ref[k].shape for k in ref)


def test_gpt2_124m_parameter_count_and_flops():
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    assert model.num_params() == 124_439_808  # GPT-2 small, tied head counted once
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 1024 * 768


def test_implicit_shift_equals_explicit_targets():
    model = GPT(small_config())
    idx = torch.randint(0, 97, (2, 12))
    _, explicit = model(idx[:, :-1], idx[:, 1:])
    _, implicit = model(idx, shift_labels(idx))
    torch.testing.assert_close(explicit, implicit)


def test_optimizer_groups_decay_matrices_only():
    model = GPT(small_config())
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.transformer.wte.weight) in ids and id(model.transformer.wpe.weight) in ids
    assert id(model.transformer.h[0].ln_1.weight) in ids and id(model.transformer.h[0].attn.c_attn.bias) in ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_dropout_active_in_train_only():
    model = GPT(small_config(drop_rate=0.5))
    idx = torch.randint(0, 97, (2, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_training_reduces_loss():
    model = GPT(small_config())
    opt = model.configure_optimizer(lr=3e-3, weight_decay=0.0)
    idx = torch.randint(0, 97, (4, 16))
    losses = []
    for _ in range(40):
        _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_last_only_logits_equal_the_last_row():
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:])
