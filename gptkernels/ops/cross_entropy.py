"""Fused LM head + cross-entropy: PyTorch reference, Triton kernel, launchers, registration.

Liger-Kernel's fused linear cross-entropy: the rows of ``hidden`` are processed in chunks. For each chunk,
cuBLAS computes the chunk's logits into one buffer reused by every chunk; one Triton kernel turns each row
into its loss and overwrites it, in place, with d(loss)/d(logits) up to a constant factor; two more matmuls
turn those into the chunk's rows of grad_hidden and its share of grad_weight. The (N, V) logits never exist
whole, and the gradients are computed when the forward returns: the backward only multiplies them by the
incoming gradient and that factor (1 / n_valid, see _GRAD_SCALE for fp16), then casts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _backend
from ._backend import device_type, eager_apply, is_eager, use_triton
from ._triton import tl, triton
from .utils import FLOAT_DTYPES, TENSOR_TYPES, check_tensor, device_guard, row_launch, unsupported_dtype

# ---------------------------------------------------------------------------------------------------------
# Reference (the CPU path and the test oracle)
# ---------------------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------------------
# Kernel: loss and d(loss)/d(logits) of a chunk of rows
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _lse_step(m, d, target_logit, x, cols, target):
    """One block of the online max / sum of exponentials (fp32) and of the target's logit."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, d, target_logit + tl.sum(tl.where(cols == target, x, 0.0), axis=0)


