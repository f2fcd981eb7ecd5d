"""LayerNorm and residual-add + LayerNorm: PyTorch reference, Triton kernels, launchers, registration.

Both ops share one forward and one backward kernel (``HAS_RESIDUAL`` / ``HAS_DS`` switch the add on). Rows are
processed as (BLOCK_M, BLOCK_N) tiles, BLOCK_N covering the whole row, by a persistent grid: each program
walks tiles ``pid, pid + P, ...``. The backward accumulates its per-column sums for dweight/dbias in
registers and writes them to its own row of a (P, N) fp32 buffer, which is then summed over programs: no
atomics, and the result is deterministic.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _backend
from ._backend import autograd_function, call_op, eager, use_triton
from ._triton import tl, triton
from .utils import (
    FLOAT_DTYPES,
    cdiv,
    check_tensor,
    device_guard,
    max_registers,
    next_power_of_2,
    rows_2d,
    unsupported_dtype,
)

# ---------------------------------------------------------------------------------------------------------
# Reference (the CPU path and the test oracle)
# ---------------------------------------------------------------------------------------------------------


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


# ---------------------------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input rows, unit stride along N
    R,  # (M, N) residual rows (read only when HAS_RESIDUAL)
    S,  # (M, N) out: X + R in S's dtype (written only when HAS_RESIDUAL)
    Y,  # (M, N) out: normalised rows, contiguous
    W,  # (N,) scale
    B,  # (N,) shift (read only when HAS_BIAS)
    Mean,  # (M,) fp32 out: row means, saved for the backward
    Rstd,  # (M,) fp32 out: 1 / sqrt(var + eps), saved for the backward
    stride_x,  # elements between rows of X
    stride_r,  # elements between rows of R
    M,  # number of rows
    N,  # row width
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row is in registers
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # Loaded once per program, reused for every tile it processes.
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), n_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]  # M * N may exceed 2**31
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(S.dtype.element_ty)
            tl.store(S + rows64 * N + cols[None, :], s, mask=mask)
            # Normalise the rounded sum that is returned, exactly as LayerNorm(x + residual) would.
            x = s.to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y = y + b[None, :]
        tl.store(Y + rows64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Backward kernel
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) gradient of the normalised output, unit stride along N
    X,  # (M, N) the rows that were normalised (x, or s = x + residual)
    DS,  # (M, N) gradient flowing into s directly (read only when HAS_DS)
    W,  # (N,) scale
    Mean,  # (M,) fp32 from the forward
    Rstd,  # (M,) fp32 from the forward
    DX,  # (M, N) out: gradient of X (plus DS), contiguous
    DW_partial,  # (P, N) fp32 out: this program's sum over its rows of dy * xhat
    DB_partial,  # (P, N) fp32 out: this program's sum of dy (written only when HAS_BIAS)
    stride_dy,  # elements between rows of DY
    stride_x,  # elements between rows of X
    stride_ds,  # elements between rows of DS
    M,
    N,
    HAS_DS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # 2: the next tile's loads are issued (cp.async) while this one is computed
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in tl.range(pid, tl.cdiv(M, BLOCK_M), n_programs, num_stages=NUM_STAGES):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        # dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)); masked entries are 0 in every term.
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)
    tl.store(DW_partial + pid * N + cols, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_partial + pid * N + cols, db_acc, mask=col_ok)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The widest row the kernels hold in registers. At 16384 columns the backward needs 32 warps, whose 64
# registers per thread cannot hold x, dy, w and the two column accumulators: it spilled 200-336 bytes per
# thread (ptxas, sm_90), and the forward spilled too. Wider rows run the PyTorch reference under "auto".
_MAX_COLS = 8192


def _tile_config(n_cols: int, n_rows: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): whole rows, several per tile up to 4096 fp32 values."""
    block_n = next_power_of_2(n_cols)
    return max(1, min(16, 4096 // block_n, next_power_of_2(n_rows))), block_n


def _num_programs(device: torch.device, n_tiles: int, per_sm: int) -> int:
    """Persistent grid size: ``per_sm`` programs per SM on CUDA; on the CPU interpreter a few, so that the
    multi-tile loop and the cross-program reduction run in the tests too."""
    if device.type == "cuda":
        return max(1, min(n_tiles, _sm_count(device.index or 0) * per_sm))
    return max(1, min(n_tiles, 3))


@functools.lru_cache(maxsize=4096)
def _launch(N: int, M: int, device: torch.device, backward: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, programs, num_stages) of a launch, worked out once per shape and device."""
    block_m, block_n = _tile_config(N, M)
    n_tiles = cdiv(M, block_m)
    elements = block_m * block_n
    # Warps: at most 16 fp32 values per thread of each tensor in the backward (x, dy, xhat, the column sums),
    # 32 in the forward; no spills on sm_80/sm_90 at any width up to _MAX_COLS (ptxas). The forward at 4096
    # values with 8 warps spilled 4 bytes (fp16, 256 columns, sm_90): ptxas capped it at 48 registers.
    if not backward:
        num_warps = 4 if elements <= 4096 else 8
        return block_m, block_n, num_warps, _num_programs(device, n_tiles, max(1, 32 // num_warps)), 1
    num_warps = 4 if elements <= 1024 else 8 if elements <= 4096 else 16
    # Few programs: each writes a row of the (P, N) partials, so P rows cost 2 * P * N * 4 bytes of traffic.
    n_programs = _num_programs(device, n_tiles, max(1, 16 // num_warps))
    # Two stages buffer the next tile's x, dy (and ds) in shared memory: at most 3 * 2 * 4096 * 4 = 96 KB,
    # within sm_80's 163 KB; the 8192-column tile would need 192 KB, so it is not pipelined. Nor is a single
    # tile per program: nothing to overlap (and at M = 1 the pipelined sm_80 build spilled 8 bytes).
    num_stages = 2 if block_m * block_n <= 4096 and n_tiles > n_programs else 1
    return block_m, block_n, num_warps, n_programs, num_stages


def _layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        x: (M, N) rows, fp32/fp16/bf16, unit stride along N. residual: (M, N) like x, or None.
        weight: (N,). bias: (N,) or None. eps: added to the variance.
    Returns:
        y (M, N) in the dtype of s (or x), s (M, N) = x + residual in their promoted dtype (None without
        residual), mean (M,) fp32, rstd (M,) fp32.
    """
    M, N = x.shape
    if residual is not None:
        s = torch.empty((M, N), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        y = torch.empty_like(s)
    else:
        s = None
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, s, mean, rstd
    block_m, block_n, num_warps, n_programs, _ = _launch(N, M, x.device, False)
    with device_guard(x):
        _layer_norm_fwd_kernel[(n_programs,)](
            x,
            residual if residual is not None else x,
            s if residual is not None else y,
            y,
            weight,
            bias if bias is not None else weight,
            mean,
            rstd,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            M,
            N,
            eps,
            HAS_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
            maxnreg=max_registers(num_warps),
        )
    _backend.record("add_layer_norm_fwd" if residual is not None else "layer_norm_fwd")
    return y, s, mean, rstd


def _layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ds: torch.Tensor | None,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel and reduce the per-program partial sums.

    Args:
        dy: (M, N) gradient of y. x: (M, N) the normalised input (s for add_layer_norm).
        weight: (N,). mean, rstd: (M,) fp32 from the forward. ds: (M, N) gradient of s, or None.
        has_bias: whether to compute dbias.
    Returns:
        dx (M, N) in x's dtype (includes ds), dweight (N,) in weight's dtype, dbias (N,) in weight's dtype
        (an empty (0,) tensor when not has_bias).
    """
    dy = rows_2d("layer_norm_backward", "grad", dy)
    x = rows_2d("layer_norm_backward", "x", x)
    M, N = x.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        dw = torch.zeros(N, dtype=weight.dtype, device=x.device)
        return dx, dw, dw.clone() if has_bias else dw.new_empty(0)
    if ds is not None:
        ds = rows_2d("add_layer_norm_backward", "grad_s", ds)
    block_m, block_n, num_warps, n_programs, num_stages = _launch(N, M, x.device, True)
    dw_partial = torch.empty((n_programs, N), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((n_programs, N), dtype=torch.float32, device=x.device) if has_bias else dw_partial
    with device_guard(x):
        _layer_norm_bwd_kernel[(n_programs,)](
            dy,
            x,
            ds if ds is not None else dy,
            weight,
            mean,
            rstd,
            dx,
            dw_partial,
            db_partial,
            dy.stride(0),
            x.stride(0),
            ds.stride(0) if ds is not None else 0,
            M,
            N,
            HAS_DS=ds is not None,
            HAS_BIAS=has_bias,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            NUM_STAGES=num_stages,
            num_warps=num_warps,
            maxnreg=max_registers(num_warps),
        )
    _backend.record("add_layer_norm_bwd" if ds is not None else "layer_norm_bwd")
    dw = dw_partial.sum(0).to(weight.dtype)
    db = db_partial.sum(0).to(weight.dtype) if has_bias else dw.new_empty(0)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, differentiable through register_autograd
# ---------------------------------------------------------------------------------------------------------


def _layer_norm_fwd_outputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = _layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


def _add_layer_norm_fwd_outputs(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, mean, rstd = _layer_norm_fwd(x, residual, weight, bias, eps)
    return s, y, mean, rstd


_layer_norm_fwd_op = torch.library.custom_op("gptkernels::layer_norm_fwd", mutates_args=())(_layer_norm_fwd_outputs)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    M = x.shape[0]
    return x.new_empty(x.shape), x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32)


_add_layer_norm_fwd_op = torch.library.custom_op("gptkernels::add_layer_norm_fwd", mutates_args=())(
    _add_layer_norm_fwd_outputs
)


@_add_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    M = x.shape[0]
    stats = (x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), *stats)


@torch.library.custom_op("gptkernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ds: torch.Tensor | None,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_bwd(dy, x, weight, mean, rstd, ds, has_bias)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, ds, has_bias):
    N = x.shape[-1]
    return x.new_empty(x.shape), weight.new_empty((N,)), weight.new_empty((N,) if has_bias else (0,))


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = eager(_layer_norm_bwd_op, _layer_norm_bwd, x)(dy, x, weight, mean, rstd, None, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None), None


_layer_norm_fwd_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


def _add_layer_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    s, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.dtypes = (x.dtype, residual.dtype)


def _add_layer_norm_backward(ctx, ds, dy, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # only s was used downstream
        dy = torch.zeros_like(s)
    dsum, dw, db = eager(_layer_norm_bwd_op, _layer_norm_bwd, s)(dy, s, weight, mean, rstd, ds, ctx.has_bias)
    # s = x + residual: both get the full gradient of s (cast back where the input dtypes differ).
    dx, dres = (dsum if dt == dsum.dtype else dsum.to(dt) for dt in ctx.dtypes)
    return dx, dres, dw, (db if ctx.has_bias else None), None


_add_layer_norm_fwd_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup_context)

# The same forward/backward for eager mode without the custom op's dispatch cost (see _backend.call_op).
_LayerNormFunction = autograd_function(
    "_LayerNormFunction", _layer_norm_fwd_outputs, _layer_norm_setup_context, _layer_norm_backward
)
_AddLayerNormFunction = autograd_function(
    "_AddLayerNormFunction", _add_layer_norm_fwd_outputs, _add_layer_norm_setup_context, _add_layer_norm_backward
)


# ---------------------------------------------------------------------------------------------------------
# Boundary checks and the Triton paths of the public API
# ---------------------------------------------------------------------------------------------------------


def _unsupported(x: torch.Tensor) -> str | None:
    """Why the kernels cannot take ``x`` although the reference can (None when they can)."""
    if (reason := unsupported_dtype(x)) is not None:
        return reason
    if x.dim() > 0 and x.shape[-1] > _MAX_COLS:
        return f"rows of {x.shape[-1]} elements are wider than the kernel's limit of {_MAX_COLS}"
    return None


def _check_params(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> None:
    check_tensor(op, "x", x, min_ndim=1)
    N = x.shape[-1]
    if N == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if N > _MAX_COLS:
        raise ValueError(
            f"{op}: rows of {N} elements are wider than the kernel's limit of {_MAX_COLS} "
            "(backend 'auto' runs the PyTorch reference for them)"
        )
    # weight/bias may be of another float dtype than x (fp32 parameters with bf16 activations under autocast).
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
        if t.shape[0] != N:
            raise ValueError(f"{op}: {name} must have shape ({N},) to match x's last dimension, got {tuple(t.shape)}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a non-negative number, got {eps!r}")


def _layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check_params("layer_norm", x, weight, bias, eps)
    y, _, _ = call_op(
        _layer_norm_fwd_op,
        _LayerNormFunction,
        rows_2d("layer_norm", "x", x),
        weight.contiguous(),
        _contig(bias),
        float(eps),
    )
    return y.view(x.shape)


def _add_layer_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_params("add_layer_norm", x, weight, bias, eps)
    check_tensor("add_layer_norm", "residual", residual, device=x.device)
    if residual.shape != x.shape:
        raise ValueError(
            f"add_layer_norm: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    s, y, _, _ = call_op(
        _add_layer_norm_fwd_op,
        _AddLayerNormFunction,
        rows_2d("add_layer_norm", "x", x),
        rows_2d("add_layer_norm", "residual", residual),
        weight.contiguous(),
        _contig(bias),
        float(eps),
    )
    return s.view(x.shape), y.view(x.shape)


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5, *, backend: str | None = None
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` (any leading shape), statistics in fp32.

    Args:
        x: (..., N) activations, fp32/fp16/bf16.
        weight: (N,) scale. bias: (N,) shift or None. Either may be of another float dtype than ``x``.
        eps: added to the variance.
        backend: "auto" | "triton" | "torch" or None (the ``GPTKERNELS_BACKEND`` default).
    Returns:
        (..., N), the dtype of ``x``.
    """
    if use_triton("layer_norm", x.device, backend, _unsupported(x)):
        return _layer_norm_triton(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and ``layer_norm(s)`` in one pass; returns ``(s, normed)``, both shaped like ``x``.

    ``residual`` has the shape of ``x``; ``s`` and ``normed`` have the promoted dtype of ``x`` and ``residual``
    (as ``x + residual`` would). The gradient reaching ``s`` from both outputs flows to ``x`` and ``residual``.
    """
    if use_triton("add_layer_norm", x.device, backend, _unsupported(x)):
        return _add_layer_norm_triton(x, residual, weight, bias, eps)
    return add_layer_norm_reference(x, residual, weight, bias, eps)
