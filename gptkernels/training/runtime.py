"""Where and how a run executes: device, precision, processes, and its data and tokenizer."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..cli import UsageError, resolve_device
from .metrics import plural

# bf16 dense tensor-core peaks (FLOP/s) for MFU; a GPU not listed gets no MFU.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


def resolve_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UsageError("--dtype fp16 needs CUDA (its GradScaler is CUDA-only); use bf16 or fp32 on the CPU")
    return name


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def init_distributed(device_name: str, timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts torch.distributed when launched by torchrun with several processes.

    ``timeout_s`` bounds every collective: a rank that dies or is stopped (SIGSTOP, a hung GPU) makes the others
    fail after that long instead of gloo's 30 minutes (NCCL's 10)."""
    world = world_size()
    if world <= 1:
        return 0, 1, resolve_device(device_name)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        import datetime

        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return rank, world, device


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def choose_threads(requested: int | None, local_processes: int = 1) -> tuple[int, str]:
    """``(threads, why)`` for PyTorch's CPU ops in each of ``local_processes`` processes on this machine.

    ``requested`` (--threads) wins, then ``OMP_NUM_THREADS``; otherwise the cores this process may use minus the
    1-minute load average (other work), shared between the local processes, at least 1. More threads than free
    cores is much slower than fewer: the threads wait for each other at every op (oversubscription).
    """
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        load = 0.0
    free = max(1, min(cores, cores - round(load)))
    n = max(1, free // max(1, local_processes))
    return n, f"{plural(cores, 'core')}, load average {load:.2f}"


def load_data(data: list[str], tokenizer: str | None, val_fraction: float, max_tokens: int | None, spec: Any = None):
    """(tokenizer, TokenSplit); a resumed run passes its checkpoint's tokenizer ``spec`` to rebuild it.

    ``tokenizer`` None is a prepared folder's own tokenizer (gpt2 for raw text); char and bpe:<N> are trained on
    the raw sources, or taken from a prepared folder made with them (:func:`gptkernels.data.resolve_tokenizer`).
    """
    from ..data import load_tokens, resolve_tokenizer
    from ..tokenizer import tokenizer_from_spec

    tok = tokenizer_from_spec(spec) if spec is not None else resolve_tokenizer(tokenizer, data)
    split = load_tokens(data, tok, val_fraction=val_fraction, max_tokens=max_tokens)
    return tok, split
