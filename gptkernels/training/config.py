"""What a training run is: :class:`TrainConfig` (every option, validated in one place) and :class:`TrainResult`.

The field names are the command line's options with ``_`` for ``-`` (``--learning-rate`` is ``learning_rate``);
``python -m gptkernels.train --help`` describes each. The rules an option must follow live in :func:`check_value`
(one option) and :meth:`TrainConfig.validate` (options together), used by the command line, ``--config`` files
and Python callers alike.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cli import UsageError
from ..config import PRESETS, GPTConfig

# Options that may override a preset's model size.
MODEL_KEYS = ("emb_dim", "n_heads", "n_layers", "context_length", "drop_rate", "qkv_bias")
# What must match to continue a checkpoint.
ARCH_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "layer_norm_eps")
# Options that say how to run rather than what to train: never stored in a checkpoint.
NOT_STORED = ("config", "resume", "overwrite")

CHOICES: dict[str, tuple[str, ...]] = {
    "trainer": ("native", "hf"),
    "preset": tuple(sorted(PRESETS)),
    "kernels": ("auto", "triton", "torch"),
    "shift": ("explicit", "implicit"),
    "dtype": ("auto", "bf16", "fp16", "fp32"),
}
POSITIVE_INTS = frozenset(
    {
        "emb_dim",
        "n_heads",
        "n_layers",
        "context_length",
        "max_length",
        "stride",
        "max_tokens",
        "batch_size",
        "num_epochs",
        "grad_accum",
        "log_steps",
        "eval_steps",
        "save_steps",
        "eval_max_tokens",
        "threads",
    }
)
NON_NEGATIVE_INTS = frozenset({"max_steps", "warmup_steps", "sample_tokens"})
INTS = POSITIVE_INTS | NON_NEGATIVE_INTS | {"seed"}
FLOATS = frozenset({"drop_rate", "val_fraction", "learning_rate", "weight_decay", "gradient_clipping", "dist_timeout"})
BOOLS = frozenset({"qkv_bias", "compile", "resume", "overwrite", "wandb"})
# AdamW runs in float32: a learning rate or weight decay near float32's 3.4e38 overflows inside its update.
MAX_RATE = 1e30


@dataclass
class TrainConfig:
    """Every option of a training run; the defaults are the command line's (``python -m gptkernels.train``)."""

    config: str | None = None  # the --config file these options came from (informational; never stored)
    trainer: str = "native"  # native: this package's loop; hf: transformers.Trainer
    # model
    preset: str = "tiny"  # model size: tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl
    emb_dim: int | None = None  # width of the residual stream (None: the preset's)
    n_heads: int | None = None  # attention heads (None: the preset's)
    n_layers: int | None = None  # transformer blocks (None: the preset's)
    context_length: int | None = None  # longest sequence the model can see (None: the preset's)
    drop_rate: float | None = None  # dropout probability (None: the preset's)
    qkv_bias: bool | None = None  # bias in the q/k/v projection (None: the preset's)
    kernels: str = "auto"  # fused Triton kernels ("triton"), PyTorch ops ("torch"), or kernels where they run
    # data
    data: list[str] = field(default_factory=lambda: ["builtin"])  # text files, folders, builtin, hf:NAME, prepared
    tokenizer: str | None = None  # gpt2, char, byte, bpe:<vocab>, hf:<folder>; None: a prepared folder's own, else gpt2
    max_length: int | None = None  # tokens per training window (None: the context length)
    stride: int | None = None  # step between window starts (None: max_length, no overlap)
    shift: str = "explicit"  # explicit: (input, target) pairs; implicit: labels == inputs, shifted in the loss
    val_fraction: float = 0.1  # last fraction of the corpus held out for validation (0: none)
    max_tokens: int | None = None  # read at most this many tokens (None: all)
    # training
    learning_rate: float = 5e-4  # peak AdamW learning rate
    batch_size: int = 8  # windows per micro-batch, per process
    num_epochs: int = 10  # passes over the training windows
    max_steps: int = 300  # stop after this many optimizer steps (0: no limit, train num_epochs)
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 1000  # linear warmup steps, capped at 10% of the run's steps
    weight_decay: float = 0.01  # AdamW weight decay on weight matrices (not biases, LayerNorm, embeddings)
    gradient_clipping: float = 1.0  # clip the gradient norm to this (0: no clipping)
    dtype: str = "auto"  # autocast precision; auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    seed: int = 123  # seed for weights, data order and dropout
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...
    threads: int | None = None  # CPU threads per process (None: the free cores, from the load average)
    dist_timeout: float = 600.0  # seconds a process waits for the others (torchrun) before failing
    # logging, evaluation, output
    log_steps: int = 10  # log metrics every this many steps
    eval_steps: int | None = None  # evaluate every this many steps (None: 500, or a quarter of a shorter run)
    save_steps: int = 1000  # checkpoint every this many steps (and at the end)
    eval_max_tokens: int | None = None  # score at most this many validation tokens (None: all)
    sample_prompt: str = "The value of"  # text continued at each evaluation
    sample_tokens: int = 40  # tokens sampled at each evaluation (0: no sample)
    out_dir: str = "out"  # folder for checkpoints, metrics.jsonl, loss.png and run.json
    resume: bool = False  # continue the run in out_dir from its newest checkpoint
    overwrite: bool = False  # delete what an earlier run wrote in out_dir first
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)
    wandb_project: str = "gptkernels"  # W&B project
    wandb_run_name: str | None = None  # W&B run name

    def __post_init__(self) -> None:
        if isinstance(self.data, str | Path):
            self.data = [str(self.data)]
        self.out_dir = str(self.out_dir)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~gptkernels.cli.UsageError` (one line naming the option) for any bad value."""
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))
        if not self.data:
            raise UsageError("--data: no training data given")
        if self.overwrite and self.resume:
            raise UsageError("--resume and --overwrite contradict each other; pick one")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from plain values (a parsed YAML/JSON file, a row of an experiment grid): keys may use ``-``
        or ``_``; strings such as ``"5e-4"`` or ``"1e3"`` become numbers where the option is one; unknown keys
        and bad values raise :class:`~gptkernels.cli.UsageError` naming ``source`` and the key."""
        return cls(**coerce_dict(d, source))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stored(self) -> dict[str, Any]:
        """The options saved in checkpoints and run.json (not how this command was run)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_STORED}

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The :class:`GPTConfig` of these options for a tokenizer of ``vocab_size`` tokens."""
        overrides = {k: getattr(self, k) for k in MODEL_KEYS if getattr(self, k) is not None}
        try:
            return GPTConfig.preset(self.preset, vocab_size=vocab_size, kernels=self.kernels, **overrides)
        except ValueError as e:
            raise UsageError(f"model: {e}") from None


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def default(name: str) -> Any:
    f = FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def defaults() -> dict[str, Any]:
    return {name: default(name) for name in FIELDS}


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(name: str, v: Any) -> None:
    """The one rule for each option's value; raises UsageError naming ``--the-option``."""
    opt = option(name)
    if v is None:
        if default(name) is not None:
            raise UsageError(f"{opt} must be given (got None)")
        return
    if name in CHOICES and v not in CHOICES[name]:
        raise UsageError(f"{opt} must be one of {', '.join(CHOICES[name])}, got {v!r}")
    if name in BOOLS:
        if not isinstance(v, bool):
            raise UsageError(f"{opt} must be true or false, got {v!r}")
    elif name in INTS:
        if isinstance(v, bool) or not isinstance(v, int):
            raise UsageError(f"{opt} must be an integer, got {v!r}")
        if name in POSITIVE_INTS and v < 1:
            raise UsageError(f"{opt} must be a positive integer, got {v}")
        if name in NON_NEGATIVE_INTS and v < 0:
            raise UsageError(f"{opt} must be a non-negative integer, got {v}")
    elif name in FLOATS:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise UsageError(f"{opt} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise UsageError(f"{opt} must be a finite number, got {v}")
        if name == "learning_rate" and not 0 < v <= MAX_RATE:
            raise UsageError(f"{opt} must be positive and at most {MAX_RATE:g} (AdamW runs in float32), got {v:g}")
        if name == "weight_decay" and not 0 <= v <= MAX_RATE:
            raise UsageError(f"{opt} must be >= 0 and at most {MAX_RATE:g}, got {v:g}")
        if name == "gradient_clipping" and v < 0:
            raise UsageError(f"{opt} must be >= 0 (0: off), got {v:g}")
        if name == "dist_timeout" and not v > 0:
            raise UsageError(f"{opt} must be a positive number of seconds, got {v:g}")
        if name in ("val_fraction", "drop_rate") and not 0 <= v < 1:
            raise UsageError(f"{opt} must be in [0, 1), got {v:g}")
    elif name == "data":
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise UsageError(f"{opt} must be a source or a list of sources, got {v!r}")
    elif not isinstance(v, str):
        raise UsageError(f"{opt} must be a string, got {v!r}")


def parse_int(s: str) -> int:
    """An integer option's text: ``300``, or ``1e3`` when it is a whole number."""
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        raise ValueError(f"expected an integer, got {s!r}") from None
    if not math.isfinite(f) or not f.is_integer():
        raise ValueError(f"expected an integer, got {s!r}")
    return int(f)


def coerce_value(name: str, v: Any) -> Any:
    """A plain value (YAML reads 5e-4 as a string) turned into the option's type, without range checks."""
    if v is None:
        return None
    if name == "data" and isinstance(v, str):
        return [v]
    if name in INTS and not isinstance(v, bool):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            return parse_int(v)
    if name in FLOATS and isinstance(v, str):
        return float(v)
    return v


def coerce_dict(d: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Keys normalised (``-`` → ``_``), values coerced and checked one by one; errors name ``source: key``."""
    out = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key not in FIELDS:
            raise UsageError(f"{source}: unknown option {k!r}")
        try:
            v = coerce_value(key, v)
            check_value(key, v)
        except (UsageError, ValueError) as e:
            msg = str(e).replace(f"{option(key)} ", "", 1)
            raise UsageError(f"{source}: {key} {msg}") from None
        out[key] = v
    return out


@dataclass
class TrainResult:
    """What :func:`~gptkernels.training.train` returns: the run's final numbers and where its files are."""

    steps: int  # optimizer steps done (in total, across resumes)
    tokens: int  # training tokens seen
    wall_time_s: float  # seconds this call trained (0 when there was nothing to do)
    final_train_loss: float | None  # mean training loss of the last logged steps
    final_val_loss: float | None  # validation loss after the last step (None: no validation split)
    final_val_ppl: float | None  # exp(final_val_loss)
    final_val_bpb: float | None  # validation bits per UTF-8 byte: comparable across tokenizers
    n_params: int  # parameters (the tied LM head counted once)
    n_params_non_embedding: int  # without the position embedding (what scaling laws count)
    out_dir: Path  # the run's folder
    checkpoint: Path | None  # the newest checkpoint
    metrics: dict[str, Any] = field(default_factory=dict)  # the last train and validation rows of metrics.jsonl

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["checkpoint"] = str(self.checkpoint) if self.checkpoint is not None else None
        return d
