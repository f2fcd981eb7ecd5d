"""LayerNorm and add+LayerNorm kernels: forward and every gradient against the float64 oracle, launch counts,
custom-op registration, torch.compile, layouts and input errors.

Shapes stay small (the CPU interpreter is slow) but odd: widths 64, 257, 768, 1600, 4096, single rows, and row
counts that give each persistent program several tiles (the interpreter path runs 3 programs).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gptkernels import ops
from gptkernels.ops import _backend
from gptkernels.ops.layer_norm import _launch

from .tolerances import assert_close_to_oracle

SHAPES = [(1, 1, 64), (5, 7, 257), (2, 5, 768), (1, 1600), (2, 4096), (70, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot here, so bf16 is exact in the interpreter


def _inputs(shape, dtype, device, bias=True):
    n = shape[-1]
    x = torch.randn(shape, device=device) * 2.0 + 0.5
    w = 1.0 + 0.2 * torch.randn(n, device=device)
    b = 0.2 * torch.randn(n, device=device) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, w, b)]


def _run(fn, inputs, grads):
    """Outputs and input gradients (None for None inputs) of ``fn(*inputs)`` given upstream ``grads``."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def _check_against_oracle(fn_kernel, fn_ref, inputs, grads, dtype, out_names, in_names):
    k_out, k_grad = _run(fn_kernel, inputs, grads)
    r_out, r_grad = _run(fn_ref, inputs, grads)
    o_out, o_grad = _run(fn_ref, [t.double() if t is not None else None for t in inputs], [g.double() for g in grads])
    for name, k, r, o in zip(out_names, k_out, r_out, o_out):
        assert k.dtype == r.dtype, f"{name}: dtype {k.dtype} != reference {r.dtype}"
        assert_close_to_oracle(k, r, o, dtype, name)
    for name, k, r, o in zip(in_names, k_grad, r_grad, o_grad):
        if o is None:  # a None input, or one the used outputs do not depend on
            assert k is None or not k.any(), f"{name}: nonzero gradient where the reference has none"
            continue
        assert k.dtype == r.dtype, f"d{name}: dtype {k.dtype} != reference {r.dtype}"
        assert_close_to_oracle(k, r, o, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_oracle(shape, dtype, device):
    x, w, b = _inputs(shape, dtype, device)
    grads = [torch.randn(shape, device=device, dtype=dtype)]
    with ops.count_launches() as c:
        _check_against_oracle(
            lambda x, w, b: ops.layer_norm(x, w, b, backend="triton"),
            ops.layer_norm_reference,
            [x, w, b],
            grads,
            dtype,
            ["y"],
            ["x", "weight", "bias"],
        )
    assert c["layer_norm_fwd"] == 1 and c["layer_norm_bwd"] == 1, dict(c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 257), (1, 1600)], ids=str)
def test_layer_norm_without_bias(shape, dtype, device):
    x, w, _ = _inputs(shape, dtype, device, bias=False)
    grads = [torch.randn(shape, device=device, dtype=dtype)]
    eps = 1e-3  # not the default: eps must reach the kernel
    with ops.count_launches() as c:
        _check_against_oracle(
            lambda x, w: ops.layer_norm(x, w, None, eps, backend="triton"),
            lambda x, w: ops.layer_norm_reference(x, w, None, eps),
            [x, w],
            grads,
            dtype,
            ["y"],
            ["x", "weight"],
        )
    assert c["layer_norm_fwd"] == 1 and c["layer_norm_bwd"] == 1, dict(c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_layer_norm_matches_oracle(shape, dtype, device):
    x, w, b = _inputs(shape, dtype, device)
    r = torch.randn(shape, device=device, dtype=dtype)
    # Gradients reach s from the caller (the residual stream) and through the LayerNorm.
    grads = [torch.randn(shape, device=device, dtype=dtype) for _ in range(2)]
    with ops.count_launches() as c:
        _check_against_oracle(
            lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, backend="triton"),
            ops.add_layer_norm_reference,
            [x, r, w, b],
            grads,
            dtype,
            ["s", "y"],
            ["x", "residual", "weight", "bias"],
        )
    assert c["add_layer_norm_fwd"] == 1 and c["add_layer_norm_bwd"] == 1, dict(c)


