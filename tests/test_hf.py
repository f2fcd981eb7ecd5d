"""Weights to and from Hugging Face transformers, and patch_hf_gpt2, checked against transformers itself."""

import pytest
import torch

from gptkernels import GPT, GPTConfig, patch_hf_gpt2
from gptkernels.ops import count_launches, why_not_triton

DEVICE_RUNS_KERNELS = why_not_triton(torch.device("cpu")) is None

transformers = pytest.importorskip("transformers")


def random_hf_gpt2(drop: float = 0.0):
    cfg = transformers.GPT2Config(
        vocab_size=211,
        n_positions=48,
        n_embd=48,
        n_layer=3,
        n_head=4,
        resid_pdrop=drop,
        embd_pdrop=drop,
        attn_pdrop=drop,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # random LayerNorm affine too, so a missed mapping cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model.eval()


def test_from_hf_object_gives_identical_logits():
    hf = random_hf_gpt2()
    model = GPT.from_hf(hf, kernels="torch").eval()
    idx = torch.randint(0, 211, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_from_hf_local_folder(tmp_path):
    hf = random_hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_hf(tmp_path / "hf", kernels="torch").eval()
    idx = torch.randint(0, 211, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_from_hf_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        GPT.from_hf(tmp_path / "nope")


def test_save_hf_loads_in_transformers_with_identical_logits(tmp_path):
    cfg = GPTConfig(vocab_size=101, context_length=40, emb_dim=32, n_heads=4, n_layers=2, kernels="torch")
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.1)
    folder = model.save_hf(tmp_path / "export")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    idx = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)
    # and back again
    again = GPT.from_hf(folder, kernels="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model(idx), atol=1e-5, rtol=0)


def test_save_hf_without_qkv_bias(tmp_path):
    cfg = GPTConfig(
        vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=1, qkv_bias=False, kernels="torch"
    )
    model = GPT(cfg).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(model.save_hf(tmp_path / "m")).eval()
    idx = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)


def test_patch_hf_gpt2_same_logits_and_loss():
    hf = random_hf_gpt2()
    idx = torch.randint(0, 211, (2, 19))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
    patch_hf_gpt2(hf)
    assert type(hf.transformer.h[0].ln_1).__module__ == "gptkernels.nn"
    with torch.no_grad(), count_launches() as launched:
        out = hf(idx, labels=idx)
    if DEVICE_RUNS_KERNELS:  # prove the fused kernels ran, not only the references
        assert {"layer_norm_fwd", "bias_gelu_fwd", "attention_fwd"} <= set(launched), launched
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_patch_hf_gpt2_training_gradients_match_and_skip_logits():
    ref = random_hf_gpt2().train()
    patched = patch_hf_gpt2(random_hf_gpt2().train())
    idx = torch.randint(0, 211, (2, 13))
    labels = idx.clone()
    labels[0, :5] = -100
    a = ref(idx, labels=labels)
    b = patched(idx, labels=labels)
    assert b.logits is None  # the fused loss never materialised the logits
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=0)
    a.loss.backward()
    b.loss.backward()
    for (name, pa), pb in zip(ref.named_parameters(), patched.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_patch_hf_gpt2_generate_with_cache_matches():
    hf = random_hf_gpt2()
    idx = torch.randint(0, 211, (1, 6))
    expected = hf.generate(idx, max_new_tokens=8, do_sample=False, pad_token_id=0)
    patch_hf_gpt2(hf)
    torch.testing.assert_close(hf.generate(idx, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)


def test_patch_hf_gpt2_rejects_other_models():
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        patch_hf_gpt2(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------------
# patch_hf_gpt2 keeps the original forward's arguments (issue 13: position_ids and friends were dropped)
def _left_padded_batch():
    ids = torch.randint(1, 211, (3, 7))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding, as batched generation does
    ids[1, :1], mask[1, :1] = 0, 0
    return ids, mask


def test_patch_hf_gpt2_generate_left_padded_batch_matches():
    ids, mask = _left_padded_batch()
    ref, patched = random_hf_gpt2(), patch_hf_gpt2(random_hf_gpt2(), kernels="torch")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(patched.generate(ids, **kw), ref.generate(ids, **kw), rtol=0, atol=0)
    with torch.no_grad():  # scores too, step by step through the cache
        a = ref.generate(ids, **kw, output_scores=True, return_dict_in_generate=True)
        b = patched.generate(ids, **kw, output_scores=True, return_dict_in_generate=True)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sb, sa, atol=1e-4, rtol=0)


def test_patch_hf_gpt2_accepts_every_argument_of_the_original_forward():
    import inspect

    ref, patched = random_hf_gpt2(), patch_hf_gpt2(random_hf_gpt2(), kernels="torch")
    assert inspect.signature(patched.forward) == inspect.signature(ref.forward)
    ids, mask = _left_padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    types = torch.randint(0, 211, ids.shape)
    with torch.no_grad():
        for kwargs in (
            dict(attention_mask=mask, position_ids=pos, labels=ids),
            dict(attention_mask=mask, token_type_ids=types),
            dict(inputs_embeds=ref.transformer.wte(ids), attention_mask=mask),
            dict(attention_mask=mask, logits_to_keep=1),
        ):
            call = {k: v for k, v in kwargs.items() if k != "inputs_embeds"}
            args = () if "inputs_embeds" in kwargs else (ids,)
            if "inputs_embeds" in kwargs:
                call["inputs_embeds"] = patched.transformer.wte(ids)
            a, b = ref(*args, **kwargs), patched(*args, **call)
            torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=0, msg=str(sorted(kwargs)))
            if "labels" in kwargs:
                torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=0)
        # the cache of a first call continues in a second, and return_dict=False gives the same tuple
        first_a = ref(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        first_b = patched(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        key = "cache" if "cache" in first_a else "past_key_values"
        a = ref(ids[:, 4:], attention_mask=mask, **{key: first_a[key]})
        b = patched(ids[:, 4:], attention_mask=mask, **{key: first_b[key]})
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=0)
        ta = ref(ids, labels=ids, return_dict=False)
        tb = patched(ids, labels=ids, return_dict=False)
        assert isinstance(tb, tuple) and len(tb) == len(ta)
        torch.testing.assert_close(tb[0], ta[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(tb[1], ta[1], atol=1e-4, rtol=0)
    # training mode with labels: the fused loss, also as a tuple, and with Trainer's num_items_in_batch
    ref.train(), patched.train()
    a = ref(ids, attention_mask=mask, labels=ids, return_dict=False, num_items_in_batch=11)
    b = patched(ids, attention_mask=mask, labels=ids, return_dict=False, num_items_in_batch=11)
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# from_hf: configs this GPT cannot compute are refused, the untied head is supported (issue 13)
def _tiny_hf(**config):
    cfg = transformers.GPT2Config(
        vocab_size=67, n_positions=24, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **config
    )
    torch.manual_seed(2)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize(
    "config",
    [
        dict(tie_word_embeddings=False),
        dict(reorder_and_upcast_attn=True, attn_implementation="eager"),  # the same function, upcast
        dict(n_inner=128),  # 4 * n_embd, spelled out
        dict(activation_function="gelu_pytorch_tanh"),
    ],
)
def test_from_hf_supported_configs_give_the_same_logits(config, tmp_path):
    hf = _tiny_hf(**config)
    if not hf.config.tie_word_embeddings:
        assert hf.lm_head.weight is not hf.transformer.wte.weight
    model = GPT.from_hf(hf, kernels="torch").eval()
    idx = torch.randint(0, 67, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)
    if not hf.config.tie_word_embeddings:  # and back out: still untied in transformers
        back = transformers.GPT2LMHeadModel.from_pretrained(model.save_hf(tmp_path / "untied")).eval()
        assert not back.config.tie_word_embeddings
        with torch.no_grad():
            torch.testing.assert_close(back(idx).logits, hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(scale_attn_weights=False), "scale_attn_weights=False"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
        (dict(n_inner=80), "n_inner=80"),
        (dict(activation_function="relu"), "activation_function='relu'"),
        (dict(activation_function="gelu"), "activation_function='gelu'"),  # erf GELU: close, but not the same
    ],
)
def test_from_hf_refuses_configs_it_would_compute_differently(config, message, tmp_path):
    hf = _tiny_hf(**config)
    with pytest.raises(ValueError, match=f"cannot load this GPT-2 exactly; unsupported: {message}"):
        GPT.from_hf(hf, kernels="torch")
    hf.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=message):
        GPT.from_hf(tmp_path / "m", kernels="torch")


def test_from_hf_checks_the_logits_after_loading():
    hf = _tiny_hf()
    hf.transformer.h[1].attn.scaling = 1.0  # a change its config does not show
    with pytest.raises(ValueError, match="logits differ from the Hugging Face model's"):
        GPT.from_hf(hf, kernels="torch")


def test_from_hf_names_that_mean_a_local_folder_never_go_to_the_network(tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even online
    _tiny_hf().save_pretrained(tmp_path / "out" / "tiny-hf")

    def no_network(*args, local_files_only=False, **kwargs):
        if local_files_only:  # the local Hugging Face cache: not there
            raise OSError("not in the cache")
        raise AssertionError("went to the hub")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", no_network)
    (tmp_path / "tiny-hf2").mkdir()
    start = time.monotonic()
    for name, message in [
        ("out/tiny-hff", r"no such model folder: out/tiny-hff \(out/ is a local folder\)"),
        ("./tiny", "no such model folder: tiny"),
        ("tiny-hf", r"no such model folder: tiny-hf \(did you mean tiny-hf2\?\)"),  # a typo-like name
    ]:
        with pytest.raises(FileNotFoundError, match=message):
            GPT.from_hf(name)
    assert time.monotonic() - start < 5
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        GPT.from_hf("empty")


def test_from_hf_hub_name_offline_not_cached_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local folder nor in the Hugging Face cache"):
        GPT.from_hf("nobody-has-this/gpt2-model-xyz")


def test_from_hf_with_triton_kernels_loads_where_the_kernels_cannot_run(monkeypatch):
    from gptkernels.ops import _backend

    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)  # a CPU without TRITON_INTERPRET=1
    model = GPT.from_hf(_tiny_hf(), kernels="triton")  # the logit check after loading uses PyTorch's ops
    assert model.config.kernels == "triton" and model.transformer.h[0].ln_1.kernels == "triton"


def test_from_hf_refuses_folders_transformers_would_fill_with_random_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_hf().save_pretrained(tmp_path / "partial")
    weights = load_file(tmp_path / "partial" / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights missing from its files: transformer\.h\.1\.mlp\.c_fc\.weight"):
        GPT.from_hf(tmp_path / "partial", kernels="torch")
    llama = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="a 'llama' model, not a GPT-2"):
        GPT.from_hf(tmp_path / "llama", kernels="torch")
