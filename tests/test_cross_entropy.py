"""Fused LM head + cross-entropy: loss and both gradients against a float64 oracle, chunking, edge cases.

Gradients are taken of ``g * loss`` with ``g`` = the number of counted targets: that makes them O(1) (so the
tolerance floor is not loose against them) and checks that the backward scales by the incoming gradient.
"""

import pytest
import torch
import torch.nn.functional as F

import gptkernels.ops as ops
from gptkernels import nn as gnn
from gptkernels.ops import cross_entropy as ce

from .tolerances import assert_close_to_oracle

KERNEL = "cross_entropy_fwd_bwd"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(n, v, c, dtype, device, ignore_index=-100, ignore_every=3):
    hidden = torch.randn(n, c, device=device).to(dtype)
    weight = (torch.randn(v, c, device=device) * 2 * c**-0.5).to(dtype)  # logits of std ~2
    targets = torch.randint(0, v, (n,), device=device)
    targets[1::ignore_every] = ignore_index
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, g, grads=(True, True), **kwargs):
    """(loss, grad_hidden, grad_weight) of ``fn``; a gradient is None where its input is frozen."""
    h = hidden.detach().clone().requires_grad_(grads[0])
    w = weight.detach().clone().requires_grad_(grads[1])
    loss = fn(h, w, targets, **kwargs)
    if grads[0] or grads[1]:
        loss.backward(torch.tensor(g, dtype=loss.dtype, device=loss.device))
    return loss.detach(), h.grad, w.grad


def _oracle(hidden, weight, targets, g, ignore_index=-100):
    def f64(h, w, t, ignore_index=-100):
        return F.cross_entropy(h.double() @ w.double().T, t, ignore_index=ignore_index)

    return _run(f64, hidden.double(), weight.double(), targets, g, ignore_index=ignore_index)


def _n_counted(targets, ignore_index=-100):
    return float((targets != ignore_index).sum())


