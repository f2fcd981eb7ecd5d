"""Bias + tanh-GELU kernels: forward, dx and dbias against the float64 oracle, launch counts, custom-op
registration, torch.compile, layouts, extreme values and input errors.

(5, 7, 257) gives several row tiles and a ragged column tile, so the dbias partial sums are reduced over tiles.
"""

from __future__ import annotations

import pytest
import torch

from gptkernels import ops
from gptkernels.ops import _backend

from .tolerances import assert_close_to_oracle

SHAPES = [(1, 1, 64), (5, 7, 257), (2, 5, 768), (1, 1600), (2, 4096)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot here, so bf16 is exact in the interpreter


def _inputs(shape, dtype, device, bias=True):
    x = 2.0 * torch.randn(shape, device=device)  # covers GELU's curved region and both tails
    b = torch.randn(shape[-1], device=device) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, b)]


def _run(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _check_against_oracle(fn_kernel, inputs, grad, dtype):
    k_out, k_grad = _run(fn_kernel, inputs, grad)
    r_out, r_grad = _run(ops.bias_gelu_reference, inputs, grad)
    o_out, o_grad = _run(
        ops.bias_gelu_reference, [t.double() if t is not None else None for t in inputs], grad.double()
    )
    assert k_out.dtype == inputs[0].dtype
    assert_close_to_oracle(k_out, r_out, o_out, dtype, "y")
    for name, k, r, o in zip(["x", "bias"], k_grad, r_grad, o_grad):
        if o is None:
            assert k is None, f"{name}: got a gradient for a None input"
            continue
        assert k.dtype == r.dtype, f"d{name}: dtype {k.dtype} != reference {r.dtype}"
        assert_close_to_oracle(k, r, o, dtype, f"d{name}")


def _kernel(x, b):
    return ops.bias_gelu(x, b, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_gelu_matches_oracle(shape, dtype, device):
    inputs = _inputs(shape, dtype, device)
    with ops.count_launches() as c:
        _check_against_oracle(_kernel, inputs, torch.randn(shape, device=device, dtype=dtype), dtype)
    assert c["bias_gelu_fwd"] == 1 and c["bias_gelu_bwd"] == 1, dict(c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 257), (1, 1600)], ids=str)
