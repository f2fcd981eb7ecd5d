"""Helpers shared by the ops: input checks at the boundary and launch-shape choices."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # plain tensors (``type(t) in TENSOR_TYPES``: fast checks)


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor,
    *,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    ndim: int | None = None,
    min_ndim: int | None = None,
    device: torch.device | None = None,
    like: torch.Tensor | None = None,
) -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``op`` and ``name`` when ``t`` is not what the kernel takes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if like is not None:
        device = like.device
        if t.dtype != like.dtype and dtypes is not None:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but the input has {like.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {device}")


def unsupported_dtype(t: torch.Tensor) -> str | None:
    """For ``use_triton``: a floating dtype the kernels do not take but the reference does (float64)."""
    if t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
        return f"the kernel does not take dtype {t.dtype}"
    return None


def check_last_dim(op: str, name: str, t: torch.Tensor, n: int) -> None:
    if t.shape[-1] != n:
        raise ValueError(f"{op}: {name} must have last dimension {n}, got shape {tuple(t.shape)}")


def rows_2d(op: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """View ``x`` (..., N) as (M, N) with unit stride along N, copying only when the layout demands it."""
    if x.dim() == 0:
        raise ValueError(f"{op}: {name} must have at least one dimension")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def rows_of(op: str, name: str, t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(t, M, row stride) for a launch over the rows of ``t`` (..., N), N > 0: ``t`` itself when contiguous (any
    leading shape: no reshape, whose host cost is a third of a small PyTorch op's), else its (M, N) rows view."""
    if not t.is_contiguous():
        if t.dim() == 0 or t.stride(-1) == 1:
            t = rows_2d(op, name, t)  # a view of the rows where their layout allows one
            return t, t.shape[0], t.stride(0)
        t = t.contiguous()  # e.g. the expanded gradient of a sum: rows_2d would copy it too
    n = t.shape[-1]
    return t, t.numel() // n, n


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and stream: make the device ``t``'s (a tensor on another GPU
    than the current one). A no-op for CPU tensors (Triton's interpreter) and for the current device."""
    if not t.is_cuda or t.get_device() == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(t.device)


def cdiv(a: int, b: int) -> int:
    """Ceiling division (triton.cdiv is a constexpr function: a few microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def max_registers(num_warps: int) -> int:
    """The launch option ``maxnreg``: all the registers a thread may have at ``num_warps`` (255 at most).

    No cap in effect, but without it ptxas sometimes settles for fewer registers and spills a few bytes
    (sm_80/sm_90: 48 registers and a 4-byte spill in LayerNorm's 4-warp forward, 64 and none with it).
    """
    return min(255, 65536 // (32 * num_warps))


def row_launch(n_cols: int, elem_size: int, max_fused_bytes: int = 64 * 1024) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for kernels that hold one row of ``n_cols`` elements in registers."""
    block = next_power_of_2(n_cols)
    if block * elem_size > max_fused_bytes:
        raise ValueError(f"row width {n_cols} is larger than the fused kernel supports ({max_fused_bytes} bytes)")
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps
