"""``python -m gptkernels.train``: train a GPT on text, with crash-safe checkpoints, resume and evaluation.

With no arguments it trains the ``tiny`` preset (3.6M parameters) on the built-in corpus (CPython's own
documentation, ~139k GPT-2 tokens) on the best device there is, for ``--max-steps 300``: about three minutes
on a 2-core CPU, ending with a validation loss far below the ln(50257) ≈ 10.8 of an untrained model. It
writes into ``--out-dir`` (default ``out/``):

- ``ckpt_<step>.pt``: the newest two checkpoints (every ``--save-steps``, at the end, and on Ctrl-C);
- ``metrics.jsonl``: one JSON object per logged step (``step, tokens, train_loss, ppl, lr, grad_norm,
  tokens_per_s``, on CUDA ``mfu`` and ``peak_mem_gb``) and per evaluation (``step, tokens, val_loss, val_ppl``);
- ``loss.png``: train and validation loss against tokens seen; ``run.json``: options, model and data.

Safety: an ``--out-dir`` that already holds checkpoints is never overwritten; the command stops with an
error unless ``--resume`` (continue that run) or ``--overwrite`` (delete its checkpoints, metrics and
picture, then start afresh) is given.

Schedule: AdamW (fused on CUDA; weight decay on matrices only), linear warmup for
``min(--warmup-steps, 10% of the run's steps)`` steps, then cosine decay to 10% of ``--learning-rate``.
Training stops after ``--num-epochs`` passes over the training windows or ``--max-steps`` optimizer
steps, whichever comes first (``--max-steps 0``: no step limit). Validation runs before the first step,
every ``--eval-steps`` (by default 500, or a quarter of the run when that is shorter) and after the last
step, and prints a sample from ``--sample-prompt``.

Resume: ``--resume`` continues from the newest checkpoint of ``--out-dir`` with the options it was started
with (options given again on the command line override them), the same step, learning rate, data order
and random state; in fp32 the resumed run's losses equal the uninterrupted run's exactly.

Exit status: 0 done; 1 the loss became NaN/inf (the last good checkpoint is kept); 2 bad command line,
data or output folder (one ``error: ...`` line, nothing written); 130 interrupted by Ctrl-C (SIGINT) or
143 by SIGTERM, after saving a checkpoint to resume from.

Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N -m gptkernels.train ...`` runs
DistributedDataParallel (NCCL on CUDA, gloo on CPU). ``--batch-size`` is per process: each optimizer step
reads ``batch_size × processes × grad_accum`` windows, every process its own slice, so the run matches a
single process with that global batch. Only rank 0 writes files. For models that do not fit one GPU,
shard them with ``torch.distributed.fsdp`` (FSDP2 ``fully_shard``); this command does not do that for you.

``--trainer hf`` trains the same model with ``transformers.Trainer`` instead (see :mod:`gptkernels.hf_trainer`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    atomic_write_bytes,
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .cli import OneLineErrorParser, UsageError, cli_main, resolve_device
from .config import PRESETS, GPTConfig
from .evaluate import evaluate_tokens, perplexity

MODEL_KEYS = ("emb_dim", "n_heads", "n_layers", "context_length", "drop_rate", "qkv_bias")
ARCH_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "layer_norm_eps")
OUTPUT_FILES = ("metrics.jsonl", "loss.png", "run.json", "hf", "gpt2", "hf_summary.json")  # what runs write

DEFAULTS: dict[str, Any] = dict(
    config=None,
    trainer="native",
    # model
    preset="tiny",
    emb_dim=None,
    n_heads=None,
    n_layers=None,
    context_length=None,
    drop_rate=None,
    qkv_bias=None,
    kernels="auto",
    # data
    data=["builtin"],
    tokenizer="gpt2",
    max_length=None,
    stride=None,
    shift="explicit",
    val_fraction=0.1,
    max_tokens=None,
    # training
    learning_rate=5e-4,
    batch_size=8,
    num_epochs=10,
    max_steps=300,
    grad_accum=1,
    warmup_steps=1000,
    weight_decay=0.01,
    gradient_clipping=1.0,
    dtype="auto",
    compile=False,
    seed=123,
    device="auto",
    # logging, evaluation, output
    log_steps=10,
    eval_steps=None,  # 500, or a quarter of the run when that is shorter: see default_eval_steps
    save_steps=1000,
    eval_max_tokens=None,
    sample_prompt="The value of",
    sample_tokens=40,
    out_dir="out",
    resume=False,
    overwrite=False,
    wandb=False,
    wandb_project="gptkernels",
    wandb_run_name=None,
)
# Options that say how to run this command rather than what to train: never stored in a checkpoint.
NOT_STORED = ("config", "resume", "overwrite")

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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------------------
# Command line and config file
# ---------------------------------------------------------------------------------------------------------


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m gptkernels.train",
        description="Train a GPT-2-style model. With no options: the tiny preset on the built-in corpus for 300\n"
        "steps (about 3 minutes on a 2-core CPU), writing checkpoints, metrics.jsonl and loss.png into out/.\n"
        "Every option can also come from --config FILE (JSON or YAML); the command line wins.",
        argument_default=argparse.SUPPRESS,  # only options actually given, so that file < command line works
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 done, 1 loss became NaN/inf, 2 bad input, 130/143 interrupted (checkpoint saved).\n"
        "Multi-GPU: torchrun --nproc_per_node=N -m gptkernels.train ... (--batch-size is per process).",
    )

    def add(group, name: str, help: str, **kw: Any) -> None:
        key = name.lstrip("-").replace("-", "_")
        default = DEFAULTS[key]
        shown = " ".join(default) if isinstance(default, list) else default
        if default is None:
            shown = "the preset's" if key in MODEL_KEYS else "none"
        group.add_argument(name, help=f"{help} (default: {shown})", **kw)

    g = p.add_argument_group("run")
    add(g, "--config", "JSON or YAML file with any of these options as keys (learning_rate or learning-rate)")
    add(g, "--trainer", "native: this package's loop; hf: transformers.Trainer", choices=("native", "hf"))

    g = p.add_argument_group("model")
    add(g, "--preset", "model size: " + ", ".join(PRESETS), choices=sorted(PRESETS))
    add(g, "--emb-dim", "width of the residual stream (overrides the preset)", type=_positive_int)
    add(g, "--n-heads", "attention heads (overrides the preset)", type=_positive_int)
    add(g, "--n-layers", "transformer blocks (overrides the preset)", type=_positive_int)
    add(g, "--context-length", "longest sequence the model can see (overrides the preset)", type=_positive_int)
    add(g, "--drop-rate", "dropout probability (overrides the preset)", type=float)
    add(g, "--qkv-bias", "bias in the q/k/v projection (overrides the preset)", action=argparse.BooleanOptionalAction)
    add(
        g,
        "--kernels",
        "fused Triton kernels or PyTorch ops; auto: kernels where they run",
        choices=("auto", "triton", "torch"),
    )

    g = p.add_argument_group("data")
    add(
        g,
        "--data",
        "training text (repeatable): a text file, a folder, 'builtin', hf:NAME[:CONFIG], or a folder from "
        "python -m gptkernels.prepare",
        action="append",
        metavar="SOURCE",
    )
    add(g, "--tokenizer", "gpt2, char, or hf:<folder>", metavar="NAME")
    add(g, "--max-length", "tokens per training window; none: the context length", type=_positive_int)
    add(g, "--stride", "step between window starts (none: max-length, no overlap)", type=_positive_int)
    add(
        g,
        "--shift",
        "explicit: targets are the inputs shifted by one; implicit: shift inside the loss (HF style)",
        choices=("explicit", "implicit"),
    )
    add(g, "--val-fraction", "last fraction of the corpus held out for validation (0: none)", type=float)
    add(g, "--max-tokens", "read at most this many tokens", type=_positive_int)

    g = p.add_argument_group("training")
    add(g, "--learning-rate", "peak AdamW learning rate", type=float)
    add(g, "--batch-size", "windows per micro-batch, per process", type=_positive_int)
    add(g, "--num-epochs", "passes over the training windows", type=_positive_int)
    add(
        g,
        "--max-steps",
        "stop after this many optimizer steps; 0: no limit (train --num-epochs)",
        type=_non_negative_int,
    )
    add(g, "--grad-accum", "micro-batches per optimizer step", type=_positive_int)
    add(g, "--warmup-steps", "linear warmup steps, capped at 10%% of the run's steps", type=_non_negative_int)
    add(g, "--weight-decay", "AdamW weight decay on weight matrices (not biases, LayerNorm, embeddings)", type=float)
    add(g, "--gradient-clipping", "clip the gradient norm to this; 0: no clipping", type=float)
    add(
        g,
        "--dtype",
        "autocast precision; auto: bf16 on CUDA, fp32 on CPU; fp16 needs CUDA",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    add(g, "--compile", "torch.compile the model", action="store_true")
    add(g, "--seed", "seed for weights, data order and dropout", type=int)
    add(g, "--device", "auto (cuda if available), cpu, cuda, cuda:1, ...")

    g = p.add_argument_group("logging, evaluation and output")
    add(g, "--log-steps", "log metrics every this many steps", type=_positive_int)
    add(
        g,
        "--eval-steps",
        "evaluate every this many steps, and before the first and after the last; none: 500, or a quarter of "
        "the run when that is shorter",
        type=_positive_int,
    )
    add(g, "--save-steps", "checkpoint every this many steps (also at the end)", type=_positive_int)
    add(g, "--eval-max-tokens", "score at most this many validation tokens (none: all)", type=_positive_int)
    add(g, "--sample-prompt", "text continued at each evaluation")
    add(g, "--sample-tokens", "tokens sampled at each evaluation; 0: no sample", type=_non_negative_int)
    add(g, "--out-dir", "folder for checkpoints, metrics.jsonl and loss.png")
    add(g, "--resume", "continue the run in --out-dir from its newest checkpoint", action="store_true")
    add(g, "--overwrite", "delete the checkpoints, metrics and picture already in --out-dir first", action="store_true")
    add(
        g,
        "--wandb",
        "also log to Weights & Biases (WANDB_MODE=offline works); without it wandb is not imported",
        action="store_true",
    )
    add(g, "--wandb-project", "W&B project")
    add(g, "--wandb-run-name", "W&B run name")
    return p


def _coerce(key: str, value: Any, types: dict[str, Any]) -> Any:
    """A config-file value checked against the command-line option's type (YAML reads 5e-4 as a string)."""
    if value is None:
        return None
    default = DEFAULTS[key]
    if isinstance(default, bool) or key == "qkv_bias":
        if not isinstance(value, bool):
            raise UsageError(f"config: {key} must be true or false, got {value!r}")
        return value
    if key == "data":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"config: data must be a source or a list of sources, got {value!r}")
        return value
    conv = types.get(key) or str
    wrong = isinstance(value, bool) or (isinstance(value, float) and conv is not float)
    if wrong or (conv is str and not isinstance(value, str)):
        kind = {str: "string", float: "number"}.get(conv, "integer")
        raise UsageError(f"config: {key} must be a {kind}, got {value!r}")
    try:
        value = conv(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UsageError(f"config: {key}: {e}") from None
    return value


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:
        raise UsageError(f"--config {path}: cannot parse: {' '.join(str(e).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    types = {a.dest: a.type for a in parser._actions if a.dest in DEFAULTS}
    out = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key not in DEFAULTS or key == "config":
            raise UsageError(f"--config {path}: unknown option {k!r}")
        choices = next((a.choices for a in parser._actions if a.dest == key), None)
        v = _coerce(key, v, types)
        if choices is not None and v is not None and v not in choices:
            raise UsageError(f"--config {path}: {key} must be one of {sorted(choices)}, got {v!r}")
        out[key] = v
    return out


def resolve_options(argv: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Options from defaults < checkpoint (with --resume) < --config file < command line, and the checkpoint."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    from_file = read_config_file(given["config"], parser) if given.get("config") else {}
    first = {**DEFAULTS, **from_file, **given}
    state = None
    if first["resume"]:
        if first["overwrite"]:
            raise UsageError("--resume and --overwrite contradict each other; pick one")
        out = Path(first["out_dir"])
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out-dir {out} is a file, not a folder")
        if first["trainer"] == "hf":
            return first, None  # transformers.Trainer finds its own checkpoints
        if latest_checkpoint(out) is None:
            raise UsageError(f"--resume: no checkpoint (ckpt_*.pt) in {out} to resume from")
        state = load_checkpoint(out)
        stored = {k: v for k, v in state.get("args", {}).items() if k in DEFAULTS and k not in NOT_STORED}
        if "preset" in from_file or "preset" in given:  # a preset named again: the stored sizes do not apply
            stored = {k: v for k, v in stored.items() if k not in MODEL_KEYS}
        first = {**DEFAULTS, **stored, **from_file, **given}
    return first, state


def check_options(o: dict[str, Any]) -> None:
    if not o["learning_rate"] > 0:
        raise UsageError(f"--learning-rate must be positive, got {o['learning_rate']}")
    if o["weight_decay"] < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {o['weight_decay']}")
    if o["gradient_clipping"] < 0:
        raise UsageError(f"--gradient-clipping must be >= 0 (0: off), got {o['gradient_clipping']}")
    if not 0 <= o["val_fraction"] < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {o['val_fraction']}")
    if o["drop_rate"] is not None and not 0 <= o["drop_rate"] < 1:
        raise UsageError(f"--drop-rate must be in [0, 1), got {o['drop_rate']}")
    if not o["data"]:
        raise UsageError("--data: no training data given")
    if o["overwrite"] and o["resume"]:
        raise UsageError("--resume and --overwrite contradict each other; pick one")


def model_config(o: dict[str, Any], vocab_size: int) -> GPTConfig:
    overrides = {k: o[k] for k in MODEL_KEYS if o.get(k) is not None}
    try:
        return GPTConfig.preset(o["preset"], vocab_size=vocab_size, kernels=o["kernels"], **overrides)
    except ValueError as e:
        raise UsageError(f"model: {e}") from None


def check_out_dir(o: dict[str, Any]) -> Path:
    """The output folder, refusing to clobber another run: see the module docstring."""
    out = Path(o["out_dir"])
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file, not a folder")
    existing = list_checkpoints(out) + sorted(out.glob("checkpoint-*")) if out.is_dir() else []
    if existing and not (o["resume"] or o["overwrite"]):
        raise UsageError(
            f"--out-dir {out} already holds a run ({existing[-1].name}); pass --resume to continue it, "
            "--overwrite to start over, or another --out-dir"
        )
    return out


def clear_out_dir(out: Path) -> None:
    """--overwrite: remove what a previous run wrote (and nothing else)."""
    for p in list_checkpoints(out) + sorted(out.glob("checkpoint-*")):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name in OUTPUT_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ---------------------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------------------


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warmup shrinks for short runs: at most 10% of the run."""
    return min(warmup_steps, int(0.1 * total_steps))


def default_eval_steps(total_steps: int) -> int:
    """Without --eval-steps: every 500 steps, but at least four evaluations (plus the one before training)."""
    return min(500, max(1, total_steps // 4))


def lr_factor(step: int, warmup: int, total: int, final: float = 0.1) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear warmup, cosine down
    to ``final`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts torch.distributed when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_name)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def fmt_duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


class MetricsFile:
    """``metrics.jsonl``: one JSON object per line, flushed per row. On resume, rows after the checkpoint's step
    (written by the run that crashed) are dropped so that every step appears once."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None or not path.exists():
            path.write_text("", encoding="utf-8")
        else:
            from .plotting import read_metrics

            keep = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            data = "".join(json.dumps(r) + "\n" for r in keep).encode()
            atomic_write_bytes(path, lambda f: f.write(data))
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class WandbLogger:
    """Weights & Biases, imported only with --wandb (WANDB_MODE=offline keeps everything local)."""

    def __init__(self, o: dict[str, Any], config: dict[str, Any], out: Path, run_id: str | None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise UsageError("--wandb needs the wandb package: pip install wandb") from e
        self.wandb = wandb
        self.run = wandb.init(
            project=o["wandb_project"],
            name=o["wandb_run_name"],
            config=config,
            dir=os.environ.get("WANDB_DIR") or str(out),
            id=run_id,
            resume="allow" if run_id else None,
        )

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def finish(self, checkpoint: Path | None, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            self.run.summary[k] = v
        if checkpoint is not None:
            art = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata=summary)
            art.add_file(str(checkpoint))
            self.run.log_artifact(art)
        self.run.finish()


def load_data(o: dict[str, Any], tokenizer_spec: dict[str, Any] | None):
    """(tokenizer, TokenSplit) for the options; a resumed run rebuilds the checkpoint's tokenizer."""
    from .data import iter_documents, load_tokens
    from .tokenizer import get_tokenizer, tokenizer_from_spec

    if tokenizer_spec is not None:
        tok = tokenizer_from_spec(tokenizer_spec)
    elif o["tokenizer"] == "char":
        tok = get_tokenizer("char", text=iter_documents(o["data"]))
    else:
        tok = get_tokenizer(o["tokenizer"])
    split = load_tokens(o["data"], tok, val_fraction=o["val_fraction"], max_tokens=o["max_tokens"])
    return tok, split


# ---------------------------------------------------------------------------------------------------------
# The native training loop
# ---------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, o: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.o, self.state = o, state
        self.rank, self.world, self.device = init_distributed(o["device"])
        self.main = self.rank == 0
        self.dtype = resolve_dtype(o["dtype"], self.device)
        self.stop_signal: int | None = None
        self.wandb: WandbLogger | None = None
        self.last_eval: dict[str, Any] | None = None

    def print(self, *args: Any) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
            sys.stdout.flush()

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from .data import WindowDataset
        from .model import GPT
        from .tokenizer import tokenizer_to_spec

        o, state = self.o, self.state
        out = check_out_dir(o)
        self.out = out
        self.tokenizer, self.split = load_data(o, state["tokenizer"] if state else None)
        self.cfg = model_config(o, self.tokenizer.n_vocab)
        if state is not None and "optimizer" not in state:
            raise UsageError(f"--resume: {state['path']} was written by --trainer hf; resume it with --trainer hf")
        if state is not None:
            theirs = state["config"]
            diff = [
                f"{k}={theirs.get(k)!r} there, {getattr(self.cfg, k)!r} here"
                for k in ARCH_KEYS
                if theirs.get(k) != getattr(self.cfg, k)
            ]
            if diff:
                raise UsageError(f"--resume: {state['path']} is another architecture ({'; '.join(diff)})")
        if self.cfg.kernels == "triton":
            from .ops._backend import why_not_triton

            reason = why_not_triton(self.device)
            if reason is not None:
                raise UsageError(f"--kernels triton: {reason}")
        L = o["max_length"] or self.cfg.context_length
        if L > self.cfg.context_length:
            raise UsageError(f"--max-length {L} exceeds the model's --context-length {self.cfg.context_length}")
        self.max_length = L
        try:
            self.windows = WindowDataset(self.split.train, L, o["stride"], o["shift"])
        except ValueError as e:
            raise UsageError(f"training split too small: {e}; use a smaller --max-length or more --data") from None
        self.global_batch = o["batch_size"] * self.world * o["grad_accum"]
        n = len(self.windows)
        if self.global_batch > n:
            raise UsageError(
                f"a step needs --batch-size {o['batch_size']} × {self.world} process(es) × --grad-accum "
                f"{o['grad_accum']} = {self.global_batch} windows but the training split has only {n} windows of "
                f"{L} tokens; use a smaller --batch-size or --max-length, or more --data"
            )
        self.steps_per_epoch = n // self.global_batch
        epoch_steps = o["num_epochs"] * self.steps_per_epoch
        self.total_steps = min(epoch_steps, o["max_steps"]) if o["max_steps"] else epoch_steps
        self.warmup = effective_warmup(o["warmup_steps"], self.total_steps)
        self.eval_steps = o["eval_steps"] or default_eval_steps(self.total_steps)

        # Same initial weights on every rank; dropout streams differ per rank.
        torch.manual_seed(o["seed"])
        self.model = GPT(self.cfg).to(self.device)
        self.opt = self.model.configure_optimizer(o["learning_rate"], o["weight_decay"])
        warmup, total = self.warmup, self.total_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, warmup, total))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")
        self.step, self.epoch, self.offset, self.tokens = 0, 0, 0, 0
        self.pending = {"loss_sum": 0.0, "steps": 0}
        torch.manual_seed(o["seed"] + self.rank)
        if state is not None:
            self.restore(state)
        self.tokenizer_spec = tokenizer_to_spec(self.tokenizer)

        train_model: torch.nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if o["compile"]:
            train_model = torch.compile(train_model)
        self.train_model = train_model
        self.amp = self.dtype in ("bf16", "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.dtype)
        self.peak = peak_flops(self.device)
        self.flops_per_token = self.model.flops_per_token(L)
        self._perm_epoch, self._perm = -1, None

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.offset = state["step"], state["epoch"], state["batch_index"]
        self.tokens = state["tokens"]
        self.pending = dict(state.get("pending", self.pending))
        rngs = state.get("rng", [])
        if self.rank < len(rngs):
            set_rng_state(rngs[self.rank], self.device)

    def describe(self) -> dict[str, Any]:
        s = self.split.stats
        return {
            "parameters": self.model.num_params(),
            "model": self.cfg.to_dict(),
            "data": {
                "sources": list(self.o["data"]),
                "documents": s.get("documents"),
                "tokens": s.get("tokens"),
                "train_tokens": s.get("train_tokens"),
                "val_tokens": s.get("val_tokens"),
                "train_windows": len(self.windows),
                "max_length": self.max_length,
                "stride": self.windows.stride,
            },
            "schedule": {
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "global_batch": self.global_batch,
                "tokens_per_step": self.global_batch * self.max_length,
                "warmup_steps": self.warmup,
                "world_size": self.world,
                "device": str(self.device),
                "dtype": self.dtype,
            },
        }

    # -- data ---------------------------------------------------------------------------------------------
    def next_indices(self) -> torch.Tensor:
        """This step's global batch: the next ``global_batch`` windows of the epoch's seeded permutation."""
        n = len(self.windows)
        if self.offset + self.global_batch > n:  # the rest of the epoch is too short for a step: next epoch
            self.epoch, self.offset = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.o["seed"] * 100_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g), self.epoch
        idx = self._perm[self.offset : self.offset + self.global_batch]
        self.offset += self.global_batch
        return idx

    def micro_batch(self, idx: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        from .model import shift_labels

        B = self.o["batch_size"]
        start = (micro * self.world + self.rank) * B  # micro-batches in order, each split across the ranks
        items = [self.windows[int(i)] for i in idx[start : start + B]]
        if self.o["shift"] == "explicit":
            x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
        else:
            x = torch.stack([d["input_ids"] for d in items])
            y = shift_labels(torch.stack([d["labels"] for d in items]))
        pin = self.device.type == "cuda"
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)

    # -- one optimizer step -------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.o
        idx = self.next_indices()
        loss_sum = torch.zeros((), device=self.device)
        accum = o["grad_accum"]
        for micro in range(accum):
            x, y = self.micro_batch(idx, micro)
            sync = micro == accum - 1 or self.world == 1
            no_sync = contextlib.nullcontext() if sync else self._no_sync()
            amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp else contextlib.nullcontext()
            with no_sync:
                with amp:
                    _, loss = self.train_model(x, y, return_logits=False)
                loss = loss / accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.opt)
        clip = o["gradient_clipping"] if o["gradient_clipping"] > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # norm before clipping
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        self.tokens += self.global_batch * self.max_length
        return loss_sum, grad_norm

    def _no_sync(self):
        m = self.train_model
        m = getattr(m, "_orig_mod", m)
        return m.no_sync()

    def _all_mean(self, values: list[float] | torch.Tensor) -> list[float]:
        t = torch.as_tensor(values, dtype=torch.float64).to(self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    def _sync_pending(self, loss_acc: torch.Tensor, n: int, grad_bad: torch.Tensor) -> bool:
        """Fold this rank's device-side loss sum into ``self.pending`` (averaged over ranks); False if non-finite."""
        loss, bad = self._all_mean(torch.stack([loss_acc.double().cpu(), grad_bad.double().cpu()]))
        self.pending["loss_sum"] += loss
        self.pending["steps"] += n
        return math.isfinite(self.pending["loss_sum"]) and bad == 0

    # -- evaluation, checkpoints ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any] | None:
        if not self.main or len(self.split.val) < 2:
            return None
        r = evaluate_tokens(
            self.model,
            self.split.val,
            self.max_length,
            None,
            self.o["batch_size"],
            self.device,
            autocast_dtype=self.amp_dtype,
            max_tokens=self.o["eval_max_tokens"],
        )
        row = {"step": self.step, "tokens": self.tokens, "val_loss": r["loss"], "val_ppl": r["ppl"]}
        self.print(f"step {self.step}: validation loss {r['loss']:.4f}, perplexity {r['ppl']:,.2f}")
        if self.o["sample_tokens"] > 0:
            self.print(f"  sample: {self.sample()}")
        return row

    def sample(self) -> str:
        from .generation import generate_text

        try:
            text = generate_text(
                self.model,
                self.o["sample_prompt"],
                max_new_tokens=self.o["sample_tokens"],
                temperature=0.8,
                top_k=40,
                tokenizer=self.tokenizer,
                seed=self.o["seed"],  # its own generator: the training random streams are untouched
            )
        except Exception as e:  # e.g. a prompt character a char tokenizer never saw: a sample never stops training
            return f"(no sample: {type(e).__name__}: {' '.join(str(e).split())})"
        return " ".join(text.split())  # one line

    def save(self) -> Path | None:
        """Collective: every rank contributes its random state; rank 0 writes."""
        rng = get_rng_state(self.device)
        if self.world > 1:
            import torch.distributed as dist

            rngs: list[Any] = [None] * self.world
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if not self.main:
            return None
        args = {k: v for k, v in self.o.items() if k not in NOT_STORED}
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_index": self.offset,
            "tokens": self.tokens,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer_spec,
            "args": args,
            "pending": dict(self.pending),
            "wandb_run_id": self.wandb.id if self.wandb is not None else None,
        }
        return save_checkpoint(self.out, state, keep=2)

    # -- the loop -----------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once

    def _stop_requested(self) -> int:
        """The signal that asked to stop (0: none); with several processes, any rank's request stops them all."""
        flag = self.stop_signal or 0
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([flag], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def run(self) -> int:
        self.setup()
        o, out = self.o, self.out
        resume_step = self.state["step"] if self.state is not None else None
        info = self.describe()
        d, sch = info["data"], info["schedule"]
        if self.step >= self.total_steps:
            self.print(f"nothing to do: the run in {out} is at step {self.step}, its last ({self.total_steps})")
            return 0
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            if o["overwrite"]:
                clear_out_dir(out)
            run_info = {"options": {k: v for k, v in o.items() if k not in NOT_STORED}, **info}
            data = json.dumps(run_info, indent=2).encode()
            atomic_write_bytes(out / "run.json", lambda f: f.write(data))
            self.metrics = MetricsFile(out / "metrics.jsonl", resume_step)
            if o["wandb"]:
                run_id = self.state.get("wandb_run_id") if self.state else None
                self.wandb = WandbLogger(o, run_info, out, run_id)
            self.print(
                f"model: {o['preset']} preset, {info['parameters']:,} parameters "
                f"({self.cfg.n_layers} layers × {self.cfg.emb_dim} wide, {self.cfg.n_heads} heads, "
                f"context {self.cfg.context_length}, vocab {self.cfg.vocab_size:,})"
            )
            self.print(
                f"data: {', '.join(d['sources'])}: {d['documents']:,} documents, {d['tokens']:,} tokens → "
                f"train {d['train_tokens']:,} / val {d['val_tokens']:,}; {d['train_windows']:,} training windows "
                f"of {d['max_length']} (stride {d['stride']})"
            )
            self.print(
                f"training: {self.total_steps:,} steps of {self.global_batch} windows ({sch['tokens_per_step']:,} "
                f"tokens; {self.world} process(es)) on {self.device}, {self.dtype}; lr {o['learning_rate']:g}, "
                f"warmup {self.warmup}, cosine to {o['learning_rate'] * 0.1:g}"
            )
            if resume_step is not None:
                self.print(f"resuming from {self.state['path']} at step {resume_step:,}")

        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._loop(resume_step)
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if self.main:
                self.metrics.close()

    def _loop(self, resume_step: int | None) -> int:
        from tqdm import tqdm

        o, out = self.o, self.out
        last_ckpt = latest_checkpoint(out) if self.main else None
        if resume_step is None:
            self._log_eval()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not self.main,
            file=sys.stderr,
            smoothing=0.1,
        )
        loss_acc = torch.zeros((), device=self.device)
        grad_bad = torch.zeros((), device=self.device)
        n_acc, since = 0, self.step
        t0 = t_start = time.perf_counter()
        grad_norm = torch.zeros(())
        self.model.train()
        with bar:
            while self.step < self.total_steps:
                loss, grad_norm = self.train_step()
                loss_acc += loss
                n_acc += 1
                if not self.scaler.is_enabled():  # with fp16 an inf gradient only makes the scaler skip a step
                    grad_bad += (~torch.isfinite(grad_norm)).float()
                bar.update(1)
                last = self.step == self.total_steps
                stop = self._stop_requested()
                log = self.step % o["log_steps"] == 0 or last
                ev = self.step % self.eval_steps == 0 or last
                save = self.step % o["save_steps"] == 0 or last or stop
                if log or save:
                    ok = self._sync_pending(loss_acc, n_acc, grad_bad)
                    loss_acc.zero_(), grad_bad.zero_()
                    n_acc = 0
                    if not ok:
                        raise TrainingDiverged(
                            f"the loss became NaN or infinite between steps {self.step - self.pending['steps']} and "
                            f"{self.step}; stopped without saving. The last good checkpoint is "
                            f"{last_ckpt or '(none yet)'}: resume from it with --resume, perhaps with a lower "
                            "--learning-rate"
                        )
                if log:
                    elapsed = time.perf_counter() - t0
                    self._log_train(grad_norm, (self.step - since) * self.global_batch * self.max_length / elapsed, bar)
                    since, t0 = self.step, time.perf_counter()
                if ev:
                    self._log_eval()
                if save:
                    last_ckpt = self.save() or last_ckpt
                if ev or save:
                    t0 = time.perf_counter()  # evaluation and saving do not count against tokens/s
                    since = self.step
                if stop:
                    bar.close()
                    name = signal.Signals(stop).name
                    self.print(f"{name} at step {self.step}: saved {last_ckpt}; continue with --resume")
                    self._barrier()
                    return 128 + stop
        wall = time.perf_counter() - t_start
        code = self._finish(wall, last_ckpt)
        self._barrier()  # no rank leaves (and tears the process group down) while another still works
        return code

    def _log_train(self, grad_norm: torch.Tensor, tokens_per_s: float, bar: Any) -> None:
        p = self.pending
        train_loss = p["loss_sum"] / max(1, p["steps"])
        self.pending = {"loss_sum": 0.0, "steps": 0}
        row = {
            "step": self.step,
            "epoch": round(self.epoch + self.offset / len(self.windows), 4),
            "tokens": self.tokens,
            "train_loss": train_loss,
            "ppl": perplexity(train_loss),
            "lr": self.opt.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
        }
        if self.device.type == "cuda":
            if self.peak is not None:
                row["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.world)
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if not self.main:
            return
        self.metrics.write(row)
        if self.wandb is not None:
            self.wandb.log(row)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        extra = f" | mfu {row['mfu']:.1%}" if "mfu" in row else ""
        extra += f" | mem {row['peak_mem_gb']:.2f} GiB" if "peak_mem_gb" in row else ""
        self.print(
            f"step {self.step:>6,}/{self.total_steps:,} | tokens {self.tokens:,} | loss {train_loss:.4f} | "
            f"ppl {row['ppl']:,.1f} | lr {row['lr']:.2e} | grad norm {row['grad_norm']:.3f} | "
            f"{tokens_per_s:,.0f} tok/s{extra}"
        )

    def _log_eval(self) -> None:
        row = self.evaluate()
        if row is not None:
            self.metrics.write(row)
            if self.wandb is not None:
                self.wandb.log(row)
            self.last_eval = row
            from .plotting import plot_losses

            plot_losses(self.metrics.path, self.out / "loss.png", title=self.title())
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def title(self) -> str:
        return f"{self.o['preset']} ({self.model.num_params() / 1e6:.2f}M parameters) on {', '.join(self.o['data'])}"

    def _finish(self, wall: float, last_ckpt: Path | None) -> int:
        if not self.main:
            return 0
        from .plotting import plot_losses

        plot_losses(self.metrics.path, self.out / "loss.png", title=self.title())
        ev = self.last_eval
        summary = {"steps": self.step, "tokens": self.tokens, "wall_s": round(wall, 1)}
        if ev is not None:
            summary.update(val_loss=ev["val_loss"], val_ppl=ev["val_ppl"])
        if self.wandb is not None:
            self.wandb.finish(last_ckpt, summary)
        self.print(
            f"done: {self.step:,} steps, {self.tokens:,} tokens in {fmt_duration(wall)}"
            + (f"; validation loss {ev['val_loss']:.4f}, perplexity {ev['val_ppl']:,.2f}" if ev else "")
        )
        self.print(f"checkpoint: {last_ckpt}")
        self.print(f"metrics: {self.out / 'metrics.jsonl'}, picture: {self.out / 'loss.png'}")
        return 0


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


def train(options: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> int:
    """Train with ``options`` (keys as in ``DEFAULTS``; missing ones take the defaults). Returns the exit status."""
    o = {**DEFAULTS, **(options or {})}
    check_options(o)
    if o["trainer"] == "hf":
        from .hf_trainer import train_hf

        return train_hf(o)
    return Trainer(o, state).run()


def main(argv: Sequence[str] | None = None) -> int:
    o, state = resolve_options(argv)
    try:
        return train(o, state)
    except TrainingDiverged as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    cli_main(main)
