"""The drop-in modules: same constructor and state dict as the PyTorch layers, same outputs, kernels ran."""

import pytest
import torch
import torch.nn.functional as F

from gptkernels import GPT, GPTConfig
from gptkernels.nn import CausalSelfAttention, LayerNorm, LinearGELU, LMHeadLoss, set_kernels
from gptkernels.ops import count_launches, why_not_triton

from .tolerances import FLOOR

pytestmark = pytest.mark.skipif(
    why_not_triton(torch.device("cpu")) is not None and not torch.cuda.is_available(),
    reason="Triton kernels cannot run here (no CUDA and no TRITON_INTERPRET=1)",
)
ATOL = 20 * FLOOR[torch.float32]


def test_layer_norm_is_a_torch_layer_norm(device):
    ref = torch.nn.LayerNorm(40).to(device)
    ours = LayerNorm(40, kernels="triton").to(device)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 5, 40, device=device)
    with count_launches() as launched:
        y = ours(x)
    assert launched["layer_norm_fwd"] == 1
    torch.testing.assert_close(y, ref(x), atol=ATOL, rtol=0)


def test_linear_gelu_equals_linear_then_tanh_gelu(device):
    ref = torch.nn.Linear(24, 40).to(device)
    ours = LinearGELU(24, 40, kernels="triton").to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 24, device=device)
    with count_launches() as launched:
        y = ours(x)
    assert launched["bias_gelu_fwd"] == 1
    torch.testing.assert_close(y, F.gelu(ref(x), approximate="tanh"), atol=ATOL, rtol=0)


def test_attention_module_kernels_vs_torch(device):
    torch.manual_seed(0)
    mod = CausalSelfAttention(32, 4, dropout=0.0, kernels="triton").to(device)
    x = torch.randn(2, 9, 32, device=device)
    with count_launches() as launched:
        y = mod(x)
    assert launched["attention_fwd"] == 1
    mod.kernels = "torch"
    torch.testing.assert_close(y, mod(x), atol=ATOL, rtol=0)


def test_lm_head_loss(device):
    loss_fn = LMHeadLoss(kernels="triton")
    h = torch.randn(2, 5, 16, device=device)
    w = torch.randn(33, 16, device=device)
    t = torch.randint(0, 33, (2, 5), device=device)
    with count_launches() as launched:
        loss = loss_fn(h, w, t)
    assert sum(launched.values()) >= 1
    torch.testing.assert_close(loss, F.cross_entropy((h @ w.T).reshape(-1, 33), t.reshape(-1)), atol=ATOL, rtol=0)


def test_bad_kernels_choice():
    with pytest.raises(ValueError, match="kernels must be one of"):
        LayerNorm(8, kernels="fast")
    with pytest.raises(ValueError, match="kernels must be one of"):
        set_kernels(torch.nn.Sequential(), "fast")


def _tiny(kernels: str, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", **{"vocab_size": 211, "drop_rate": 0.0, "kernels": kernels, **overrides}))


def test_tiny_gpt_triton_equals_torch_logits_loss_grads(device):
    """The `tiny` preset (head size 8) with fused kernels vs PyTorch ops: same logits, loss and gradients."""
    a, b = _tiny("torch").to(device), _tiny("triton").to(device)
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 211, (2, 16), device=device)
    targets = torch.randint(0, 211, (2, 16), device=device)
    targets[0, :3] = -100
    la, loss_a = a(idx, targets)
    with count_launches() as launched:
        lb, loss_b = b(idx, targets)
        loss_b.backward()
    for kernel in ("layer_norm_fwd", "add_layer_norm_fwd", "bias_gelu_fwd", "attention_fwd", "attention_bwd"):
        assert launched[kernel] > 0, (kernel, launched)
    loss_a.backward()
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_tiny_gpt_training_steps_same_losses_and_weights_interchange(device):
    """A few AdamW steps of the tiny architecture (2 of its 8 layers, to keep the interpreter quick)."""
    losses = {}
    models = {}
    for kernels in ("torch", "triton"):
        model = _tiny(kernels, n_layers=2).to(device)
        opt = model.configure_optimizer(lr=1e-3, weight_decay=0.01)
        g = torch.Generator().manual_seed(1)
        run = []
        for _ in range(3):
            idx = torch.randint(0, 211, (2, 17), generator=g).to(device)
            _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[kernels], models[kernels] = run, model
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4)
    # a model trained with one setting loads and gives the same outputs with the other
    other = _tiny("torch", n_layers=2).to(device)
    other.load_state_dict(models["triton"].state_dict())
    idx = torch.randint(0, 211, (1, 12), device=device)
    models["triton"].eval()
    other.eval()
    torch.testing.assert_close(other(idx), models["triton"](idx), atol=1e-4, rtol=1e-4)
    other.set_kernels("triton")
    torch.testing.assert_close(other(idx), models["triton"](idx), atol=1e-5, rtol=1e-5)


def test_tiny_gpt_compiles_fullgraph_around_the_kernels(device):
    """torch.compile(fullgraph=True) over the whole model: the fused ops are opaque custom ops, no graph break."""
    eager, model = _tiny("triton", n_layers=1).to(device), _tiny("triton", n_layers=1).to(device)
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, 211, (2, 12), device=device)
    with count_launches() as launched:
        _, loss = compiled(idx, idx, return_logits=False)
        loss.backward()
    assert launched["attention_fwd"] > 0 and launched["attention_bwd"] > 0 and launched["layer_norm_fwd"] > 0
    _, ref = eager(idx, idx, return_logits=False)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    grads = dict(model.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)
