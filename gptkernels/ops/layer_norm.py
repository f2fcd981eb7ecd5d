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
from ._backend import eager, eager_apply, is_eager, use_triton
from ._triton import tl, triton
from .utils import (
    FLOAT_DTYPES,
    TENSOR_TYPES,
    cdiv,
    check_tensor,
    device_guard,
    max_registers,
    next_power_of_2,
    rows_of,
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
    Stats,  # (2, M) fp32 out: row means, then 1 / sqrt(var + eps), saved for the backward (when STORE_STATS)
    stride_x,  # elements between rows of X
    stride_r,  # elements between rows of R
    M,  # number of rows
    N,  # row width
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_STATS: tl.constexpr,  # False when nothing needs a gradient
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
        if STORE_STATS:
            tl.store(Stats + rows, mean, mask=row_ok)
            tl.store(Stats + M + rows, rstd, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Backward kernel
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) gradient of the normalised output, unit stride along N
    X,  # (M, N) the rows that were normalised (x, or s = x + residual)
    DS,  # (M, N) gradient flowing into s directly (read only when HAS_DS)
    W,  # (N,) scale
    Stats,  # (2, M) fp32 from the forward: means, then rstds
    DX,  # (M, N) out: gradient of X (plus DS), contiguous
    Partial,  # (1 or 2, P, N) fp32 out: this program's sums over its rows of dy * xhat, then of dy (HAS_BIAS)
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
        mean = tl.load(Stats + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Stats + M + rows, mask=row_ok, other=0.0)
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
    tl.store(Partial + pid * N + cols, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(Partial + (n_programs + pid) * N + cols, db_acc, mask=col_ok)


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
def _launch(N: int, M: int, device: torch.device, backward: bool) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, programs, num_stages, maxnreg) of a launch, worked out once per shape and
    device."""
    block_m, block_n = _tile_config(N, M)
    n_tiles = cdiv(M, block_m)
    elements = block_m * block_n
    # Warps: at most 16 fp32 values per thread of each tensor in the backward (x, dy, xhat, the column sums),
    # 32 in the forward; no spills on sm_80/sm_90 at any width up to _MAX_COLS (ptxas). The forward at 4096
    # values with 8 warps spilled 4 bytes (fp16, 256 columns, sm_90): ptxas capped it at 48 registers.
    if not backward:
        num_warps = 4 if elements <= 4096 else 8
        programs = _num_programs(device, n_tiles, max(1, 32 // num_warps))
        return block_m, block_n, num_warps, programs, 1, max_registers(num_warps)
    num_warps = 4 if elements <= 1024 else 8 if elements <= 4096 else 16
    # Few programs: each writes a row of the (P, N) partials, so P rows cost 2 * P * N * 4 bytes of traffic.
    n_programs = _num_programs(device, n_tiles, max(1, 16 // num_warps))
    # Two stages buffer the next tile's x, dy (and ds) in shared memory: at most 3 * 2 * 4096 * 4 = 96 KB,
    # within sm_80's 163 KB; the 8192-column tile would need 192 KB, so it is not pipelined. Nor is a single
    # tile per program: nothing to overlap (and at M = 1 the pipelined sm_80 build spilled 8 bytes).
    num_stages = 2 if block_m * block_n <= 4096 and n_tiles > n_programs else 1
    return block_m, block_n, num_warps, n_programs, num_stages, max_registers(num_warps)


def _layer_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    store_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernel.

    Args:
        x: (..., N) rows, fp32/fp16/bf16, unit stride along N. residual: like x, or None.
        weight: (N,). bias: (N,) or None. eps: added to the variance.
        store_stats: whether to return the statistics the backward needs.
    Returns:
        y shaped like x, contiguous, in the dtype of s (or x); s = x + residual like y (None without residual);
        stats (2, M) fp32: the row means, then the rows' 1 / sqrt(var + eps) (None unless store_stats).
    """
    shape = x.shape
    x, M, stride_x = rows_of("layer_norm", "x", x)
    N = shape[-1]
    if residual is not None:
        residual, _, stride_r = rows_of("add_layer_norm", "residual", residual)
        if residual.dtype == x.dtype and x.shape == shape:
            s = torch.empty_like(x)
        else:
            s = torch.empty(*shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        y = torch.empty_like(s)
    else:
        s, stride_r = None, 0
        y = torch.empty_like(x) if x.shape == shape else torch.empty(*shape, dtype=x.dtype, device=x.device)
    # Sizes as separate arguments: a tuple or torch.Size costs the parser 0.8-2.5 us more (torch 2.13, CPU).
    stats = torch.empty(2, M, dtype=torch.float32, device=x.device) if store_stats else None
    if M == 0:
        return y, s, stats
    block_m, block_n, num_warps, n_programs, _, max_regs = _launch(N, M, x.device, False)
    with device_guard(x):
        _layer_norm_fwd_kernel[(n_programs,)](
            x,
            residual if residual is not None else x,
            s if s is not None else y,
            y,
            weight,
            bias if bias is not None else weight,
            stats if stats is not None else y,
            stride_x,
            stride_r,
            M,
            N,
            float(eps),
            HAS_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None,
            STORE_STATS=store_stats,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
            maxnreg=max_regs,
        )
    _backend.record("add_layer_norm_fwd" if residual is not None else "layer_norm_fwd")
    return y, s, stats


def _layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stats: torch.Tensor,
    ds: torch.Tensor | None,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel and reduce the per-program partial sums.

    Args:
        dy: gradient of y, shaped like x. x: (..., N) the normalised input (s for add_layer_norm).
        weight: (N,). stats: (2, M) fp32 from the forward. ds: gradient of s shaped like x, or None.
        has_bias: whether to compute dbias.
    Returns:
        dx shaped like x in x's dtype (includes ds), dweight (N,) in weight's dtype, dbias (N,) in weight's
        dtype (an empty (0,) tensor when not has_bias).
    """
    shape = x.shape
    x, M, stride_x = rows_of("layer_norm_backward", "x", x)
    dy, _, stride_dy = rows_of("layer_norm_backward", "grad", dy)
    N = shape[-1]
    dx = torch.empty_like(x) if x.shape == shape else torch.empty(*shape, dtype=x.dtype, device=x.device)
    if M == 0:
        dw = torch.zeros(N, dtype=weight.dtype, device=x.device)
        return dx, dw, dw.clone() if has_bias else dw.new_empty(0)
    stride_ds = 0
    if ds is not None:
        ds, _, stride_ds = rows_of("add_layer_norm_backward", "grad_s", ds)
    block_m, block_n, num_warps, n_programs, num_stages, max_regs = _launch(N, M, x.device, True)
    # One buffer for both partial sums: (2, P, N) when there is a bias.
    partial = torch.empty(2 if has_bias else 1, n_programs, N, dtype=torch.float32, device=x.device)
    with device_guard(x):
        _layer_norm_bwd_kernel[(n_programs,)](
            dy,
            x,
            ds if ds is not None else dy,
            weight,
            stats,
            dx,
            partial,
            stride_dy,
            stride_x,
            stride_ds,
            M,
            N,
            HAS_DS=ds is not None,
            HAS_BIAS=has_bias,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            NUM_STAGES=num_stages,
            num_warps=num_warps,
            maxnreg=max_regs,
        )
    _backend.record("add_layer_norm_bwd" if ds is not None else "layer_norm_bwd")
    # One reduction for both; dweight and dbias are then two rows of one tensor (the custom op clones dbias:
    # its outputs must not alias).
    sums = partial.sum(1)
    if sums.dtype != weight.dtype:
        sums = sums.to(weight.dtype)
    if not has_bias:
        return dx, sums[0], sums.new_empty(0)
    dw, db = sums.unbind()
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, differentiable through register_autograd
# ---------------------------------------------------------------------------------------------------------


def _layer_norm_fwd_outputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, stats = _layer_norm_fwd(x, None, weight, bias, eps)
    return y, stats


def _add_layer_norm_fwd_outputs(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, stats = _layer_norm_fwd(x, residual, weight, bias, eps)
    return s, y, stats


_layer_norm_fwd_op = torch.library.custom_op("gptkernels::layer_norm_fwd", mutates_args=())(_layer_norm_fwd_outputs)


def _fake_stats(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((2, x.numel() // x.shape[-1]), dtype=torch.float32)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape), _fake_stats(x)


_add_layer_norm_fwd_op = torch.library.custom_op("gptkernels::add_layer_norm_fwd", mutates_args=())(
    _add_layer_norm_fwd_outputs
)


@_add_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), _fake_stats(x)


@torch.library.custom_op("gptkernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stats: torch.Tensor,
    ds: torch.Tensor | None,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _layer_norm_bwd(dy, x, weight, stats, ds, has_bias)
    return dx, dw, db.clone() if has_bias else db


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, stats, ds, has_bias):
    N = x.shape[-1]
    return x.new_empty(x.shape), weight.new_empty((N,)), weight.new_empty((N,) if has_bias else (0,))


def _layer_norm_grads(ctx, dy):
    """(dx, dweight, dbias or None) from what the forward saved: (x, weight, stats) and ctx.has_bias."""
    x, weight, stats = ctx.saved_tensors
    dx, dw, db = eager(_layer_norm_bwd_op, _layer_norm_bwd, x)(dy, x, weight, stats, None, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None)


def _add_layer_norm_grads(ctx, ds, dy):
    """(dx, dresidual, dweight, dbias or None) from what the forward saved: (s, weight, stats), ctx.has_bias and
    ctx.dtypes (those of x and residual)."""
    s, weight, stats = ctx.saved_tensors
    if dy is None:  # only s was used downstream
        dy = torch.zeros_like(s)
    dsum, dw, db = eager(_layer_norm_bwd_op, _layer_norm_bwd, s)(dy, s, weight, stats, ds, ctx.has_bias)
    # s = x + residual: both get the full gradient of s (cast back where the input dtypes differ).
    dx, dres = (dsum if dt == dsum.dtype else dsum.to(dt) for dt in ctx.dtypes)
    return dx, dres, dw, (db if ctx.has_bias else None)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x, weight, stats)
    ctx.has_bias = bias is not None


def _layer_norm_backward(ctx, dy, _dstats):
    return *_layer_norm_grads(ctx, dy), None


_layer_norm_fwd_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


def _add_layer_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    s, _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(s, weight, stats)
    ctx.has_bias = bias is not None
    ctx.dtypes = (x.dtype, residual.dtype)


def _add_layer_norm_backward(ctx, ds, dy, _dstats):
    return *_add_layer_norm_grads(ctx, ds, dy), None


_add_layer_norm_fwd_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup_context)


# Eager mode: the same kernels and gradients without the custom op's dispatch (see _backend.eager_apply). The
# statistics are saved on ctx rather than returned: an output more costs its autograd bookkeeping.
class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, _, stats = _layer_norm_fwd(x, None, weight, bias, eps)
        ctx.save_for_backward(x, weight, stats)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        return *_layer_norm_grads(ctx, dy), None


class _AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        y, s, stats = _layer_norm_fwd(x, residual, weight, bias, eps)
        ctx.save_for_backward(s, weight, stats)
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, residual.dtype)
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        return *_add_layer_norm_grads(ctx, ds, dy), None


_layer_norm_apply = eager_apply(_LayerNormFunction)
_add_layer_norm_apply = eager_apply(_AddLayerNormFunction)


# ---------------------------------------------------------------------------------------------------------
# Boundary checks and the Triton paths of the public API
# ---------------------------------------------------------------------------------------------------------


def _unsupported(x: torch.Tensor) -> str | None:
    """Why the kernels cannot take ``x`` although the reference can (None when they can)."""
    if x.dtype in FLOAT_DTYPES and (x.dim() == 0 or x.shape[-1] <= _MAX_COLS):  # the common case, first
        return None
    if (reason := unsupported_dtype(x)) is not None:
        return reason
    if x.dim() > 0 and x.shape[-1] > _MAX_COLS:
        return f"rows of {x.shape[-1]} elements are wider than the kernel's limit of {_MAX_COLS}"
    return None


def _params_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> bool:
    """The checks of :func:`_check_params` in one pass for the common case, without building messages (each
    tensor attribute read costs ~0.1 µs: read each once)."""
    shape = x.shape
    if type(x) not in TENSOR_TYPES or not shape or x.dtype not in FLOAT_DTYPES or type(eps) is not float or eps < 0:
        return False
    n = shape[-1]
    row = (n,)
    device = x.device
    return (
        0 < n <= _MAX_COLS
        and type(weight) in TENSOR_TYPES
        and weight.shape == row
        and weight.dtype in FLOAT_DTYPES
        and weight.device == device
        and (
            bias is None
            or type(bias) in TENSOR_TYPES
            and bias.shape == row
            and bias.dtype in FLOAT_DTYPES
            and bias.device == device
        )
    )


def _check_params(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> None:
    if _params_ok(x, weight, bias, eps):
        return
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
    """The Triton path on inputs that passed :func:`_check_params`."""
    weight, bias = weight.contiguous(), _contig(bias)
    if is_eager(x):
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return _layer_norm_apply(x, weight, bias, eps)
        return _layer_norm_fwd(x, None, weight, bias, eps, store_stats=False)[0]
    return _layer_norm_fwd_op(x, weight, bias, float(eps))[0]


def _add_layer_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path on inputs that passed :func:`_check_params` (residual is checked here)."""
    if not (
        type(residual) in TENSOR_TYPES
        and residual.shape == x.shape
        and residual.dtype in FLOAT_DTYPES
        and residual.device == x.device
    ):
        check_tensor("add_layer_norm", "residual", residual, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(
                f"add_layer_norm: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
    weight, bias = weight.contiguous(), _contig(bias)
    if is_eager(x):
        if torch.is_grad_enabled() and (
            x.requires_grad
            or residual.requires_grad
            or weight.requires_grad
            or (bias is not None and bias.requires_grad)
        ):
            return _add_layer_norm_apply(x, residual, weight, bias, eps)
        y, s, _ = _layer_norm_fwd(x, residual, weight, bias, eps, store_stats=False)
        return s, y
    s, y, _ = _add_layer_norm_fwd_op(x, residual, weight, bias, float(eps))
    return s, y


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
    if _params_ok(x, weight, bias, eps):  # the common case: checked in one pass, and the kernel takes x
        if use_triton("layer_norm", x.device, backend):
            return _layer_norm_triton(x, weight, bias, eps)
    elif use_triton("layer_norm", x.device, backend, _unsupported(x)):
        _check_params("layer_norm", x, weight, bias, eps)
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
    if _params_ok(x, weight, bias, eps):  # the common case: checked in one pass, and the kernel takes x
        if use_triton("add_layer_norm", x.device, backend):
            return _add_layer_norm_triton(x, residual, weight, bias, eps)
    elif use_triton("add_layer_norm", x.device, backend, _unsupported(x)):
        _check_params("add_layer_norm", x, weight, bias, eps)
        return _add_layer_norm_triton(x, residual, weight, bias, eps)
    return add_layer_norm_reference(x, residual, weight, bias, eps)