@triton.jit
def _grad_block(x, cols, target, lse, scale):
    return (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,  # (M, V) the chunk's logits, overwritten with d(loss)/d(logits) * scale when COMPUTE_GRAD
    stride_row,  # elements between consecutive rows of logits (a multiple of 16 from the launcher: aligned rows)
    targets_ptr,  # (N,) int64 class ids of all the rows
    rows_ptr,  # (3, N) fp32 out: each row's loss (0 if ignored), 1 if it counts, 1 if its target is out of range
    row0,  # the chunk's first row in targets and rows
    n_rows,  # N: elements between the rows of rows_ptr
    n_cols,  # V, the vocabulary size
    ignore_index,  # targets equal to this do not count
    COMPUTE_GRAD: tl.constexpr,  # False: loss only (no grad needed), the logits are left as they are
    GRAD_SCALE: tl.constexpr,  # the stored gradient is (softmax - onehot) * GRAD_SCALE (see _GRAD_SCALE)
    BLOCK: tl.constexpr,  # columns per step of the loops over V
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row0 + row)
    valid = target != ignore_index
    out_of_range = valid & ((target < 0) | (target >= n_cols))
    # Whole blocks load and store unmasked, so that they vectorise (rows start 16-element aligned); only the
    # last, partial block is masked.
    n_full = (n_cols // BLOCK) * BLOCK
    tail = n_full + tl.arange(0, BLOCK)
    tail_ok = tail < n_cols

    # Pass 1: online max and sum of exponentials (fp32), and the target's logit, in one read of the row.
    # An out-of-range target matches no column (no out-of-bounds access); it is flagged, and the launcher
    # asserts on the flags.
    m = float("-inf")
    d = 0.0
    target_logit = 0.0
    for start in range(0, n_full, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols).to(tl.float32)
        m, d, target_logit = _lse_step(m, d, target_logit, x, cols, target)
    if n_full < n_cols:
        x = tl.load(row_ptr + tail, mask=tail_ok, other=float("-inf")).to(tl.float32)
        m, d, target_logit = _lse_step(m, d, target_logit, x, tail, target)
    lse = m + tl.log(d)
    tl.store(rows_ptr + row0 + row, tl.where(valid, lse - target_logit, 0.0))
    tl.store(rows_ptr + n_rows + row0 + row, tl.where(valid, 1.0, 0.0))
    tl.store(rows_ptr + 2 * n_rows + row0 + row, tl.where(out_of_range, 1.0, 0.0))

    # Pass 2: (softmax - onehot) * GRAD_SCALE over the logits, zero for an ignored row. Not yet divided by
    # the number of counted targets nor multiplied by the incoming gradient: the backward applies both.
    if COMPUTE_GRAD:
        scale = tl.where(valid, GRAD_SCALE, 0.0)
        out_ty = logits_ptr.dtype.element_ty
        for start in range(0, n_full, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols).to(tl.float32)
            tl.store(row_ptr + cols, _grad_block(x, cols, target, lse, scale).to(out_ty))
        if n_full < n_cols:
            x = tl.load(row_ptr + tail, mask=tail_ok, other=0.0).to(tl.float32)
            tl.store(row_ptr + tail, _grad_block(x, tail, target, lse, scale).to(out_ty), mask=tail_ok)


@triton.jit
def _cross_entropy_finish_kernel(
    rows_ptr,  # (3N + 3,) fp32: the row kernel's (3, N) outputs, then the scalars written here (see below)
    n_rows,  # N
    loss_ptr,  # () fp32 out: the mean loss over counted rows (0 / 0 = nan when none counts, as in PyTorch)
    GRAD_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: the three sums over the rows and the scalars made of them: the loss, then after the rows the
    factor the backward applies (1 / (max(counted, 1) * GRAD_SCALE)) and an ok flag (1.0 when no counted target
    is out of range). One launch instead of the ~10 small PyTorch ops (each a launch and its host cost) that the
    sums, the division and the checks took."""
    loss = tl.zeros((BLOCK,), dtype=tl.float32)
    counted = tl.zeros((BLOCK,), dtype=tl.float32)
    bad = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n_rows
        loss += tl.load(rows_ptr + offs, mask=ok, other=0.0)
        counted += tl.load(rows_ptr + n_rows + offs, mask=ok, other=0.0)
        bad += tl.load(rows_ptr + 2 * n_rows + offs, mask=ok, other=0.0)
    n_valid = tl.sum(counted, axis=0)  # exact: a sum of ones below 2**24
    tl.store(loss_ptr, tl.sum(loss, axis=0) / n_valid)
    tl.store(rows_ptr + 3 * n_rows, 1.0 / (tl.maximum(n_valid, 1.0) * GRAD_SCALE))
    tl.store(rows_ptr + 3 * n_rows + 1, tl.where(tl.sum(bad, axis=0) == 0.0, 1.0, 0.0))


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

# Rows per chunk. Every chunk reads and writes the whole (V, C) fp32 grad_weight accumulator once (8VC bytes)
# for 2MVC FLOPs, so its arithmetic intensity is about 2MC / (8C + 2M) FLOP/byte: 191 at M = 1024 and C = 768,
# below an H100's ridge (~295 for bf16 tensor cores; Liger's ~N*C/V-row chunks are far below it), 439 at
# M = 4096. Chunks of 4096 rows keep the accumulation compute-bound and give the row kernel thousands of
# programs; _MAX_CHUNK_BYTES caps the logits buffer (4096 GPT-2 rows: 412 MB bf16; fp32 gets 2048 rows) for
# wide vocabularies, still far below the eager path's several GB.
_TARGET_CHUNK_ROWS = 4096
_MAX_CHUNK_BYTES = 512 * 2**20
# Columns per step of the kernel's loops over V.
_MAX_BLOCK = 4096
# Rows of the logits buffer are padded to a multiple of this many elements (V = 50257 is odd): every row then
# starts 16-byte aligned, so the row kernel's loads and stores vectorise, and cuBLAS gets an aligned leading
# dimension.
_ROW_ALIGN = 16
# fp16 stores d(loss)/d(logits) = (softmax - onehot) * 2**15, in [-2**15, 2**15] (fp16's maximum is 65504),
# so probabilities down to ~2e-9 stay normal fp16 numbers. Dividing by the number of counted targets first
# (as before) flushed every entry below ~6e-8 to zero, losing most of the LM-head gradient under GradScaler;
# eager PyTorch keeps them because it multiplies by the (large) loss scale before casting. The matmuls on it
# write fp32, and the backward applies 1 / (2**15 * n_valid) and the incoming gradient before the cast to
# fp16. fp32 and bf16 have fp32's exponent range: they store (softmax - onehot) as it is.
_GRAD_SCALE = {torch.float16: 2.0**15}
# Tests set this to force many chunks on small inputs; 0: choose from the shapes.
_CHUNK_ROWS_OVERRIDE = 0


def _padded_cols(v: int) -> int:
    return -(-v // _ROW_ALIGN) * _ROW_ALIGN


@functools.lru_cache(maxsize=1024)
def _chunk_rows(n: int, v: int, elem_size: int, override: int) -> int:
    """Rows per chunk: ``override`` if > 0, else _TARGET_CHUNK_ROWS capped by _MAX_CHUNK_BYTES; in [1, n]."""
    if override > 0:
        rows = override
    else:
        budget_rows = _MAX_CHUNK_BYTES // (_padded_cols(v) * elem_size)
        rows = min(_TARGET_CHUNK_ROWS, 1 << max(0, budget_rows.bit_length() - 1))  # a power of two
    return max(1, min(rows, n))


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward keeps a gradient in: fp32 for fp16 (see _GRAD_SCALE), else the input's."""
    return torch.float32 if dtype == torch.float16 else dtype


@functools.lru_cache(maxsize=1024)
def _plan(
    n: int, v: int, dtype: torch.dtype, chunk_rows: int, ignore_index: int
) -> tuple[int, int, tuple[int, int, float], str]:
    """Everything the launches need that depends only on the shapes, once per shape (each lookup and call on the
    host costs a fraction of a microsecond, and a call's whole host budget is a few): (rows per chunk, the logits
    buffer's row stride, the row kernel's (BLOCK, num_warps, GRAD_SCALE), the message of the target check)."""
    elem_size = dtype.itemsize
    block, num_warps = row_launch(min(v, _MAX_BLOCK), elem_size)
    message = f"linear_cross_entropy: targets must be in [0, {v}) or equal ignore_index={ignore_index}"
    launch = block, num_warps, _GRAD_SCALE.get(dtype, 1.0)
    return _chunk_rows(n, v, elem_size, chunk_rows), _padded_cols(v), launch, message


def _cross_entropy_rows(
    logits: torch.Tensor,
    stride: int,
    targets: torch.Tensor,
    rows_out: torch.Tensor,
    row0: int,
    m: int,
    ignore_index: int,
    compute_grad: bool,
    launch: tuple[int, int, float],
) -> None:
    """Launch the row kernel on one chunk of ``m`` > 0 rows (on the current CUDA device: the caller guards it).

    Args:
        logits: (m, V) fp32/fp16/bf16, rows ``stride`` elements apart, unit stride along V: rows row0 .. row0 +
            m - 1 of the batch; overwritten with (softmax - onehot) * _GRAD_SCALE when ``compute_grad`` (in its
            own dtype; the arithmetic is fp32).
        targets: (N,) int64, contiguous, all the rows. rows_out: (3N + 3,) fp32 (see _finish): the chunk's
            entries of its (3, N) head are written.
        launch: (BLOCK, num_warps, GRAD_SCALE) from :func:`_plan`.
    The caller passes what it knows (shapes, strides) rather than this reading it: each read costs host time.
    """
    block, num_warps, grad_scale = launch
    _cross_entropy_rows_kernel[(m,)](
        logits,
        stride,
        targets,
        rows_out,
        row0,
        targets.shape[0],
        logits.shape[1],
        ignore_index,
        COMPUTE_GRAD=compute_grad,
        GRAD_SCALE=grad_scale,
        BLOCK=block,
        num_warps=num_warps,
    )
    _backend.record("cross_entropy_fwd_bwd")


def _finish(rows_out: torch.Tensor, n: int, grad_scale: float, loss: torch.Tensor) -> None:
    """Launch the finishing kernel: ``loss`` (0-dim fp32) and the two scalars after the rows of ``rows_out``
    ((3N + 3,) fp32, see _cross_entropy_finish_kernel), grad_scale at 3N and ok at 3N + 1, from the row kernel's
    outputs. The loss is a tensor of its own when gradients are asked (an autograd.Function's output must not be
    a view: in-place ops on it are refused), else the view ``rows_out[3N + 2]`` (one allocation fewer).
    ``grad_scale``: _GRAD_SCALE's."""
    _cross_entropy_finish_kernel[(1,)](rows_out, n, loss, GRAD_SCALE=grad_scale, BLOCK=1024)
    _backend.record("cross_entropy_finish")


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (fp32) (+)= a @ b`` in place for a, b of any one float dtype, with no (rows, cols) temporary."""
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.is_cuda:
        # cuBLAS takes fp16/bf16 operands and reads/writes an fp32 C (out_dtype: PyTorch >= 2.8, CUDA only).
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        # CPU has no mixed-dtype GEMM: upcast the operands, as cuBLAS would.
        _matmul_fp32(a.float(), b.float(), out, accumulate)


def _linear_cross_entropy_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The loss alone (no gradient asked), eager: :func:`_linear_cross_entropy_fwd`'s loop cut to its one chunk
    when the rows fit one (the common case: evaluation batches), for its host cost."""
    n, v = hidden.shape[0], weight.shape[0]
    rows, padded, launch, message = _plan(n, v, hidden.dtype, _CHUNK_ROWS_OVERRIDE, ignore_index)
    if rows != n or n == 0 or not targets.is_contiguous():
        return _linear_cross_entropy_fwd(hidden, weight, targets, ignore_index, _CHUNK_ROWS_OVERRIDE, False, False)[0]
    dev = hidden.device
    rows_out = torch.empty(3 * n + 3, dtype=torch.float32, device=dev)
    logits = torch.empty_strided((n, v), (padded, 1), dtype=hidden.dtype, device=dev)
    loss = rows_out[3 * n + 2]
    with device_guard(hidden):
        F.linear(hidden, weight, out=logits)  # (N, V)
        _cross_entropy_rows(logits, padded, targets, rows_out, 0, n, ignore_index, False, launch)
        _finish(rows_out, n, launch[2], loss)
    torch._assert_async(rows_out[3 * n + 1], message)
    return loss


def _linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and, as asked, the gradients of the mean loss up to one scalar factor.

    Args:
        hidden: (N, C) fp32/fp16/bf16. weight: (V, C), hidden's dtype and device. targets: (N,) int64.
        chunk_rows: rows per chunk, or 0 to choose from the shapes.
    Returns:
        loss: () fp32, nan when every target is ignored (like ``F.cross_entropy``);
        grad_hidden: (N, C) in ``_grad_dtype(hidden.dtype)``, or None when not ``need_grad_hidden``;
        grad_weight: (V, C) accumulated in fp32, kept in fp32 for fp16 and fp32 weights, else in weight's dtype;
            or None when not ``need_grad_weight``;
        grad_scale: () fp32: the gradients of the mean loss are ``grad_scale * grad_hidden`` and
            ``grad_scale * grad_weight`` (1 / (n_valid * _GRAD_SCALE)); None when no gradient is asked.
    """
    n, c = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    if not targets.is_contiguous():
        targets = targets.contiguous()
    # The row kernel's (3, N) outputs and the scalars _finish makes of them: one allocation.
    rows_out = torch.empty(3 * n + 3, dtype=torch.float32, device=dev)
    grad_dtype = _grad_dtype(hidden.dtype)
    grad_hidden = torch.empty(n, c, dtype=grad_dtype, device=dev) if need_grad_hidden else None
    acc = None
    if need_grad_weight:
        alloc = torch.empty if n > 0 else torch.zeros  # the first chunk overwrites it
        acc = alloc(v, c, dtype=torch.float32, device=dev)
    compute_grad = need_grad_hidden or need_grad_weight

    rows, padded, launch, message = _plan(n, v, hidden.dtype, chunk_rows, ignore_index)
    # Reused by every chunk; rows padded to _ROW_ALIGN elements. On the CPU the padding is zeroed for the
    # gradients' GEMMs: PyTorch's CPU bf16 GEMM reads past a row's end (multiplying it by zero), so
    # uninitialised padding that held a NaN made a whole row of grad_hidden NaN. cuBLAS reads only V columns.
    if compute_grad and not hidden.is_cuda:
        logits_buf = torch.zeros(rows, padded, dtype=hidden.dtype, device=dev)[:, :v]
    else:
        logits_buf = torch.empty_strided((rows, v), (padded, 1), dtype=hidden.dtype, device=dev)
    one_chunk = rows == n  # no slicing (each slice is a small op with its host cost)
    # Triton launches on the current CUDA device and stream: make them the inputs' (tensors on another GPU).
    with device_guard(hidden):
        for start in range(0, n, rows):
            end = min(start + rows, n)
            h = hidden if one_chunk else hidden[start:end]
            logits = logits_buf if one_chunk else logits_buf[: end - start]
            F.linear(h, weight, out=logits)  # (M, V)
            _cross_entropy_rows(
                logits, padded, targets, rows_out, start, end - start, ignore_index, compute_grad, launch
            )
            if need_grad_hidden:
                gh = grad_hidden if one_chunk else grad_hidden[start:end]
                if grad_dtype == hidden.dtype:
                    torch.mm(logits, weight, out=gh)  # (M, C)
                else:
                    _matmul_fp32(logits, weight, gh, accumulate=False)
            if acc is not None:
                _matmul_fp32(logits.t(), h, acc, accumulate=start > 0)  # (V, C)

        # The mean loss (0 / 0 = nan when every target is ignored, as in PyTorch) and the gradients' factor.
        loss = torch.empty((), dtype=torch.float32, device=dev) if compute_grad else rows_out[3 * n + 2]
        _finish(rows_out, n, launch[2], loss)
    grad_scale, ok = (rows_out[3 * n] if compute_grad else None), rows_out[3 * n + 1]
    # Checked on the device, so no host sync: on CUDA a bad target is a device-side assert (as in
    # F.cross_entropy), reported at the next synchronising call; on the CPU it raises here.
    torch._assert_async(ok, message)
    if acc is None:
        grad_weight = None
    else:
        grad_weight = acc if _grad_dtype(weight.dtype) == torch.float32 else acc.to(weight.dtype)
    return loss, grad_hidden, grad_weight, grad_scale


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, differentiable through register_autograd
# ---------------------------------------------------------------------------------------------------------


def _linear_cross_entropy_fwd_outputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The custom op: :func:`_linear_cross_entropy_fwd` with (0,) placeholders for the gradients not asked."""
    loss, grad_hidden, grad_weight, grad_scale = _fwd_without_autocast(
        hidden, weight, targets, ignore_index, chunk_rows, need_grad_hidden, need_grad_weight
    )
    grad_hidden = hidden.new_empty(0) if grad_hidden is None else grad_hidden
    grad_weight = weight.new_empty(0) if grad_weight is None else grad_weight
    # Without gradients the loss is a view into the row outputs' buffer, with them grad_scale is: a custom op
    # returns tensors of their own (with the metadata its fake implementation gives).
    if grad_scale is None:  # no gradient asked: the backward never reads it (zero: outputs are deterministic)
        return loss.clone(), grad_hidden, grad_weight, hidden.new_zeros((), dtype=torch.float32)
    return loss, grad_hidden, grad_weight, grad_scale.clone()


def _fwd_without_autocast(*args):
    hidden = args[0]
    device_type = "cuda" if hidden.is_cuda else hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return _linear_cross_entropy_fwd(*args)
    # The matmuls run in the inputs' dtype: autocast (already applied by the public API) must not recast them.
    with torch.autocast(device_type, enabled=False):
        return _linear_cross_entropy_fwd(*args)


_linear_cross_entropy_fwd_op = torch.library.custom_op("gptkernels::linear_cross_entropy_fwd", mutates_args=())(
    _linear_cross_entropy_fwd_outputs
)


@_linear_cross_entropy_fwd_op.register_fake
def _(hidden, weight, targets, ignore_index, chunk_rows, need_grad_hidden, need_grad_weight):
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape if need_grad_hidden else (0,), dtype=_grad_dtype(hidden.dtype))
    gw_dtype = torch.float32 if _grad_dtype(weight.dtype) == torch.float32 else weight.dtype
    grad_weight = weight.new_empty(weight.shape if need_grad_weight else (0,), dtype=gw_dtype)
    return loss, grad_hidden, grad_weight, hidden.new_empty((), dtype=torch.float32)


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_scale = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_scale)
    ctx.save_for_backward(grad_hidden, grad_weight, grad_scale)
    ctx.need_grads = inputs[5], inputs[6]
    ctx.dtypes = inputs[0].dtype, inputs[1].dtype


