"""``python -m gptkernels.train``: train a GPT on text, with crash-safe checkpoints, resume and evaluation.

This module only parses the command line into a :class:`~gptkernels.training.TrainConfig` and calls
:func:`gptkernels.training.train`; from Python, call that directly.

With no arguments it trains the ``tiny`` preset (3.6M parameters) on the built-in corpus (CPython's own
documentation, ~139k GPT-2 tokens) on the best device there is, for ``--max-steps 300``: about three minutes
on a 2-core CPU, ending with a validation loss far below the ln(50257) ≈ 10.8 of an untrained model. It
writes into ``--out-dir`` (default ``out/``):

- ``ckpt_<step>.pt``: the newest two checkpoints (every ``--save-steps``, at the end, and on Ctrl-C);
- ``metrics.jsonl``: one JSON object per logged step (``step, tokens, train_loss, ppl, lr, grad_norm,
  tokens_per_s``, on CUDA ``mfu`` and ``peak_mem_gb``) and per evaluation (``step, tokens, val_loss, val_ppl,
  val_bpb``: bits per UTF-8 byte, comparable between tokenizers);
- ``loss.png``: train and validation loss against tokens seen; ``run.json``: the options, the model's size and
  config, the data's statistics and the planned schedule, written before the first step;
- ``tokenizer.json`` when the tokenizer was trained on the data and can save itself.

Safety: an ``--out-dir`` that already holds checkpoints is never overwritten; the command stops with an
error unless ``--resume`` (continue that run) or ``--overwrite`` is given. ``--overwrite`` removes exactly
what training writes at the top of the folder (checkpoints, metrics, pictures, run.json, ``--trainer hf``'s
checkpoint folders and exports) and never a folder holding another run (``out/hf`` may be one). A run holds an
exclusive lock on its folder (``.train.lock``) for its whole life: a second run, or an ``--overwrite``, in
the same folder is refused with the other process's pid.

Schedule: AdamW (fused on CUDA; weight decay on matrices only), linear warmup for
``min(--warmup-steps, 10% of the run's steps)`` steps, then cosine decay to 10% of ``--learning-rate``.
Training stops after ``--num-epochs`` passes over the training windows or ``--max-steps`` optimizer
steps, whichever comes first (``--max-steps 0``: no step limit). Validation runs before the first step,
every ``--eval-steps`` (by default 500, or a quarter of the run when that is shorter) and after the last
step, and prints a sample from ``--sample-prompt``.

Resume: ``--resume`` continues from the newest checkpoint of ``--out-dir`` with the options it was started
with (options given again override them; the changes are printed; another ``--tokenizer`` is refused), the
same step, learning rate, data order and random state; in fp32 the resumed run's losses equal the
uninterrupted run's exactly. The schedule is the one planned when the run started: ``--resume --max-steps
400`` on a finished 300-step run continues at the final learning rate (10% of the peak) for the 100 extra
steps, with no second warmup.

CPU threads: ``--threads`` per process; by default the cores not busy with other work (usable cores minus the
1-minute load average, at least 1), or ``OMP_NUM_THREADS`` when set. The header line says which.

Stopping: Ctrl-C (or SIGTERM) prints at once that the run stops after the current step and writes a
checkpoint; a second Ctrl-C waits for it; a third stops at once, losing the steps since the last checkpoint.

Exit status: 0 done; 1 the loss or the parameters became NaN/inf (the last good checkpoint is kept); 2 bad
command line, data or output folder, or the folder is in use (one ``error: ...`` line, nothing written); 3 an
output file could not be written (disk full, file size limit; the earlier checkpoints are whole); 130
interrupted by Ctrl-C (SIGINT) or 143 by SIGTERM, after saving a checkpoint to resume from.

Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N -m gptkernels.train ...`` runs
DistributedDataParallel (NCCL on CUDA, gloo on CPU). ``--batch-size`` is per process: each optimizer step
reads ``batch_size × processes × grad_accum`` windows, every process its own slice, so the run matches a
single process with that global batch. Only rank 0 writes files. Every collective waits at most
``--dist-timeout`` seconds (default 600) for the other processes: a rank that died or hangs fails the run
then instead of after gloo's 30 minutes; raise it if rank 0's evaluations are longer. For models that do not
fit one GPU, shard them with ``torch.distributed.fsdp`` (FSDP2 ``fully_shard``); this command does not do that.

``--trainer hf`` trains the same model with ``transformers.Trainer`` instead (see :mod:`gptkernels.hf_trainer`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .cli import OneLineErrorParser, UsageError, cli_main, read_structured_file
from .config import PRESETS
from .training.config import CHOICES, MODEL_KEYS, TrainConfig, coerce_dict, defaults, parse_int
from .training.loop import TrainingDiverged, TrainingInterrupted, run_training
from .training.resume import load_resume_state, stored_options
from .training.schedule import default_eval_steps, effective_warmup, lr_factor  # noqa: F401 (public names)

DEFAULTS: dict[str, Any] = defaults()


def INT(s: str) -> int:  # noqa: N802 - argparse shows the type's name in its messages
    try:
        return parse_int(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m gptkernels.train",
        description="Train a GPT-2-style model. With no options: the tiny preset on the built-in corpus for 300\n"
        "steps (about 3 minutes on a 2-core CPU), writing checkpoints, metrics.jsonl and loss.png into out/.\n"
        "Every option can also come from --config FILE (JSON or YAML); the command line wins.",
        argument_default=argparse.SUPPRESS,  # only options actually given, so that file < command line works
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 done, 1 loss became NaN/inf, 2 bad input or out-dir in use, 3 an output could not be\n"
        "written, 130/143 interrupted (checkpoint saved).\n"
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
    add(g, "--trainer", "native: this package's loop; hf: transformers.Trainer", choices=CHOICES["trainer"])

    g = p.add_argument_group("model")
    add(g, "--preset", "model size: " + ", ".join(PRESETS), choices=CHOICES["preset"])
    add(g, "--emb-dim", "width of the residual stream (overrides the preset)", type=INT)
    add(g, "--n-heads", "attention heads (overrides the preset)", type=INT)
    add(g, "--n-layers", "transformer blocks (overrides the preset)", type=INT)
    add(g, "--context-length", "longest sequence the model can see (overrides the preset)", type=INT)
    add(g, "--drop-rate", "dropout probability (overrides the preset)", type=float)
    add(g, "--qkv-bias", "bias in the q/k/v projection (overrides the preset)", action=argparse.BooleanOptionalAction)
    add(
        g,
        "--kernels",
        "fused Triton kernels or PyTorch ops; auto: kernels where they run",
        choices=CHOICES["kernels"],
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
    add(
        g,
        "--tokenizer",
        "gpt2, char, byte, bpe:<vocab size> (trained on the data), or hf:<folder>; none: a prepared folder's own, "
        "else gpt2",
        metavar="NAME",
    )
    add(g, "--max-length", "tokens per training window; none: the context length", type=INT)
    add(g, "--stride", "step between window starts (none: max-length, no overlap)", type=INT)
    add(
        g,
        "--shift",
        "explicit: targets are the inputs shifted by one; implicit: shift inside the loss (HF style)",
        choices=CHOICES["shift"],
    )
    add(g, "--val-fraction", "last fraction of the corpus held out for validation (0: none)", type=float)
    add(g, "--max-tokens", "read at most this many tokens", type=INT)

    g = p.add_argument_group("training")
    add(g, "--learning-rate", "peak AdamW learning rate", type=float)
    add(g, "--batch-size", "windows per micro-batch, per process", type=INT)
    add(g, "--num-epochs", "passes over the training windows", type=INT)
    add(
        g,
        "--max-steps",
        "stop after this many optimizer steps; 0: no limit (train --num-epochs)",
        type=INT,
    )
    add(g, "--grad-accum", "micro-batches per optimizer step", type=INT)
    add(g, "--warmup-steps", "linear warmup steps, capped at 10%% of the run's steps", type=INT)
    add(g, "--weight-decay", "AdamW weight decay on weight matrices (not biases, LayerNorm, embeddings)", type=float)
    add(g, "--gradient-clipping", "clip the gradient norm to this; 0: no clipping", type=float)
    add(
        g,
        "--dtype",
        "autocast precision; auto: bf16 on CUDA, fp32 on CPU; fp16 needs CUDA",
        choices=CHOICES["dtype"],
    )
    add(g, "--compile", "torch.compile the model", action="store_true")
    add(g, "--seed", "seed for weights, data order and dropout", type=INT)
    add(g, "--device", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    add(
        g,
        "--threads",
        "CPU threads per process; none: the cores not busy with other work (cores minus the load average), "
        "or OMP_NUM_THREADS when set",
        type=INT,
    )
    add(
        g,
        "--dist-timeout",
        "seconds a process waits for the others in a collective (torchrun) before the run fails",
        type=float,
    )

    g = p.add_argument_group("logging, evaluation and output")
    add(g, "--log-steps", "log metrics every this many steps", type=INT)
    add(
        g,
        "--eval-steps",
        "evaluate every this many steps, and before the first and after the last; none: 500, or a quarter of "
        "the run when that is shorter",
        type=INT,
    )
    add(g, "--save-steps", "checkpoint every this many steps (also at the end)", type=INT)
    add(g, "--eval-max-tokens", "score at most this many validation tokens (none: all)", type=INT)
    add(g, "--sample-prompt", "text continued at each evaluation")
    add(g, "--sample-tokens", "tokens sampled at each evaluation; 0: no sample", type=INT)
    add(g, "--out-dir", "folder for checkpoints, metrics.jsonl and loss.png")
    add(g, "--resume", "continue the run in --out-dir from its newest checkpoint", action="store_true")
    add(
        g,
        "--overwrite",
        "first delete what an earlier run wrote at the top of --out-dir (never a nested run's folder)",
        action="store_true",
    )
    add(
        g,
        "--wandb",
        "also log to Weights & Biases (WANDB_MODE=offline works); without it wandb is not imported",
        action="store_true",
    )
    add(g, "--wandb-project", "W&B project")
    add(g, "--wandb-run-name", "W&B run name")
    return p


def read_config_file(path: str) -> dict[str, Any]:
    """The options of a JSON or YAML file, coerced and checked like the command line's."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        raw = read_structured_file(p)
    except ValueError as e:
        raise UsageError(f"--config {path}: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    if "config" in raw:
        raise UsageError(f"--config {path}: unknown option 'config'")
    return coerce_dict(raw, source=f"--config {path}")


def resolve_options(argv: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Options from defaults < checkpoint (with --resume) < --config file < command line, and the checkpoint."""
    given = vars(build_parser().parse_args(argv))
    from_file = read_config_file(given["config"]) if given.get("config") else {}
    first = {**DEFAULTS, **from_file, **given}
    state = None
    if first["resume"]:
        if first["overwrite"]:
            raise UsageError("--resume and --overwrite contradict each other; pick one")
        if first["trainer"] == "hf":
            return first, None  # transformers.Trainer finds its own checkpoints
        state = load_resume_state(first["out_dir"])
        stored = stored_options(state, preset_given="preset" in from_file or "preset" in given)
        first = {**DEFAULTS, **stored, **from_file, **given}
    return first, state


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 done, 1 NaN/inf loss, 2 bad input (raised, see cli_main), 3 a failed write (raised),
    128 + signal when interrupted after saving a checkpoint."""
    o, state = resolve_options(argv)
    try:
        run_training(TrainConfig(**o), state)
        return 0
    except TrainingDiverged as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        return e.exit_code
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    cli_main(main)
