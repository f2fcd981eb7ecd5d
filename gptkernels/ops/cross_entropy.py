"""Fused LM head + cross-entropy: PyTorch reference, Triton kernel, launchers, registration.

Liger-Kernel's fused linear cross-entropy: the rows of ``hidden`` are processed in chunks. For each chunk,
cuBLAS computes the chunk's logits into one buffer reused by every chunk; one Triton kernel turns each row
into its loss and overwrites it, in place, with d(loss)/d(logits); two more matmuls turn those into the
chunk's rows of grad_hidden and its share of grad_weight. The (N, V) logits never exist whole, and the
gradients are finished when the forward returns: the backward only scales them by the incoming gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from ._backend import use_triton
from ._triton import tl, triton
from .utils import check_tensor, device_guard, row_launch

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
def _cross_entropy_rows_kernel(
    logits_ptr,  # (M, V) the chunk's logits, overwritten with d(loss)/d(logits) when COMPUTE_GRAD
    stride_row,  # elements between consecutive rows of logits
    targets_ptr,  # (M,) int64 class ids
    loss_ptr,  # (M,) fp32 out: each row's loss, 0 for ignored rows
    n_valid_ptr,  # () int64: targets that count, over all N rows (the mean's denominator)
    n_cols,  # V, the vocabulary size
    ignore_index,  # targets equal to this do not count
    COMPUTE_GRAD: tl.constexpr,  # False: loss only (no grad needed), the logits are left as they are
    BLOCK: tl.constexpr,  # columns per step of the loops over V
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index

    # Pass 1: online max and sum of exponentials (fp32), and the target's logit, in one read of the row.
    # An out-of-range target matches no column (no out-of-bounds access); the launcher asserts on those.
    m = float("-inf")
    d = 0.0
    target_logit = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        target_logit += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
    lse = m + tl.log(d)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))

    # Pass 2: (softmax - onehot) / n_valid over the logits; zero for an ignored row. A counted row implies
    # n_valid >= 1; the maximum only keeps an all-ignored batch (n_valid == 0) from dividing by zero.
    if COMPUTE_GRAD:
        n_valid = tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
        scale = tl.where(valid, 1.0 / n_valid, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

# Rows per chunk. Liger sizes a chunk so that its logits are about as large as ``hidden`` (N*C/V rows, 126
# for GPT-2 at N=8192). But every chunk reads and writes the whole (V, C) fp32 grad_weight accumulator once
# (~300 MB for GPT-2), and a 128-row chunk gives the three matmuls too little work per byte, so the floor
# keeps chunks at >= 1024 rows: then the accumulation is compute-bound on an H100 and the row kernel has
# enough programs to fill the GPU. A 1024-row chunk of GPT-2 logits is 103 MB (bf16) / 206 MB (fp32), far
# below the eager path's several GB.
_MIN_CHUNK_ROWS = 1024
# Columns per step of the kernel's loops over V.
_MAX_BLOCK = 4096
# Tests set this to force many chunks on small inputs; 0: choose from the shapes.
_CHUNK_ROWS_OVERRIDE = 0


def _chunk_rows(n: int, c: int, v: int, override: int) -> int:
    if override > 0:
        rows = override
    else:
        rows = max(triton.next_power_of_2(triton.cdiv(n, triton.cdiv(v, c))), _MIN_CHUNK_ROWS)
    return max(1, min(rows, n))


def _cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_rows: torch.Tensor,
    n_valid: torch.Tensor,
    ignore_index: int,
    compute_grad: bool,
) -> None:
    """Launch the row kernel on one chunk.

    Args:
        logits: (M, V) fp32/fp16/bf16, unit stride along V; overwritten with d(loss)/d(logits) when
            ``compute_grad`` (in its own dtype; the arithmetic is fp32).
        targets: (M,) int64, contiguous. loss_rows: (M,) fp32, written. n_valid: () int64 on the same device.
    """
    m, v = logits.shape
    if m == 0:
        return
    block, num_warps = row_launch(min(v, _MAX_BLOCK), logits.element_size())
    # Triton launches on the current CUDA device and stream: make them logits' (tensors on another GPU).
    with device_guard(logits):
        _cross_entropy_rows_kernel[(m,)](
            logits,
            logits.stride(0),
            targets,
            loss_rows,
            n_valid,
            v,
            ignore_index,
            COMPUTE_GRAD=compute_grad,
            BLOCK=block,
            num_warps=num_warps,
        )
    _backend.record("cross_entropy_fwd_bwd")


def _accumulate_grad_weight(acc: torch.Tensor, dlogits_t: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """``acc (V, C) fp32 (+)= dlogits_t (V, M) @ h (M, C)`` in place, with no (V, C) temporary."""
    if dlogits_t.dtype == torch.float32:
        if first:
            torch.mm(dlogits_t, h, out=acc)
        else:
            acc.addmm_(dlogits_t, h)
    elif acc.is_cuda:
        # cuBLAS takes fp16/bf16 operands and reads/writes an fp32 C (out_dtype: PyTorch >= 2.8, CUDA only).
        if first:
            torch.mm(dlogits_t, h, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, dlogits_t, h, out_dtype=torch.float32, out=acc)
    else:
        # CPU has no mixed-dtype GEMM: upcast the chunk's operands ((V + C) x M, small), as cuBLAS would.
        if first:
            torch.mm(dlogits_t.float(), h.float(), out=acc)
        else:
            acc.addmm_(dlogits_t.float(), h.float())


def _linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and, as asked, the gradients of the mean loss (for an incoming gradient of 1).

    Args:
        hidden: (N, C) fp32/fp16/bf16. weight: (V, C), hidden's dtype and device. targets: (N,) int64.
        chunk_rows: rows per chunk, or 0 to choose from the shapes.
    Returns:
        loss: () fp32, nan when every target is ignored (like ``F.cross_entropy``);
        grad_hidden: (N, C) in hidden's dtype, or (0,) when not ``need_grad_hidden``;
        grad_weight: (V, C) in weight's dtype (accumulated in fp32), or (0,) when not ``need_grad_weight``.
    """
    n, c = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    targets = targets.contiguous()
    counted = targets != ignore_index
    # Checked on the device, so no host sync: on CUDA a bad target is a device-side assert (as in
    # F.cross_entropy), reported at the next synchronising call; on the CPU it raises here.
    torch._assert_async(
        (((targets >= 0) & (targets < v)) | ~counted).all(),
        f"linear_cross_entropy: targets must be in [0, {v}) or equal ignore_index={ignore_index}",
    )
    n_valid = counted.sum()
    loss_rows = torch.empty(n, dtype=torch.float32, device=dev)
    grad_hidden = torch.empty((n, c), dtype=hidden.dtype, device=dev) if need_grad_hidden else hidden.new_empty(0)
    acc = None
    if need_grad_weight:
        alloc = torch.empty if n > 0 else torch.zeros  # the first chunk overwrites it
        acc = alloc((v, c), dtype=torch.float32, device=dev)
    compute_grad = need_grad_hidden or need_grad_weight

    rows = _chunk_rows(n, c, v, chunk_rows)
    logits_buf = torch.empty((rows, v), dtype=hidden.dtype, device=dev)  # reused by every chunk
    weight_t = weight.t()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h = hidden[start:end]
        logits = logits_buf[: end - start]
        torch.mm(h, weight_t, out=logits)  # (M, V)
        _cross_entropy_rows(logits, targets[start:end], loss_rows[start:end], n_valid, ignore_index, compute_grad)
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])  # (M, C)
        if acc is not None:
            _accumulate_grad_weight(acc, logits.t(), h, first=start == 0)

    loss = loss_rows.sum() / n_valid  # 0 / 0 = nan when every target is ignored, as in PyTorch
    if acc is None:
        grad_weight = weight.new_empty(0)
    else:
        grad_weight = acc if weight.dtype == torch.float32 else acc.to(weight.dtype)
    return loss, grad_hidden, grad_weight


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, differentiable through register_autograd
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("gptkernels::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The matmuls run in the inputs' dtype: autocast (already applied by the public API) must not recast them.
    with torch.autocast(hidden.device.type, enabled=False):
        return _linear_cross_entropy_fwd(
            hidden, weight, targets, ignore_index, chunk_rows, need_grad_hidden, need_grad_weight
        )


@_linear_cross_entropy_fwd_op.register_fake
def _(hidden, weight, targets, ignore_index, chunk_rows, need_grad_hidden, need_grad_weight):
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape if need_grad_hidden else (0,))
    grad_weight = weight.new_empty(weight.shape if need_grad_weight else (0,))
    return loss, grad_hidden, grad_weight


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.need_grads = inputs[5], inputs[6]


