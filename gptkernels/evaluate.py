"""Loss, perplexity and bits per byte of a model on held-out tokens, and the ``python -m gptkernels.evaluate`` command.

Sliding windows score every token exactly once: window ``w`` reads ``max_length`` tokens starting at
``w * stride`` and predicts the token after each of them, but only the predictions not already made by an
earlier window count (Hugging Face's "perplexity of fixed-length models" recipe). ``stride == max_length``
is fastest (each prediction sees on average half a window of context); a smaller stride gives every
prediction more context and a lower, fairer perplexity at the cost of more windows.

Usage::

    python -m gptkernels.evaluate --checkpoint out/ --data builtin
    python -m gptkernels.evaluate --checkpoint out/ --task hellaswag=hellaswag_val.jsonl --limit 1000
    python -m gptkernels.evaluate --checkpoint out/ckpt_000300.pt --data notes.txt --stride 64 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .checkpoint import load_checkpoint, model_from_state, tokenizer_from_state
from .cli import UsageError, cli_main, resolve_device
from .tokenizer import bits_per_byte, token_byte_lengths

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def window_starts(n_targets: int, max_length: int, stride: int) -> list[int]:
    """Start positions of the sliding windows over a text with ``n_targets`` next-token predictions.

    Windows are all ``min(max_length, n_targets)`` long; the last one ends exactly at the end of the text.
    """
    length = min(max_length, n_targets)
    starts, b = [], 0
    while b + length < n_targets:
        starts.append(b)
        b += stride
    starts.append(n_targets - length)
    return starts


def _batches(tokens: Any, max_length: int, stride: int, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """(x, y) batches in which already-scored targets are -100 (ignored by the loss)."""
    n_targets = len(tokens) - 1
    length = min(max_length, n_targets)
    scored_upto = 0  # targets are token positions 1..n_targets; positions <= scored_upto are done
    xs, ys = [], []
    for b in window_starts(n_targets, max_length, stride):
        w = torch.from_numpy(np.asarray(tokens[b : b + length + 1]).astype(np.int64))
        x, y = w[:-1], w[1:].clone()
        seen = scored_upto - b  # window targets are positions b+1 .. b+length
        if seen > 0:
            y[:seen] = -100
        scored_upto = b + length
        xs.append(x)
        ys.append(y)
        if len(xs) == batch_size:
            yield torch.stack(xs), torch.stack(ys)
            xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: Any,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: Any = None,
    *,
    autocast_dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    tokenizer: Any = None,
) -> dict[str, float]:
    """Mean next-token loss (nats) and perplexity of ``model`` over ``tokens``, every prediction counted once.

    Args:
        model: a :class:`gptkernels.GPT` (not a DDP/compiled wrapper), called as ``model(x, y, return_logits=False)``.
        tokens: 1-D int array, memmap or tensor of at least 2 tokens.
        max_length: window length (at most the model's context length).
        stride: distance between window starts, 1..max_length (default max_length: no overlap).
        batch_size: windows per forward pass.
        device: where to run (default: the model's device).
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (None: no autocast).
        max_tokens: only the first ``max_tokens`` tokens.
        progress: called as ``progress(windows_done, windows_total)``.
        tokenizer: the tokenizer of ``tokens``; when given, the result also has ``bytes`` (UTF-8 bytes of the
            scored tokens) and ``bpb`` (bits per byte: comparable between tokenizers, unlike perplexity).
    Returns:
        ``{"loss", "ppl", "tokens" (predictions scored), "windows"}``, plus ``{"bytes", "bpb"}`` with a tokenizer.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise ValueError(f"need at least 2 tokens to score a next-token prediction, got {len(tokens)}")
    ctx = model.config.context_length
    if not 1 <= max_length <= ctx:
        raise ValueError(f"max_length must be in [1, context_length={ctx}], got {max_length}")
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}] so every token is scored, got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n_windows = len(window_starts(len(tokens) - 1, max_length, stride))
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer)) if tokenizer is not None else None
    was_training = model.training
    model.eval()
    total, count, done, n_bytes = 0.0, 0, 0, 0
    try:
        for x, y in _batches(tokens, max_length, stride, batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n = int((y != -100).sum())
            if byte_lengths is not None:
                n_bytes += int(byte_lengths[y[y != -100].cpu()].sum())
            with amp:
                _, loss = model(x, y, return_logits=False)
            total += float(loss) * n  # the model's loss is the mean over counted targets
            count += n
            done += len(x)
            if progress is not None:
                progress(done, n_windows)
    finally:
        model.train(was_training)
    mean = total / count
    result = {"loss": mean, "ppl": perplexity(mean), "tokens": count, "windows": n_windows}
    if byte_lengths is not None:
        result.update(bytes=n_bytes, bpb=bits_per_byte(total, n_bytes))
    return result


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .cli import OneLineErrorParser

    p = OneLineErrorParser(
        prog="python -m gptkernels.evaluate",
        description="Loss, perplexity and bits per byte of a trained model on held-out text (every token scored "
        "once), and multiple-choice benchmarks (--task).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file or a training output folder (newest)")
    src.add_argument("--hf", metavar="FOLDER", help="a Hugging Face GPT-2 folder (GPT2LMHeadModel) instead")
    p.add_argument("--data", action="append", metavar="SOURCE", help="text to score (repeatable); see train")
    p.add_argument(
        "--task",
        action="append",
        metavar="NAME[=SOURCE]",
        help="a multiple-choice benchmark (repeatable): hellaswag, arc_easy or arc_challenge, each =FILE.jsonl (the "
        "official format) or =hf:NAME[:CONFIG]; a bare name reads the hub. Prints one table of every result",
    )
    p.add_argument("--limit", type=int, help="score at most this many examples of each --task")
    p.add_argument(
        "--split",
        choices=("auto", "val", "train", "all"),
        default="auto",
        help="which tokens: the validation split, the training split or all of them. auto (default): 'val' "
        "when --data names the checkpoint's training data (the same split as in training), else 'all'",
    )
    p.add_argument("--max-length", type=int, help="window length (default: the model's context length)")
    p.add_argument("--stride", type=int, help="window step, 1..max-length (default: max-length)")
    p.add_argument(
        "--batch-size", type=int, default=8, help="windows (or --task endings) per forward pass (default: 8)"
    )
    p.add_argument("--max-tokens", type=int, help="read at most this many tokens of the data")
    p.add_argument("--tokenizer", help="with --hf: the tokenizer (default gpt2); a checkpoint brings its own")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype (default fp32)")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto", help="(default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"--{name} must be a positive integer, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_length", "stride", "batch_size", "max_tokens", "limit"):
        _check_positive(name.replace("_", "-"), getattr(args, name))
    if not args.data and not args.task:
        raise UsageError("give --data (text to score) or --task (a benchmark), or both")
    if args.limit is not None and not args.task:
        raise UsageError("--limit goes with --task (use --max-tokens to shorten --data)")
    if args.task:
        from .evaluation import parse_task

        for spec in args.task:
            parse_task(spec)  # a bad task name fails before the model loads
    device = resolve_device(args.device)
    from .data import load_tokens
    from .generation import check_kernels, check_vocab

    check_kernels(args.kernels, device)
    if args.checkpoint is not None:
        state = load_checkpoint(args.checkpoint)
        model = model_from_state(state, device=device, kernels=args.kernels)
        tokenizer = tokenizer_from_state(state)
        train_args = state.get("args", {})
        label = state["path"]
    else:
        from .model import GPT
        from .tokenizer import get_tokenizer

        model = GPT.from_hf(args.hf, kernels=args.kernels).to(device).eval()
        tokenizer = get_tokenizer(args.tokenizer or "gpt2")
        train_args, label = {}, args.hf
    check_vocab(model, tokenizer)
    if args.tokenizer is not None and args.checkpoint is not None:
        raise UsageError("--tokenizer goes with --hf; a checkpoint uses the tokenizer it was trained with")
    if args.dtype == "fp16" and device.type != "cuda":
        raise UsageError("--dtype fp16 needs a CUDA device; use bf16 or fp32 on the CPU")

    if not args.data:
        return _print_tasks(args, model, tokenizer, device, label, None)
    split = args.split
    same_data = list(args.data) == list(train_args.get("data") or [])
    if split == "auto":
        split = "val" if same_data else "all"
    val_fraction = float(train_args.get("val_fraction", 0.1)) if split != "all" else 0.0
    max_tokens = args.max_tokens if args.max_tokens is not None else train_args.get("max_tokens") if same_data else None
    data = load_tokens(args.data, tokenizer, val_fraction=val_fraction, max_tokens=max_tokens)
    tokens = data.val if split == "val" else data.train
    if split == "val" and len(tokens) < 2:
        raise UsageError(f"the validation split of {args.data} is empty; pass --split all")

    max_length = args.max_length or model.config.context_length
    if max_length > model.config.context_length:
        raise UsageError(f"--max-length {max_length} exceeds the model's context length {model.config.context_length}")
    if args.stride is not None and args.stride > max_length:
        raise UsageError(f"--stride {args.stride} must be at most --max-length {max_length} so every token counts")
    result = evaluate_tokens(
        model,
        tokens,
        max_length,
        args.stride,
        args.batch_size,
        device,
        autocast_dtype=AUTOCAST_DTYPES[args.dtype],
        tokenizer=tokenizer,
    )
    result.update(split=split, data=list(args.data), model=label, max_length=max_length)
    result["stride"] = args.stride or max_length
    if args.task:
        return _print_tasks(args, model, tokenizer, device, label, result)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{label}: loss {result['loss']:.4f}, perplexity {result['ppl']:.2f}, bits per byte {result['bpb']:.4f} "
            f"({result['tokens']:,} tokens of the {split} split of {', '.join(args.data)}; "
            f"{result['windows']:,} windows of {max_length}, stride {result['stride']})"
        )
    sys.stdout.flush()
    return 0