def _scaled_grads(ctx, grad_loss):
    """(dhidden or None, dweight or None) from what the forward saved: (grad_hidden, grad_weight, grad_scale),
    ctx.need_grads and ctx.dtypes."""
    grad_hidden, grad_weight, grad_scale = ctx.saved_tensors
    need_hidden, need_weight = ctx.need_grads
    # Both factors are 0-dim fp32: the products keep the saved gradients' dtypes, then cast to the inputs'
    # (for fp16, only now: the fp32 products are what eager PyTorch would cast).
    scale = grad_loss * grad_scale
    dh = (grad_hidden * scale).to(ctx.dtypes[0]) if need_hidden else None
    dw = (grad_weight * scale).to(ctx.dtypes[1]) if need_weight else None
    return dh, dw


def _linear_cross_entropy_backward(ctx, grad_loss, _grad_gh, _grad_gw, _grad_scale):
    return *_scaled_grads(ctx, grad_loss), None, None, None, None, None


_linear_cross_entropy_fwd_op.register_autograd(
    _linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup_context
)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Eager mode: the same computation without the custom op's dispatch (see _backend.eager_apply); the saved
    gradients stay on ctx instead of being outputs (each output costs its autograd bookkeeping)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, need_grad_hidden, need_grad_weight):
        # Autocast is off here (see _linear_cross_entropy_triton).
        loss, grad_hidden, grad_weight, grad_scale = _linear_cross_entropy_fwd(
            hidden, weight, targets, ignore_index, chunk_rows, need_grad_hidden, need_grad_weight
        )
        ctx.save_for_backward(grad_hidden, grad_weight, grad_scale)
        ctx.need_grads = need_grad_hidden, need_grad_weight
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return *_scaled_grads(ctx, grad_loss), None, None, None, None, None