def _check_all(kernel, reference, oracle, dtype):
    for name, k, r, o in zip(("loss", "grad_hidden", "grad_weight"), kernel, reference, oracle, strict=True):
        if o is None:
            assert k is None, f"{name}: a gradient for a frozen input"
            continue
        assert k.dtype == (torch.float32 if name == "loss" else dtype), f"{name}: dtype {k.dtype}"
        assert_close_to_oracle(k, r, o, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, v, c, chunk_rows", [(1, 257, 16, 0), (7, 1000, 24, 3), (33, 257, 40, 8)])
def test_matches_oracle(n, v, c, chunk_rows, dtype, device, monkeypatch):
    # bf16 works in the interpreter here: the kernel has no tl.dot, and the matmuls are PyTorch's.
    monkeypatch.setattr(ce, "_CHUNK_ROWS_OVERRIDE", chunk_rows)
    hidden, weight, targets = _inputs(n, v, c, dtype, device)
    g = _n_counted(targets)
    with ops.count_launches() as launches:
        kernel = _run(ops.linear_cross_entropy, hidden, weight, targets, g, backend="triton")
    expected_chunks = -(-n // (chunk_rows or n))
    assert launches[KERNEL] == expected_chunks
    reference = _run(ops.linear_cross_entropy_reference, hidden, weight, targets, g)
    _check_all(kernel, reference, _oracle(hidden, weight, targets, g), dtype)


def test_chunks_agree_with_one_chunk(device, monkeypatch):
    hidden, weight, targets = _inputs(33, 257, 24, torch.float32, device)
    results = {}
    for rows in (0, 1, 5, 16):
        monkeypatch.setattr(ce, "_CHUNK_ROWS_OVERRIDE", rows)
        with ops.count_launches() as launches:
            results[rows] = _run(ops.linear_cross_entropy, hidden, weight, targets, 1.0, backend="triton")
        assert launches[KERNEL] == (-(-33 // rows) if rows else 1)
    for rows in (1, 5, 16):
        for a, b in zip(results[0], results[rows], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunk_rows_choice():
    # 4096 rows (the fp32 grad_weight accumulation compute-bound), capped by the logits buffer's byte budget,
    # at most N, >= 1.
    assert ce._chunk_rows(8192, 50257, 2, 0) == 4096  # GPT-2 bf16/fp16: 412 MB of logits
    assert ce._chunk_rows(8192, 50257, 4, 0) == 2048  # fp32: the budget halves it
    assert ce._chunk_rows(200_000, 50257, 2, 0) == 4096
    assert ce._chunk_rows(8192, 256_000, 2, 0) == 1024  # a wide vocabulary stays within the budget
    for v, e in [(50257, 2), (50257, 4), (256_000, 4), (10**7, 4)]:
        assert ce._chunk_rows(10**6, v, e, 0) * ce._padded_cols(v) * e <= ce._MAX_CHUNK_BYTES
    assert ce._chunk_rows(7, 50257, 2, 0) == 7
    assert ce._chunk_rows(7, 50257, 2, 3) == 3
    assert ce._chunk_rows(7, 50257, 2, 100) == 7
    assert ce._chunk_rows(0, 50257, 2, 0) == 1


def test_logits_rows_are_16_byte_aligned(device, monkeypatch):
    # V = 257 is odd: the buffer's rows are padded so that each starts 16-byte aligned (vectorised loads).
    seen = []
    launch = ce._cross_entropy_rows
    monkeypatch.setattr(ce, "_cross_entropy_rows", lambda logits, *a: (seen.append(logits), launch(logits, *a)))
    monkeypatch.setattr(ce, "_CHUNK_ROWS_OVERRIDE", 3)
    for dtype in (torch.float32, torch.float16):
        hidden, weight, targets = _inputs(7, 257, 16, dtype, device)
        _run(ops.linear_cross_entropy, hidden, weight, targets, 1.0, backend="triton")
    monkeypatch.setattr(ce, "_CHUNK_ROWS_OVERRIDE", 0)
    for dtype in (torch.float32, torch.float16):  # one chunk, no gradient: the loss-only path's own buffer
        hidden, weight, targets = _inputs(7, 257, 16, dtype, device)
        with torch.no_grad():
            ops.linear_cross_entropy(hidden, weight, targets, backend="triton")
    assert len(seen) == 8
    for logits in seen:
        assert logits.stride(1) == 1 and logits.stride(0) % 16 == 0 and logits.stride(0) >= 257
        assert logits.data_ptr() % 16 == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_grad_scaler_loss_scale_keeps_small_gradients(dtype, device):
    """A GradScaler-sized incoming gradient (2**16): the gradients must be as accurate as eager PyTorch's.

    Eager multiplies d(loss)/d(logits) by the loss scale before casting it to fp16, so p / n_valid * 2**16
    survives for tiny probabilities p. Dividing by n_valid in fp16 before the scale is known flushes every
    entry below ~6e-8 to zero (most of the LM-head gradient of the unlikely classes).
    """
    n, v, c = 64, 1000, 32
    hidden = torch.randn(n, c, device=device).to(dtype)
    weight = (torch.randn(v, c, device=device) * 5 * c**-0.5).to(dtype)  # logits of std ~5: many p < 1e-6
    targets = torch.randint(0, v, (n,), device=device)
    g = 2.0**16
    kernel = _run(ops.linear_cross_entropy, hidden, weight, targets, g, backend="triton")
    reference = _run(ops.linear_cross_entropy_reference, hidden, weight, targets, g)  # eager, fp32 upcast
    oracle = _oracle(hidden, weight, targets, g)
    for name, k, r, o in zip(("grad_hidden", "grad_weight"), kernel[1:], reference[1:], oracle[1:], strict=True):
        assert k.dtype == dtype and torch.isfinite(k).all(), name
        flushed = ((k == 0) & (o != 0)).sum().item()
        assert flushed <= ((r == 0) & (o != 0)).sum().item(), f"{name}: {flushed} entries flushed to 0"

        def off(t, o=o):  # the fraction of entries more than 1% off the oracle
            return ((t.double() - o).abs() > 1e-2 * o.abs()).double().mean().item()

        assert off(k) <= 1.5 * off(r) + 5e-3, f"{name}: {off(k):.3f} of entries off by > 1%, eager {off(r):.3f}"
        assert_close_to_oracle(k, r, o, dtype, name)


@pytest.mark.parametrize("ignore_index", [-1, 5])
def test_ignore_index(ignore_index, device, monkeypatch):
    # ignore_index=5 is also a valid class id: rows with target 5 must not count.
    monkeypatch.setattr(ce, "_CHUNK_ROWS_OVERRIDE", 4)
    hidden, weight, targets = _inputs(13, 257, 16, torch.float32, device, ignore_index=ignore_index, ignore_every=2)
    targets[0] = 5 if ignore_index != 5 else 6  # class 5 counted when it is not the ignore index
    g = _n_counted(targets, ignore_index)
    kernel = _run(ops.linear_cross_entropy, hidden, weight, targets, g, ignore_index=ignore_index, backend="triton")
    reference = _run(ops.linear_cross_entropy_reference, hidden, weight, targets, g, ignore_index=ignore_index)
    _check_all(kernel, reference, _oracle(hidden, weight, targets, g, ignore_index), torch.float32)
    ignored = targets == ignore_index
    assert ignored.any() and (kernel[1][ignored] == 0).all()


def test_all_targets_ignored_gives_nan_and_zero_grads_like_pytorch(device):
    hidden, weight, _ = _inputs(9, 257, 16, torch.float32, device)
    targets = torch.full((9,), -100, device=device)
    loss, gh, gw = _run(ops.linear_cross_entropy, hidden, weight, targets, 1.0, backend="triton")
    ref_loss, ref_gh, ref_gw = _run(ops.linear_cross_entropy_reference, hidden, weight, targets, 1.0)
    assert torch.isnan(ref_loss) and torch.isnan(loss)
    assert (ref_gh == 0).all() and (gh == 0).all()
    assert (ref_gw == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("grads", [(True, False), (False, True)], ids=["weight_frozen", "hidden_frozen"])
def test_only_some_inputs_require_grad(grads, device, monkeypatch):
    monkeypatch.setattr(ce, "_CHUNK_ROWS_OVERRIDE", 3)
    hidden, weight, targets = _inputs(7, 1000, 24, torch.float32, device)
    g = _n_counted(targets)
    with ops.count_launches() as launches:
        kernel = _run(ops.linear_cross_entropy, hidden, weight, targets, g, grads=grads, backend="triton")
    assert launches[KERNEL] == 3
    reference = _run(ops.linear_cross_entropy_reference, hidden, weight, targets, g, grads=grads)
    oracle = _run(
        lambda h, w, t: F.cross_entropy(h @ w.T, t), hidden.double(), weight.double(), targets, g, grads=grads
    )
    _check_all(kernel, reference, oracle, torch.float32)


@pytest.mark.parametrize("chunk_rows", [0, 5], ids=["one-chunk", "chunks-of-5"])
def test_no_grad_loss_only(chunk_rows, device, monkeypatch):
    monkeypatch.setattr(ce, "_CHUNK_ROWS_OVERRIDE", chunk_rows)
    hidden, weight, targets = _inputs(33, 257, 16, torch.float16, device)
    with torch.no_grad(), ops.count_launches() as launches:
        loss = ops.linear_cross_entropy(hidden, weight, targets, backend="triton")
    assert launches[KERNEL] == (1 if chunk_rows == 0 else 7) and loss.grad_fn is None
    reference = ops.linear_cross_entropy_reference(hidden, weight, targets)
    oracle = F.cross_entropy(hidden.double() @ weight.double().T, targets)
    assert_close_to_oracle(loss, reference, oracle, torch.float16, "loss")


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_loss_takes_in_place_ops(grad, device):
    # Gradient accumulation often scales the loss in place; the loss must be a tensor of its own (autograd
    # refuses in-place ops on a view made inside a custom Function).
    hidden, weight, targets = _inputs(9, 257, 16, torch.float32, device)
    hidden.requires_grad_(grad)
    loss = ops.linear_cross_entropy(hidden, weight, targets, backend="triton")
    expected = ops.linear_cross_entropy_reference(hidden.detach(), weight, targets) / 4
    loss /= 4
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    if grad:
        loss.backward()
        h = hidden.detach().requires_grad_(True)
        (ops.linear_cross_entropy_reference(h, weight, targets) / 4).backward()
        torch.testing.assert_close(hidden.grad, h.grad, rtol=1e-4, atol=1e-6)


def test_autocast_casts_like_the_reference(device):
    # Under autocast the reference's matmul runs in the autocast dtype; the fused op casts both inputs to it.
    dtype = torch.bfloat16
    hidden, weight, targets = _inputs(7, 257, 24, torch.float32, device)
    g = _n_counted(targets)

    def under_autocast(fn, **kwargs):
        def wrapped(h, w, t):
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
                return fn(h, w, t, **kwargs)

        return wrapped

    kernel = _run(under_autocast(ops.linear_cross_entropy, backend="triton"), hidden, weight, targets, g)
    reference = _run(under_autocast(ops.linear_cross_entropy_reference), hidden, weight, targets, g)
    oracle = _oracle(hidden, weight, targets, g)
    for name, k, r, o in zip(("loss", "grad_hidden", "grad_weight"), kernel, reference, oracle, strict=True):
        assert k.dtype == torch.float32  # fp32 parameters get fp32 gradients back through the cast
        assert_close_to_oracle(k, r, o, dtype, name)


def test_lm_head_loss_module_flattens_leading_dims(device):
    hidden, weight, targets = _inputs(2 * 5, 257, 16, torch.float32, device)
    g = _n_counted(targets)
    module = gnn.LMHeadLoss(kernels="triton")
    with ops.count_launches() as launches:
        kernel = _run(lambda h, w, t: module(h.view(2, 5, 16), w, t.view(2, 5)), hidden, weight, targets, g)
    assert launches[KERNEL] > 0
    reference = _run(ops.linear_cross_entropy_reference, hidden, weight, targets, g)
    _check_all(kernel, reference, _oracle(hidden, weight, targets, g), torch.float32)


def test_opcheck(device):
    hidden, weight, targets = _inputs(7, 257, 16, torch.float32, device)
    op = torch.ops.gptkernels.linear_cross_entropy_fwd.default
    for chunk_rows, need_h, need_w in [(3, True, True), (0, True, False), (2, False, True), (0, False, False)]:
        args = (
            hidden.clone().requires_grad_(need_h),
            weight.clone().requires_grad_(need_w),
            targets,
            -100,
            chunk_rows,
            need_h,
            need_w,
        )
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    hidden, weight, targets = _inputs(9, 257, 16, torch.float32, device)
    g = _n_counted(targets)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, t: ops.linear_cross_entropy(h, w, t, backend="triton") * 2.0, fullgraph=True)
    with ops.count_launches() as launches:
        kernel = _run(compiled, hidden, weight, targets, g)
    assert launches[KERNEL] > 0
    reference = _run(lambda h, w, t: ops.linear_cross_entropy_reference(h, w, t) * 2.0, hidden, weight, targets, g)
    oracle = _run(lambda h, w, t: F.cross_entropy(h @ w.T, t) * 2.0, hidden.double(), weight.double(), targets, g)
    _check_all(kernel, reference, oracle, torch.float32)


def test_bad_inputs(device):
    hidden, weight, targets = _inputs(7, 257, 16, torch.float32, device)

    def call(h=hidden, w=weight, t=targets, **kwargs):
        return ops.linear_cross_entropy(h, w, t, backend="triton", **kwargs)

    with pytest.raises(ValueError, match="weight must have shape"):
        call(w=weight[:, :8])
    with pytest.raises(ValueError, match="targets must have shape"):
        call(t=targets[:5])
    with pytest.raises(ValueError, match="hidden must have 2 dimensions"):
        call(h=hidden.view(1, 7, 16))
    with pytest.raises(ValueError, match="targets must have 1 dimensions"):
        call(t=targets.view(7, 1))
    with pytest.raises(TypeError, match="targets has dtype torch.int32"):
        call(t=targets.int())
    with pytest.raises(TypeError, match="weight has dtype torch.float16"):
        call(w=weight.half())
    with pytest.raises(TypeError, match="hidden has dtype torch.int64"):
        call(h=hidden.long())
    with pytest.raises(ValueError, match="weight is on meta"):
        call(w=weight.to("meta"))
    with pytest.raises(ValueError, match="targets is on meta"):
        call(t=targets.to("meta"))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        call(ignore_index=-100.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA a bad target is a device-side assert, fatal to the run")
@pytest.mark.parametrize("bad", [257, -3])
def test_out_of_range_target_raises(bad, device):
    hidden, weight, targets = _inputs(7, 257, 16, torch.float32, device)
    targets[4] = bad
    with pytest.raises(RuntimeError, match=r"targets must be in \[0, 257\)"):
        ops.linear_cross_entropy(hidden, weight, targets, backend="triton")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory (torch.cuda.max_memory_allocated) needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_gpt2_shape_memory_and_accuracy(dtype):
    n, c, v = 8192, 768, 50257
    hidden, weight, targets = _inputs(n, v, c, dtype, "cuda")
    g = _n_counted(targets)

    def peak(fn, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = _run(fn, hidden, weight, targets, g, **kwargs)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    kernel, fused_peak = peak(ops.linear_cross_entropy, backend="triton")
    reference, eager_peak = peak(ops.linear_cross_entropy_reference)
    assert fused_peak <= eager_peak / 4, f"fused peak {fused_peak / 2**20:.0f} MiB, eager {eager_peak / 2**20:.0f} MiB"
    # GPT-2's vocabulary, 2 chunks of 4096 rows (bf16) or 4 of 2048 (fp32); the float64 oracle fits an H100 (~15 GB).
    _check_all(kernel, reference, _oracle(hidden, weight, targets, g), dtype)


def test_auto_falls_back_to_the_reference_for_float64(device, monkeypatch):
    """A dtype the kernel does not take: "auto" runs the PyTorch reference (one warning), "triton" refuses."""
    monkeypatch.setattr(ops._backend, "_noticed", set())
    hidden, weight, targets = _inputs(7, 257, 16, torch.float64, device)
    with ops.count_launches() as launches, pytest.warns(UserWarning, match="dtype torch.float64"):
        kernel = _run(ops.linear_cross_entropy, hidden, weight, targets, 1.0, backend="auto")
    assert sum(launches.values()) == 0
    reference = _run(ops.linear_cross_entropy_reference, hidden, weight, targets, 1.0)
    for k, r in zip(kernel, reference, strict=True):
        torch.testing.assert_close(k, r, rtol=0, atol=0)
    with pytest.raises(TypeError, match="hidden has dtype torch.float64"):
        ops.linear_cross_entropy(hidden, weight, targets, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_uninitialised_memory_never_reaches_the_gradients(dtype, device, monkeypatch):
    """Every buffer the op allocates uninitialised must be fully written before it is read: here every
    torch.empty is NaN-filled (PyTorch's CPU bf16 GEMM reads the logits rows' padding, times zero)."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    hidden, weight, targets = _inputs(64, 1000, 32, dtype, device)  # a shape where the CPU GEMM over-reads
    monkeypatch.setattr(torch, "empty", nan_empty)
    loss, gh, gw = _run(ops.linear_cross_entropy, hidden, weight, targets, 1.0, backend="triton")
    for name, t in (("loss", loss), ("grad_hidden", gh), ("grad_weight", gw)):
        assert torch.isfinite(t).all(), name