def _print_tasks(
    args: argparse.Namespace, model: Any, tokenizer: Any, device: Any, label: str, data: dict[str, Any] | None
) -> int:
    """Run every --task and print one table (or one JSON object) with them and the --data result, if any."""
    from .evaluation import run_task

    tasks = {}
    for spec in args.task:
        r = run_task(
            spec,
            model,
            tokenizer,
            limit=args.limit,
            batch_size=args.batch_size,
            device=device,
            autocast_dtype=AUTOCAST_DTYPES[args.dtype],
        )
        key = r["task"] if r["task"] not in tasks else f"{r['task']}={r['source']}"  # one task on two sources
        tasks[key] = {k: v for k, v in r.items() if k not in ("task", "loglikelihoods")}
    if args.json:
        print(json.dumps({**(data or {}), "model": label, "tasks": tasks}))
    else:
        rows = []
        if data is not None:
            name = f"{', '.join(data['data'])} ({data['split']})"
            rows += [(name, m, f"{data[m]:.4f}", f"{data['tokens']:,} tokens") for m in ("loss", "ppl", "bpb")]
        for name, r in tasks.items():
            rows += [(name, m, f"{r[m]:.4f}", f"{r['n']:,}") for m in ("acc", "acc_norm")]
        print(f"{label}\n{format_table(('task', 'metric', 'value', 'n'), rows)}")
    sys.stdout.flush()
    return 0


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


if __name__ == "__main__":
    cli_main(main)