_linear_cross_entropy_apply = eager_apply(_LinearCrossEntropyFunction)


# ---------------------------------------------------------------------------------------------------------
# Boundary checks and the Triton path of the public API
# ---------------------------------------------------------------------------------------------------------

_OP = "linear_cross_entropy"
_REFERENCE_DTYPES = (*FLOAT_DTYPES, torch.float64)


def _inputs_ok(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, dtypes: tuple
) -> bool:
    """The checks of :func:`_check_inputs` in one pass for the common case (same dtypes, no autocast), without
    building messages."""
    if type(hidden) not in TENSOR_TYPES or type(weight) not in TENSOR_TYPES or type(targets) not in TENSOR_TYPES:
        return False
    h_shape, w_shape, t_shape = hidden.shape, weight.shape, targets.shape
    device = hidden.device
    return (
        len(h_shape) == 2
        and len(w_shape) == 2
        and len(t_shape) == 1
        and w_shape[1] == h_shape[1]
        and w_shape[0] > 0
        and t_shape[0] == h_shape[0]
        and hidden.dtype in dtypes
        and weight.dtype == hidden.dtype
        and targets.dtype == torch.int64
        and weight.device == device
        and targets.device == device
        and type(ignore_index) is int
    )


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> None:
    if _inputs_ok(hidden, weight, targets, ignore_index, dtypes):
        return
    check_tensor(_OP, "hidden", hidden, ndim=2, dtypes=dtypes)
    # Under autocast the two may differ (fp32 weight, bf16 activations): both are cast before the kernel.
    autocast = torch.is_autocast_enabled(hidden.device.type)
    check_tensor(_OP, "weight", weight, ndim=2, dtypes=dtypes, device=hidden.device, like=None if autocast else hidden)
    check_tensor(_OP, "targets", targets, dtypes=(torch.int64,), ndim=1, device=hidden.device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{_OP}: weight must have shape (V, {hidden.shape[1]}) to match hidden's last dimension, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{_OP}: weight must have at least one row (class), got shape {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"{_OP}: targets must have shape ({hidden.shape[0]},) to match hidden's rows, got {tuple(targets.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")


def _linear_cross_entropy_triton(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The Triton path on checked inputs: the custom op when traced, else the autograd.Function (gradients
    asked) or the launchers alone. Under autocast both inputs are cast to its dtype (as the reference's matmul
    would be) and the chunks' matmuls then run with autocast off, in that dtype."""
    kind = device_type(hidden.device)
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return _linear_cross_entropy_triton(hidden.to(dtype), weight.to(dtype), targets, ignore_index)
    grad_on = torch.is_grad_enabled()
    need_hidden, need_weight = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    if is_eager(hidden):
        if not (need_hidden or need_weight):
            return _linear_cross_entropy_loss(hidden, weight, targets, ignore_index)
        return _linear_cross_entropy_apply(
            hidden, weight, targets, ignore_index, _CHUNK_ROWS_OVERRIDE, need_hidden, need_weight
        )
    return _linear_cross_entropy_fwd_op(
        hidden, weight, targets, ignore_index, _CHUNK_ROWS_OVERRIDE, need_hidden, need_weight
    )[0]


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` without holding the logits whole.

    Like ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)``, including its nan when
    every target is ignored. The Triton path computes the loss and both gradients in one chunked pass (see
    the module docstring); its peak extra memory is one chunk of logits plus the gradients.

    Args:
        hidden: (N, C) final hidden states, fp32/fp16/bf16 (``nn.LMHeadLoss`` flattens leading dims).
        weight: (V, C) LM-head (tied embedding) weight, hidden's dtype (under autocast both are cast to the
            autocast dtype, as the matmul of the reference would be).
        targets: (N,) int64 class ids in [0, V); ``ignore_index`` entries do not count. Out-of-range ids
            raise on the CPU and trigger a device-side assert on CUDA (no host sync).
        ignore_index: the target value that is skipped.
        backend: "auto" | "triton" | "torch" or None (the ``GPTKERNELS_BACKEND`` default).
    Returns:
        scalar fp32 loss, the mean over counted targets.
    """
    if _inputs_ok(hidden, weight, targets, ignore_index, FLOAT_DTYPES):  # the common case, checked in one pass
        if use_triton(_OP, hidden.device, backend):
            return _linear_cross_entropy_triton(hidden, weight, targets, ignore_index)
        return linear_cross_entropy_reference(hidden, weight, targets, ignore_index)
    unsupported = unsupported_dtype(hidden) if isinstance(hidden, torch.Tensor) else None
    # The reference takes float64 too (the kernel's refusal is use_triton's to handle).
    _check_inputs(hidden, weight, targets, ignore_index, FLOAT_DTYPES if unsupported is None else _REFERENCE_DTYPES)
    if use_triton(_OP, hidden.device, backend, unsupported):
        if unsupported is not None:  # "triton" with a dtype the kernel does not take: the dtype error
            _check_inputs(hidden, weight, targets, ignore_index)
        return _linear_cross_entropy_triton(hidden, weight, targets, ignore_index)
    return linear_cross_entropy_reference(hidden, weight, targets, ignore_index)