@pytest.mark.parametrize("used", ["s", "y"])
def test_add_layer_norm_one_output_used(used, device):
    """Only one output in the loss: the other's gradient is absent, not garbage."""
    dtype = torch.float32
    x, w, _ = _inputs((3, 5, 96), dtype, device, bias=False)
    r = torch.randn_like(x)
    g = torch.randn_like(x)
    idx = 0 if used == "s" else 1
    with ops.count_launches() as c:
        _check_against_oracle(
            lambda x, r, w: ops.add_layer_norm(x, r, w, None, backend="triton")[idx],
            lambda x, r, w: ops.add_layer_norm_reference(x, r, w, None)[idx],
            [x, r, w],
            [g],
            dtype,
            [used],
            ["x", "residual", "weight"],
        )
    assert c["add_layer_norm_fwd"] == 1 and c["add_layer_norm_bwd"] == 1, dict(c)


def test_mixed_dtypes(device):
    """fp32 parameters with fp16 activations (autocast), and an fp16 branch added to an fp32 residual stream."""
    x, w, b = _inputs((2, 3, 257), torch.float16, device)
    w32, b32 = w.float(), b.float()
    g = torch.randn_like(x)
    y = ops.layer_norm(x, w32, b32, backend="triton")
    assert y.dtype == torch.float16
    k_out, (dx, dw, db) = _run(lambda x, w, b: ops.layer_norm(x, w, b, backend="triton"), [x, w32, b32], [g])
    assert dx.dtype == torch.float16 and dw.dtype == torch.float32 and db.dtype == torch.float32
    r_out, r_grad = _run(ops.layer_norm_reference, [x, w, b], [g])  # the fp16 computation
    o_out, o_grad = _run(ops.layer_norm_reference, [x.double(), w.double(), b.double()], [g.double()])
    assert_close_to_oracle(k_out[0], r_out[0], o_out[0], torch.float16, "y")
    for name, k, r, o in zip(["x", "weight", "bias"], (dx, dw, db), r_grad, o_grad):
        assert_close_to_oracle(k, r, o, torch.float16, f"d{name}")

    res = torch.randn(x.shape, device=device)  # fp32 residual stream
    gs, gy = torch.randn_like(res), torch.randn_like(res)
    k_out, k_grad = _run(lambda x, r: ops.add_layer_norm(x, r, w32, b32, backend="triton"), [x, res], [gs, gy])
    assert k_out[0].dtype == torch.float32 and k_grad[0].dtype == torch.float16 and k_grad[1].dtype == torch.float32
    o_out, o_grad = _run(
        lambda x, r: ops.add_layer_norm_reference(x, r, w32.double(), b32.double()),
        [x.double(), res.double()],
        [gs.double(), gy.double()],
    )
    r_out, r_grad = _run(lambda x, r: ops.add_layer_norm_reference(x, r, w32, b32), [x, res], [gs, gy])
    for name, k, r, o in zip(["s", "y"], k_out, r_out, o_out):
        assert_close_to_oracle(k, r, o, torch.float32, name)
    assert_close_to_oracle(k_grad[1], r_grad[1], o_grad[1], torch.float32, "dresidual")
    assert_close_to_oracle(k_grad[0], r_grad[0], o_grad[0], torch.float16, "dx")


