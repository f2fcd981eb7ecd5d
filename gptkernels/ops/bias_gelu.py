"""Bias + tanh-GELU (GPT-2's MLP activation): PyTorch reference, Triton kernels, launchers, registration.

The kernels walk (BLOCK_M, BLOCK_N) tiles of the (M, N) activations. ``gelu_tanh(z) = z * sigmoid(2u)`` with
``u = sqrt(2/pi) * (z + 0.044715 z^3)`` (since ``0.5 * (1 + tanh(u)) = sigmoid(2u)``), computed in fp32. The
backward recomputes ``z = x + bias`` from the saved input, so the forward saves nothing extra; each row of tiles
writes its column sums of dx to its own row of a (tiles_m, N) fp32 buffer, summed afterwards into dbias
(no atomics, deterministic).
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
    next_power_of_2,
    rows_of,
    unsupported_dtype,
)

# ---------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The result keeps x's dtype, as the kernel does and as a Linear under autocast would (an fp32 bias
    # parameter with bf16 activations must not promote the whole (rows, 4C) activation to fp32).
    return F.gelu(x if bias is None else x + bias.to(x.dtype), approximate="tanh")


# ---------------------------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _clamp20(z):
    # Comparisons rather than tl.minimum/maximum, whose GPU lowering would turn a NaN into +-20.
    return tl.where(z > 20.0, 20.0, tl.where(z < -20.0, -20.0, z))


@triton.jit
def _gelu_sigmoid(z):
    """sigmoid(2u) = 0.5 * (1 + tanh(u)), u = sqrt(2/pi) * (z + 0.044715 z^3), for z already clamped to
    [-20, 20]: beyond that range it is exactly 0 or 1 in fp32, and the clamp keeps z^3 from overflowing."""
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    # exp(-2u) = 2^(-2u * log2(e)). Where it would overflow (z < about -10) the sigmoid is exactly 0, so that
    # gelu(z) = -0 as in PyTorch; the inner clamp only keeps the discarded branch finite.
    t = -2.8853900817779268 * u
    return tl.where(t > 126.0, 0.0, 1.0 / (1.0 + tl.exp2(tl.minimum(t, 126.0))))


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: its row-tile index, int64 row offsets (M * N may exceed 2**31), columns and masks.

    1-D grid over tiles, column tiles fastest: neighbouring programs read neighbouring memory, and the grid never
    meets CUDA's 65535 limit on its second dimension.
    """
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    return pid_m, rows.to(tl.int64)[:, None], cols, col_ok, mask


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # (M, N) pre-activation without bias, unit stride along N
    B,  # (N,) bias (read only when HAS_BIAS)
    Y,  # (M, N) out: gelu_tanh(X + B), contiguous
    stride_x,  # elements between rows of X
    M,
    N,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, rows64, cols, col_ok, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    z = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = z * _gelu_sigmoid(_clamp20(z))
    tl.store(Y + rows64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Backward kernel
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (M, N) gradient of the output, unit stride along N
    X,  # (M, N) the forward's input (pre-activation without bias)
    B,  # (N,) bias (read only when HAS_BIAS)
    DX,  # (M, N) out: gradient of X, contiguous
    DB_partial,  # (tiles_m, N) fp32 out: column sums of DX over this program's rows (only when HAS_BIAS)
    stride_dy,
    stride_x,
    M,
    N,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, rows64, cols, col_ok, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    z = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # d/dz [z * sigmoid(2u)] = sigmoid(2u) + z * sigmoid(2u) * (1 - sigmoid(2u)) * 2 du/dz. For |z| > 20,
    # sigmoid(2u) is exactly 0 or 1 and the second term 0: the clamp changes nothing but keeps z * du finite.
    zc = _clamp20(z)
    sig = _gelu_sigmoid(zc)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * zc * zc)
    dx = dy * (sig + 2.0 * zc * sig * (1.0 - sig) * du)
    tl.store(DX + rows64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        # Masked entries have dy = 0, hence dx = 0: they add nothing to the column sums.
        tl.store(DB_partial + pid_m * N + cols, tl.sum(dx, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _launch(M: int, N: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, row tiles, grid size): up to 256 columns (a warp's row of 16-byte vectors in
    bf16) and 4096 elements per tile, 32 per thread with 4 warps. Worked out once per shape."""
    block_n = min(256, next_power_of_2(N))
    block_m = max(1, min(4096 // block_n, next_power_of_2(M)))
    tiles_m = cdiv(M, block_m)
    return block_m, block_n, 4, tiles_m, tiles_m * cdiv(N, block_n)


def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Launch the forward kernel.

    Args:
        x: (..., N) pre-activation, fp32/fp16/bf16, unit stride along N. bias: (N,) or None.
    Returns:
        gelu_tanh(x + bias) shaped like x, contiguous, in x's dtype.
    """
    shape = x.shape
    if x.numel() == 0:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    x, M, stride_x = rows_of("bias_gelu", "x", x)
    N = shape[-1]
    y = torch.empty_like(x) if x.shape == shape else torch.empty(*shape, dtype=x.dtype, device=x.device)
    block_m, block_n, num_warps, _, grid = _launch(M, N)
    with device_guard(x):
        _bias_gelu_fwd_kernel[(grid,)](
            x,
            bias if bias is not None else x,
            y,
            stride_x,
            M,
            N,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    _backend.record("bias_gelu_fwd")
    return y


def _bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel and reduce the per-row-tile partial sums.

    Args:
        dy: gradient of the output, shaped like x. x: (..., N) the forward's input. bias: (N,) or None.
    Returns:
        dx shaped like x in x's dtype, dbias (N,) in bias's dtype (an empty (0,) tensor when bias is None).
    """
    shape = x.shape
    if x.numel() == 0:
        dx = torch.empty(shape, dtype=x.dtype, device=x.device)
        return dx, (torch.zeros_like(bias) if bias is not None else x.new_empty(0))
    x, M, stride_x = rows_of("bias_gelu_backward", "x", x)
    dy, _, stride_dy = rows_of("bias_gelu_backward", "grad", dy)
    N = shape[-1]
    dx = torch.empty_like(x) if x.shape == shape else torch.empty(*shape, dtype=x.dtype, device=x.device)
    block_m, block_n, num_warps, tiles_m, grid = _launch(M, N)
    # sizes as separate arguments: a tuple costs the parser ~0.8 us more
    db_partial = torch.empty(tiles_m if bias is not None else 0, N, dtype=torch.float32, device=x.device)
    with device_guard(x):
        _bias_gelu_bwd_kernel[(grid,)](
            dy,
            x,
            bias if bias is not None else x,
            dx,
            db_partial,
            stride_dy,
            stride_x,
            M,
            N,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    _backend.record("bias_gelu_bwd")
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, db


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, differentiable through register_autograd
# ---------------------------------------------------------------------------------------------------------


_bias_gelu_fwd_op = torch.library.custom_op("gptkernels::bias_gelu_fwd", mutates_args=())(_bias_gelu_fwd)


@_bias_gelu_fwd_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("gptkernels::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bias_gelu_bwd(dy, x, bias)


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), (bias.new_empty(bias.shape) if bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = eager(_bias_gelu_bwd_op, _bias_gelu_bwd, x)(dy, x, bias)
    return dx, (db if bias is not None else None)


_bias_gelu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _BiasGeluFunction(torch.autograd.Function):
    """Eager mode: the same kernels and gradients without the custom op's dispatch (see _backend.eager_apply)."""

    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return _bias_gelu_fwd(x, bias)

    backward = staticmethod(_backward)


_bias_gelu_apply = eager_apply(_BiasGeluFunction)


# ---------------------------------------------------------------------------------------------------------
# Boundary checks and the Triton path of the public API
# ---------------------------------------------------------------------------------------------------------


def _bias_ok(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The checks of :func:`_bias_gelu_triton` in one pass for the common case, without building messages."""
    shape = x.shape
    return (
        type(x) in TENSOR_TYPES
        and len(shape) > 0
        and x.dtype in FLOAT_DTYPES
        and (
            bias is None
            or type(bias) in TENSOR_TYPES
            and bias.shape == shape[-1:]
            and bias.dtype in FLOAT_DTYPES
            and bias.device == x.device
        )
    )


def _bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not _bias_ok(x, bias):
        check_tensor("bias_gelu", "x", x, min_ndim=1)
        if bias is not None:
            # bias may be of another float dtype than x (an fp32 parameter with bf16 activations under autocast).
            check_tensor("bias_gelu", "bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
            if bias.shape[0] != x.shape[-1]:
                raise ValueError(
                    f"bias_gelu: bias must have shape ({x.shape[-1]},) to match x's last dimension, "
                    f"got {tuple(bias.shape)}"
                )
    if bias is not None:
        bias = bias.contiguous()
    if not is_eager(x):
        return _bias_gelu_fwd_op(x, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _bias_gelu_apply(x, bias)
    return _bias_gelu_fwd(x, bias)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, *, backend: str | None = None) -> torch.Tensor:
    """``gelu_tanh(x + bias)``.

    Args:
        x: (..., N) pre-activation without bias (the output of ``x @ W.T``), fp32/fp16/bf16.
        bias: (N,) or None; may be of another float dtype than ``x`` (its gradient keeps its dtype).
    Returns:
        (..., N), the dtype of ``x``.
    """
    unsupported = unsupported_dtype(x)
    if use_triton("bias_gelu", x.device, backend, unsupported):
        return _bias_gelu_triton(x, bias)
    return bias_gelu_reference(x, bias)