def _linear_cross_entropy_backward(ctx, grad_loss, _grad_gh, _grad_gw):
    grad_hidden, grad_weight = ctx.saved_tensors
    need_hidden, need_weight = ctx.need_grads
    # grad_loss is a 0-dim fp32 tensor: the products keep the gradients' dtypes.
    dh = grad_hidden * grad_loss if need_hidden else None
    dw = grad_weight * grad_loss if need_weight else None
    return dh, dw, None, None, None, None, None


_linear_cross_entropy_fwd_op.register_autograd(
    _linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup_context
)


# ---------------------------------------------------------------------------------------------------------
# Boundary checks and the Triton path of the public API
# ---------------------------------------------------------------------------------------------------------

_OP = "linear_cross_entropy"


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    check_tensor(_OP, "hidden", hidden, ndim=2)
    # Under autocast the two may differ (fp32 weight, bf16 activations): both are cast before the kernel.
    autocast = torch.is_autocast_enabled(hidden.device.type)
    check_tensor(_OP, "weight", weight, ndim=2, device=hidden.device, like=None if autocast else hidden)
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
    grad_on = torch.is_grad_enabled()
    loss, _, _ = _linear_cross_entropy_fwd_op(
        hidden,
        weight,
        targets,
        ignore_index,
        _CHUNK_ROWS_OVERRIDE,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
    return loss


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
    _check_inputs(hidden, weight, targets, ignore_index)
    if use_triton(_OP, hidden.device, backend):
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        return _linear_cross_entropy_triton(hidden, weight, targets, ignore_index)
    return linear_cross_entropy_reference(hidden, weight, targets, ignore_index)