def test_gelu_without_bias(shape, dtype, device):
    inputs = _inputs(shape, dtype, device, bias=False)
    with ops.count_launches() as c:
        _check_against_oracle(_kernel, inputs, torch.randn(shape, device=device, dtype=dtype), dtype)
    assert c["bias_gelu_fwd"] == 1 and c["bias_gelu_bwd"] == 1, dict(c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tails(dtype, device):
    x = torch.tensor([[-300.0, -30.0, -9.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 9.0, 30.0, 300.0]], device=device, dtype=dtype)
    b = torch.zeros(x.shape[-1], device=device, dtype=dtype)
    _check_against_oracle(_kernel, [x, b], torch.randn_like(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_values(dtype, device):
    """Far tails are exactly z (derivative 1) and 0 (derivative 0): no NaN from z**3 or exp overflowing."""
    big = 6e4 if dtype == torch.float16 else 1e30
    x = torch.tensor([[-big, -1e3, -25.0, 25.0, 1e3, big]], device=device, dtype=dtype)
    g = torch.full_like(x, 3.0)
    y, (dx, db) = _run(_kernel, [x, torch.zeros(x.shape[-1], device=device, dtype=dtype)], g)
    positive = x > 0
    torch.testing.assert_close(y, torch.where(positive, x, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(dx, torch.where(positive, g, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(db, dx[0], rtol=0, atol=0)


def test_nan_propagates(device):
    x = torch.tensor([[float("nan"), 1.0]], device=device)
    y, (dx,) = _run(lambda x: _kernel(x, None), [x], torch.ones_like(x))
    assert y[0, 0].isnan() and dx[0, 0].isnan() and y[0, 1].isfinite() and dx[0, 1].isfinite()


def test_mixed_dtypes(device):
    """An fp32 bias (parameter) with fp16 activations (autocast): output and dx in fp16, dbias in fp32."""
    x, b = _inputs((5, 7, 257), torch.float16, device)
    g = torch.randn_like(x)
    k_out, (dx, db) = _run(_kernel, [x, b.float()], g)
    assert k_out.dtype == dx.dtype == torch.float16 and db.dtype == torch.float32
    assert ops.bias_gelu_reference(x, b.float()).dtype == torch.float16  # both backends keep x's dtype
    r_out, r_grad = _run(ops.bias_gelu_reference, [x, b], g)  # the fp16 computation
    o_out, o_grad = _run(ops.bias_gelu_reference, [x.double(), b.double()], g.double())
    assert_close_to_oracle(k_out, r_out, o_out, torch.float16, "y")
    assert_close_to_oracle(dx, r_grad[0], o_grad[0], torch.float16, "dx")
    assert_close_to_oracle(db, r_grad[1], o_grad[1], torch.float16, "dbias")


def test_non_contiguous_inputs(device):
    """A transposed x (last-dim stride != 1), a row-strided slice, a strided bias, transposed/broadcast grads."""
    n = 257
    x_t = torch.randn(n, 6, device=device).t()
    x_slice = torch.randn(3, 2, n + 40, device=device)[..., 7 : 7 + n]
    b_strided = torch.randn(n, 2, device=device)[:, 1]
    with ops.count_launches() as c:
        _check_against_oracle(_kernel, [x_t, b_strided], torch.randn(n, 6, device=device).t(), torch.float32)
        _check_against_oracle(
            _kernel, [x_slice, b_strided], torch.ones(1, 1, n, device=device).expand(3, 2, n), torch.float32
        )
    assert c["bias_gelu_fwd"] == 2 and c["bias_gelu_bwd"] == 2, dict(c)


def test_empty_rows(device):
    x = torch.empty(0, 3, 64, device=device, requires_grad=True)
    b = torch.zeros(64, device=device, requires_grad=True)
    y = ops.bias_gelu(x, b, backend="triton")
    y.sum().backward()
    assert y.shape == x.shape and b.grad is not None and not b.grad.any()


def test_opcheck(device):
    x, b = (t.requires_grad_() for t in _inputs((6, 96), torch.float32, device))
    dy = torch.randn(6, 96, device=device)
    ops_ = torch.ops.gptkernels
    torch.library.opcheck(ops_.bias_gelu_fwd.default, (x, b))
    torch.library.opcheck(ops_.bias_gelu_fwd.default, (x, None))
    torch.library.opcheck(ops_.bias_gelu_bwd.default, (dy, x.detach(), b.detach()))
    torch.library.opcheck(ops_.bias_gelu_bwd.default, (dy, x.detach(), None))


def test_torch_compile_fullgraph(device):
    def mlp_act(h, b):
        return ops.bias_gelu(h * 2.0, b, backend="triton").square()

    compiled = torch.compile(mlp_act, fullgraph=True)
    inputs = _inputs((2, 3, 96), torch.float32, device)
    g = torch.randn(2, 3, 96, device=device)
    with ops.count_launches() as c:
        c_out, c_grad = _run(compiled, inputs, g)
    assert c["bias_gelu_fwd"] == 1 and c["bias_gelu_bwd"] == 1, dict(c)
    e_out, e_grad = _run(mlp_act, inputs, g)
    torch.testing.assert_close(c_out, e_out)
    for a, e in zip(c_grad, e_grad):
        torch.testing.assert_close(a, e)


def test_torch_backend_launches_nothing(device):
    x, b = _inputs((2, 3, 64), torch.float32, device)
    with ops.count_launches() as c:
        y = ops.bias_gelu(x, b, backend="torch")
    assert sum(c.values()) == 0, dict(c)
    torch.testing.assert_close(y, ops.bias_gelu_reference(x, b), rtol=0, atol=0)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    """Without the interpreter, CPU tensors cannot run the kernel: "triton" fails loudly, "auto" falls back."""
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    x, b = _inputs((2, 64), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="bias_gelu.*interpreter"):
        ops.bias_gelu(x, b, backend="triton")
    with ops.count_launches() as c:
        y = ops.bias_gelu(x, b, backend="auto")
    assert sum(c.values()) == 0
    torch.testing.assert_close(y, ops.bias_gelu_reference(x, b))


def test_bad_inputs(device):
    x, b = _inputs((2, 3, 64), torch.float32, device)
    with pytest.raises(TypeError, match="x"):
        _kernel(x.double(), b)
    with pytest.raises(TypeError, match="x"):
        _kernel(x.to(torch.int64), b)
    with pytest.raises(TypeError, match="bias"):
        _kernel(x, b.to(torch.int32))
    with pytest.raises(ValueError, match="bias"):
        _kernel(x, b[:63])
    with pytest.raises(ValueError, match="bias"):
        _kernel(x, b.view(8, 8))
    with pytest.raises(ValueError, match="bias"):
        _kernel(x, b.to("meta"))  # a device other than x's
    with pytest.raises(TypeError, match="bias"):
        _kernel(x, b.tolist())
    with pytest.raises(ValueError, match="x"):
        _kernel(torch.tensor(1.0, device=device), None)


def test_auto_falls_back_to_the_reference_for_float64(device, monkeypatch):
    """A dtype the kernel does not take: "auto" runs the PyTorch reference (one warning), "triton" refuses."""
    monkeypatch.setattr(_backend, "_noticed", set())
    x, b = _inputs((3, 64), torch.float64, device)
    with ops.count_launches() as c, pytest.warns(UserWarning, match="dtype torch.float64"):
        y = ops.bias_gelu(x, b, backend="auto")
    assert sum(c.values()) == 0, dict(c)
    torch.testing.assert_close(y, ops.bias_gelu_reference(x, b), rtol=0, atol=0)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        _kernel(x, b)