def test_non_contiguous_inputs(device):
    """A transposed x (last-dim stride != 1), a row-strided slice, and transposed / broadcast gradients."""
    n = 257
    _, w, b = _inputs((n,), torch.float32, device)
    x_t = torch.randn(n, 6, device=device).t()  # (6, n) with stride (1, 6)
    wide = torch.randn(4, 2, n + 31, device=device)
    x_slice = wide[..., 5 : 5 + n]  # unit last stride, rows 288 apart
    r_t = torch.randn(n, 6, device=device).t()
    g_t = torch.randn(n, 6, device=device).t()
    with ops.count_launches() as c:
        for x in (x_t, x_slice):
            _check_against_oracle(
                lambda x, w, b: ops.layer_norm(x, w, b, backend="triton"),
                ops.layer_norm_reference,
                [x, w, b],
                [torch.randn(x.shape, device=device)],
                torch.float32,
                ["y"],
                ["x", "weight", "bias"],
            )
        _check_against_oracle(
            lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, backend="triton"),
            ops.add_layer_norm_reference,
            [x_t, r_t, w, b],
            [g_t, torch.ones(1, n, device=device).expand(6, n)],  # stride-0 rows, as from a sum()
            torch.float32,
            ["s", "y"],
            ["x", "residual", "weight", "bias"],
        )
        # A non-contiguous weight is copied, not misread.
        w_strided = torch.stack([w, -w], dim=1)[:, 0]
        y = ops.layer_norm(x_t, w_strided, b, backend="triton")
        assert_close_to_oracle(
            y,
            ops.layer_norm_reference(x_t, w, b),
            ops.layer_norm_reference(x_t.double(), w.double(), b.double()),
            torch.float32,
        )
    assert c["layer_norm_fwd"] == 3 and c["layer_norm_bwd"] == 2 and c["add_layer_norm_bwd"] == 1, dict(c)


def test_empty_rows(device):
    x = torch.empty(0, 5, 64, device=device)
    w = torch.ones(64, device=device, requires_grad=True)
    y = ops.layer_norm(x, w, None, backend="triton")
    assert y.shape == x.shape
    s, y = ops.add_layer_norm(x, x, w, None, backend="triton")
    assert s.shape == y.shape == x.shape


def test_opcheck(device):
    n = 96
    x, w, b = (t.requires_grad_() for t in _inputs((6, n), torch.float32, device))
    r = torch.randn(6, n, device=device, requires_grad=True)
    ln = torch.ops.gptkernels
    torch.library.opcheck(ln.layer_norm_fwd.default, (x, w, b, 1e-5))
    torch.library.opcheck(ln.layer_norm_fwd.default, (x, w, None, 1e-5))
    torch.library.opcheck(ln.add_layer_norm_fwd.default, (x, r, w, b, 1e-5))
    _, stats = ln.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    dy = torch.randn(6, n, device=device)
    torch.library.opcheck(ln.layer_norm_bwd.default, (dy, x.detach(), w.detach(), stats, None, True))
    torch.library.opcheck(ln.layer_norm_bwd.default, (dy, x.detach(), w.detach(), stats, dy.clone(), False))


def test_torch_compile_fullgraph(device):
    def block(x, r, w, b):
        s, h = ops.add_layer_norm(x, r, w, b, backend="triton")
        return s + ops.layer_norm(h.relu(), w, None, backend="triton")

    compiled = torch.compile(block, fullgraph=True)
    inputs = [torch.randn(2, 3, 64, device=device) for _ in range(2)] + _inputs((64,), torch.float32, device)[:2]
    g = torch.randn(2, 3, 64, device=device)
    with ops.count_launches() as c:
        c_out, c_grad = _run(compiled, inputs, [g])
    assert c["add_layer_norm_fwd"] == 1 and c["layer_norm_fwd"] == 1, dict(c)
    assert c["add_layer_norm_bwd"] == 1 and c["layer_norm_bwd"] == 1, dict(c)
    e_out, e_grad = _run(block, inputs, [g])
    torch.testing.assert_close(c_out[0], e_out[0])
    for a, e in zip(c_grad, e_grad):
        torch.testing.assert_close(a, e)


