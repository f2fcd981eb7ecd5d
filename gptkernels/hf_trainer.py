"""``python -m gptkernels.train --trainer hf``: the same model and data, trained by ``transformers.Trainer``.

The :class:`~gptkernels.GPT` is wrapped as a ``PreTrainedModel`` (:func:`hf_classes`) whose ``forward(input_ids,
labels)`` shifts the labels itself (Hugging Face's implicit shift), fed by ``WindowDataset(shift="implicit")``.
The optimizer is the native one (``GPT.configure_optimizer``: no weight decay on biases, LayerNorm and
embeddings); the schedule is Trainer's ``cosine_with_min_lr`` with the same warmup and 10% floor. Only stable
``TrainingArguments`` are used, so it runs with transformers 4.40 through 5.x.

``--out-dir`` receives Trainer's ``checkpoint-<step>`` folders (the newest two; ``--resume`` continues from
the newest with Trainer's own resume: give the same options again); ``hf/``, the final model (``config.json``
and weights, loadable with :func:`load_hf_model` or, after :func:`register`, with
``AutoModelForCausalLM.from_pretrained``); ``gpt2/``, a plain ``GPT2LMHeadModel`` export from ``GPT.save_hf``;
a native ``ckpt_<step>.pt`` so that ``python -m gptkernels.evaluate/generate --checkpoint`` work on it; and the
same ``metrics.jsonl`` and ``loss.png`` as the native trainer.

Validation is not Trainer's own ``evaluate`` (which drops the last partial window): a callback scores the held-out
tokens with :func:`gptkernels.evaluate.evaluate_tokens`, before the first step, every ``eval_steps`` and after
the last, exactly as the native loop does, so the two trainers print and store the same kind of number. Trainer's
raw log dicts and progress bars are replaced by the native loop's step lines. Unlike the native loop, ``--resume``
with a larger ``--max-steps`` is Trainer's own resume, which recomputes its schedule for the new number of steps
(not checked against the native rule).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_bytes
from .cli import UsageError
from .config import GPTConfig
from .model import GPT, shift_labels
from .training.config import TrainConfig, TrainResult
from .training.metrics import MetricsFile, fmt_duration, plural, result_from_files, say
from .training.outdir import OutDirLock, check_out_dir, clear_out_dir, trainer_checkpoints
from .training.runtime import choose_threads, load_data, local_world_size, resolve_dtype, world_size
from .training.schedule import FINAL_LR_FRACTION, default_eval_steps, effective_warmup, plan_steps


@functools.cache
def hf_classes() -> tuple[type, type]:
    """``(GPTKernelsConfig, GPTKernelsForCausalLM)``, defined on first use so that transformers loads lazily."""
    import transformers
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    major = int(transformers.__version__.split(".")[0])

    class GPTKernelsConfig(PretrainedConfig):
        model_type = "gptkernels"

        def __init__(self, gpt: dict[str, Any] | None = None, **kwargs: Any) -> None:
            self.gpt = dict(gpt) if gpt is not None else GPTConfig().to_dict()  # the GPTConfig, as a dict
            kwargs.setdefault("tie_word_embeddings", True)
            super().__init__(**kwargs)

    class GPTKernelsForCausalLM(PreTrainedModel):
        config_class = GPTKernelsConfig
        base_model_prefix = "gpt"
        # The LM head is the token embedding (GPT-2 ties them); v5 wants {target: source}, v4 a list.
        _tied_weights_keys = (
            {"gpt.lm_head.weight": "gpt.transformer.wte.weight"} if major >= 5 else ["gpt.lm_head.weight"]
        )

        def __init__(self, config: GPTKernelsConfig) -> None:
            super().__init__(config)
            self.gpt = GPT(GPTConfig.from_dict(config.gpt))
            self.post_init()

        def _init_weights(self, module: torch.nn.Module) -> None:
            pass  # GPT initialises its own weights (GPT-2's scheme)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.gpt.transformer.wte

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.gpt.lm_head

        def forward(
            self,
            input_ids: torch.Tensor,
            labels: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,  # accepted for collators; windows are never padded
        ) -> Any:
            """Without labels: logits (B, T, vocab). With labels (== input_ids, HF style): the next-token loss,
            computed by the fused LM-head loss without materialising the logits."""
            if labels is None:
                return CausalLMOutput(logits=self.gpt(input_ids))
            _, loss = self.gpt(input_ids, shift_labels(labels), return_logits=False)
            return CausalLMOutput(loss=loss)

    return GPTKernelsConfig, GPTKernelsForCausalLM


def register() -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM.from_pretrained`` recognise ``model_type: gptkernels``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_cls, model_cls = hf_classes()
    try:
        AutoConfig.register("gptkernels", cfg_cls)
        AutoModelForCausalLM.register(cfg_cls, model_cls)
    except ValueError:
        pass  # already registered


def wrap(model: GPT) -> Any:
    """A ``GPTKernelsForCausalLM`` sharing ``model``'s parameters."""
    cfg_cls, model_cls = hf_classes()
    hf = model_cls(cfg_cls(gpt=model.config.to_dict()))
    hf.gpt = model
    return hf


