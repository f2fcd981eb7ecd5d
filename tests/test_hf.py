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