def test_torch_backend_launches_nothing(device):
    x, w, b = _inputs((2, 3, 64), torch.float32, device)
    with ops.count_launches() as c:
        y = ops.layer_norm(x, w, b, backend="torch")
        s, h = ops.add_layer_norm(x, x, w, b, backend="torch")
    assert sum(c.values()) == 0, dict(c)
    torch.testing.assert_close(y, ops.layer_norm_reference(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(h, ops.add_layer_norm_reference(x, x, w, b)[1], rtol=0, atol=0)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    """Without the interpreter, CPU tensors cannot run the kernel: "triton" fails loudly, "auto" falls back."""
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    x, w, b = _inputs((2, 64), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="layer_norm.*interpreter"):
        ops.layer_norm(x, w, b, backend="triton")
    with pytest.raises(RuntimeError, match="add_layer_norm.*interpreter"):
        ops.add_layer_norm(x, x, w, b, backend="triton")
    with ops.count_launches() as c:
        y = ops.layer_norm(x, w, b, backend="auto")
    assert sum(c.values()) == 0
    torch.testing.assert_close(y, ops.layer_norm_reference(x, w, b))


def test_bad_inputs(device):
    x, w, b = _inputs((2, 3, 64), torch.float32, device)
    ln = lambda *a, **k: ops.layer_norm(*a, **k, backend="triton")  # noqa: E731
    with pytest.raises(TypeError, match="x"):
        ln(x.double(), w, b)
    with pytest.raises(TypeError, match="x"):
        ln(x.to(torch.int32), w, b)
    with pytest.raises(TypeError, match="weight"):
        ln(x, w.to(torch.int64), b)
    with pytest.raises(ValueError, match="weight"):
        ln(x, w[:63], b)
    with pytest.raises(ValueError, match="weight"):
        ln(x, w.view(8, 8), b)
    with pytest.raises(ValueError, match="bias"):
        ln(x, w, torch.zeros(65, device=device))
    with pytest.raises(ValueError, match="weight"):
        ln(x, w.to("meta"), b)  # a device other than x's
    with pytest.raises(TypeError, match="weight"):
        ln(x, w.tolist(), b)
    with pytest.raises(ValueError, match="eps"):
        ln(x, w, b, -1.0)
    with pytest.raises(ValueError, match="x"):
        ln(torch.empty(4, 0, device=device), w[:0], None)
    with pytest.raises(ValueError, match="residual"):
        ops.add_layer_norm(x, x[:1], w, b, backend="triton")
    with pytest.raises(TypeError, match="residual"):
        ops.add_layer_norm(x, x.to(torch.int32), w, b, backend="triton")
    with pytest.raises(ValueError, match="bias"):
        ops.add_layer_norm(x, x, w, b[:10], backend="triton")


def _reference_with_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("case", ["wide_rows", "float64"])
def test_auto_falls_back_to_the_reference_where_the_kernel_cannot_run(case, device, monkeypatch):
    """Rows wider than the kernel holds, or a dtype it does not take: "auto" runs the PyTorch reference (one
    warning per op and reason), "triton" refuses with a one-line error naming the problem."""
    monkeypatch.setattr(_backend, "_noticed", set())
    shape, dtype = ((2, 8193), torch.float32) if case == "wide_rows" else ((3, 64), torch.float64)
    x, w, b = _inputs(shape, dtype, device)
    match = "wider than the kernel's limit of 8192" if case == "wide_rows" else "dtype torch.float64"
    for op, ref in [
        (lambda x, w, b, **k: ops.layer_norm(x, w, b, **k), ops.layer_norm_reference),
        (
            lambda x, w, b, **k: ops.add_layer_norm(x, x, w, b, **k)[1],
            lambda x, w, b: ops.add_layer_norm_reference(x, x, w, b)[1],
        ),
    ]:
        with ops.count_launches() as c, pytest.warns(UserWarning, match=match):
            out, grads = _reference_with_grads(lambda *t, op=op: op(*t, backend="auto"), [x, w, b])
        assert sum(c.values()) == 0, dict(c)
        ref_out, ref_grads = _reference_with_grads(ref, [x, w, b])
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per reason: the second call is silent
            op(x, w, b, backend="auto")
        with pytest.raises(TypeError if case == "float64" else ValueError, match="x" if case == "float64" else match):
            op(x, w, b, backend="triton")


def test_backward_pipelines_only_when_programs_walk_several_tiles():
    cpu = torch.device("cpu")  # the interpreter's grid: 3 programs at most
    assert _launch(768, 4096, cpu, True)[4] == 2
    assert _launch(768, 1, cpu, True)[4] == 1  # one tile: nothing to overlap
    assert _launch(8192, 4096, cpu, True)[4] == 1  # 2 stages of 8192-column tiles exceed sm_80's shared memory
    assert all(_launch(n, 4096, cpu, bwd)[2] <= 16 for n in (1, 64, 768, 4096, 8192) for bwd in (False, True))