def load_hf_model(folder: str | Path) -> GPT:
    """The :class:`GPT` inside a folder written by ``--trainer hf`` (or a ``checkpoint-<step>`` folder)."""
    _, model_cls = hf_classes()
    return model_cls.from_pretrained(str(folder)).gpt


@contextlib.contextmanager
def _quiet_saves() -> Any:
    """No "Writing model shards" bars from transformers in a redirected log (they are \\r-animated)."""
    import sys

    from transformers.utils import logging as hf_logging

    was_off = hf_logging.is_progress_bar_enabled() is False
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_off:
            hf_logging.enable_progress_bar()


def _training_args(c: TrainConfig, out: Path, dtype: str, device: torch.device, warmup: int):
    import inspect

    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments.__init__).parameters
    kw: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=c.batch_size,
        gradient_accumulation_steps=c.grad_accum,
        learning_rate=c.learning_rate,
        weight_decay=c.weight_decay,
        max_grad_norm=c.gradient_clipping,
        num_train_epochs=c.num_epochs,
        max_steps=c.max_steps if c.max_steps else -1,
        warmup_steps=warmup,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": FINAL_LR_FRACTION},
        logging_steps=c.log_steps,
        save_steps=c.save_steps,
        save_total_limit=2,
        seed=c.seed,
        data_seed=c.seed,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        torch_compile=c.compile,
        dataloader_drop_last=True,
        report_to=["wandb"] if c.wandb else "none",
        run_name=c.wandb_run_name,
        disable_tqdm=True,  # this module prints its own lines, like the native loop
        use_cpu=device.type == "cpu",
    )
    # Validation is not Trainer's: the callback scores the held-out tokens exactly as the native loop does.
    kw["eval_strategy" if "eval_strategy" in params else "evaluation_strategy"] = "no"  # renamed in 4.41
    if "save_safetensors" in params:
        kw["save_safetensors"] = True
    return TrainingArguments(**kw)


def train_hf(c: TrainConfig) -> TrainResult:
    """Train with ``transformers.Trainer`` using the options of a :class:`TrainConfig`; see the module docstring.

    Validation uses :func:`gptkernels.evaluate.evaluate_tokens` on the same held-out tokens as the native loop
    (before the first step, every ``eval_steps`` and after the last), so both trainers' numbers compare.
    """
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .checkpoint import save_checkpoint
    from .cli import resolve_device
    from .data import WindowDataset
    from .evaluate import evaluate_tokens, perplexity
    from .plotting import plot_losses
    from .tokenizer import tokenizer_to_spec

    out = check_out_dir(c.out_dir, c.resume, c.overwrite)
    resume_from = None
    if c.resume:
        folders = trainer_checkpoints(out)
        if not folders:
            raise UsageError(f"--resume: no Trainer checkpoint (checkpoint-*) in {out} to resume from")
        resume_from = str(folders[-1])
    tok, split = load_data(c.data, c.tokenizer, c.val_fraction, c.max_tokens)
    cfg = c.model_config(tok.n_vocab)
    L = c.max_length or cfg.context_length
    if L > cfg.context_length:
        raise UsageError(f"--max-length {L} exceeds the model's --context-length {cfg.context_length}")
    try:
        train_ds = WindowDataset(split.train, L, c.stride, shift="implicit")
    except ValueError as e:
        raise UsageError(f"training split too small: {e}; use a smaller --max-length or more --data") from None
    world = world_size()
    global_batch = c.batch_size * world * c.grad_accum
    if global_batch > len(train_ds):
        raise UsageError(
            f"a step needs {global_batch} windows but the training split has only {len(train_ds)} windows of {L} "
            "tokens; use a smaller --batch-size or --max-length, or more --data"
        )
    _, total = plan_steps(len(train_ds), global_batch, c.num_epochs, c.max_steps)
    warmup = effective_warmup(c.warmup_steps, total)
    eval_steps = c.eval_steps or default_eval_steps(total)
    if c.wandb:
        os.environ.setdefault("WANDB_PROJECT", c.wandb_project)
    device = resolve_device(c.device)
    dtype = resolve_dtype(c.dtype, device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        threads, why = choose_threads(c.threads, local_world_size())
        torch.set_num_threads(threads)
    args = _training_args(c, out, dtype, device, warmup)
    main = args.process_index == 0
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)

    torch.manual_seed(c.seed)
    model = GPT(cfg).to(args.device)
    hf_model = wrap(model)
    optimizer = model.configure_optimizer(c.learning_rate, c.weight_decay)
    tokens_per_step = global_batch * L
    has_val = len(split.val) >= 2

    lock = OutDirLock(out) if main else None
    metrics: MetricsFile | None = None
    try:
        if lock is not None:
            lock.acquire()  # before anything is written or removed
            out.mkdir(parents=True, exist_ok=True)
            if c.overwrite:
                clear_out_dir(out)
        resume_step = int(resume_from.rsplit("-", 1)[-1]) if resume_from else None
        metrics = MetricsFile(out / "metrics.jsonl", resume_step) if main else None
        last_eval: dict[str, Any] = {}

        def validate(step: int) -> None:
            r = evaluate_tokens(
                model, split.val, L, None, c.batch_size, args.device, autocast_dtype=amp_dtype,
                max_tokens=c.eval_max_tokens, tokenizer=tok,
            )  # fmt: skip
            row = {"step": step, "tokens": step * tokens_per_step, "val_loss": r["loss"], "val_ppl": r["ppl"]}
            row["val_bpb"] = r["bpb"]
            metrics.write(row)
            last_eval.clear()
            last_eval.update(row)
            say(
                f"step {step}: validation loss {r['loss']:.4f}, perplexity {r['ppl']:,.2f}, "
                f"{r['bpb']:.4f} bits per byte"
            )

        class MetricsCallback(TrainerCallback):
            """Trainer's logs → the same metrics.jsonl rows and console lines as the native loop."""

            def on_train_begin(self, args, state, control, **kwargs):
                self.t0, self.last_step, self.paused, self.due = time.perf_counter(), state.global_step, 0.0, False
                if state.is_world_process_zero and has_val and state.global_step == 0:
                    validate(0)

            def validate(self, step: int) -> None:
                t = time.perf_counter()
                validate(step)
                self.paused += time.perf_counter() - t  # evaluation does not count against tokens/s
                self.due = False

            def on_step_end(self, args, state, control, **kwargs):
                step = state.global_step
                self.due = state.is_world_process_zero and has_val
                self.due = self.due and (step % eval_steps == 0 or step >= state.max_steps)
                if self.due and not control.should_log:  # else after this step's log line, as the native loop does
                    self.validate(step)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not state.is_world_process_zero:
                    return
                if logs and "loss" in logs:
                    self.log_train(state, logs)
                if self.due:
                    self.validate(state.global_step)

            def log_train(self, state, logs) -> None:
                step = state.global_step
                now = time.perf_counter()
                rate = (step - self.last_step) * tokens_per_step / max(now - self.t0 - self.paused, 1e-9)
                self.t0, self.last_step, self.paused = now, step, 0.0
                loss = float(logs["loss"])
                row = {"step": step, "epoch": logs.get("epoch"), "tokens": step * tokens_per_step}
                row.update(train_loss=loss, ppl=perplexity(loss), lr=logs.get("learning_rate"))
                row.update(grad_norm=logs.get("grad_norm"), tokens_per_s=rate)
                metrics.write(row)
                gn = f" | grad norm {row['grad_norm']:.3f}" if row["grad_norm"] is not None else ""
                say(
                    f"step {step:>6,}/{state.max_steps:,} | tokens {row['tokens']:,} | loss {loss:.4f} | "
                    f"ppl {row['ppl']:,.1f} | lr {row['lr']:.2e}{gn} | {rate:,.0f} tok/s"
                )

        if main:
            say(
                f"model: {c.preset} preset, {model.num_params():,} parameters; transformers.Trainer, "
                f"{plural(total, 'step')} of {plural(global_batch, 'window')} of {L} tokens, warmup {warmup}"
            )
            if device.type == "cpu":
                say(f"threads: {plural(threads, 'thread')} per process ({why}); --threads N to change")
        trainer = Trainer(
            model=hf_model,
            args=args,
            train_dataset=train_ds,
            optimizers=(optimizer, None),
            callbacks=[MetricsCallback()],
        )
        for cb in (PrinterCallback, ProgressCallback):  # they print raw log dicts and a bar: ours print lines
            trainer.remove_callback(cb)
        t_start = time.perf_counter()
        with _quiet_saves():
            trainer.train(resume_from_checkpoint=resume_from)
            wall = time.perf_counter() - t_start
            trainer.save_model(str(out / "hf"))  # every rank takes part; rank 0 writes
            if main:
                model.save_hf(out / "gpt2")
        step = trainer.state.global_step
        result_model = model
        if not main:
            return TrainResult(
                steps=step, tokens=step * tokens_per_step, wall_time_s=wall, final_train_loss=None,
                final_val_loss=None, final_val_ppl=None, final_val_bpb=None, n_params=model.num_params(),
                n_params_non_embedding=model.num_params(non_embedding=True), out_dir=out, checkpoint=None,
            )  # fmt: skip
        # A native checkpoint (weights, config, tokenizer; no optimizer) for python -m gptkernels.evaluate/generate.
        native = {
            "step": step,
            "epoch": 0,
            "batch_index": 0,
            "tokens": step * tokens_per_step,
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "tokenizer": tokenizer_to_spec(tok),
            "args": c.stored(),
            "trainer": "hf",
        }
        ckpt = save_checkpoint(out, native, keep=2)
        metrics.close()
        plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{c.preset} (transformers.Trainer)")
        summary = {"steps": step, "tokens": step * tokens_per_step, "wall_s": round(wall, 1)}
        if last_eval:
            summary.update(val_loss=last_eval["val_loss"], val_ppl=last_eval["val_ppl"], val_bpb=last_eval["val_bpb"])
        data = json.dumps(summary, indent=2).encode()
        atomic_write_bytes(out / "hf_summary.json", lambda f: f.write(data))
        val = (
            f"; validation loss {last_eval['val_loss']:.4f}, perplexity {last_eval['val_ppl']:,.2f}, "
            f"{last_eval['val_bpb']:.4f} bits per byte"
            if last_eval
            else ""
        )
        say(f"done: {plural(step, 'step')}, {plural(step * tokens_per_step, 'token')} in {fmt_duration(wall)}{val}")
        say(f"model: {out} (transformers), {out / 'gpt2'} (GPT2LMHeadModel); checkpoint: {ckpt}")
        return result_from_files(out, result_model, step, step * tokens_per_step, wall, ckpt)
    finally:
        if metrics is not None:
            metrics.close()
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads_before)
