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
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .config import GPTConfig
from .model import GPT, shift_labels


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


def _training_args(
    o: dict[str, Any], out: Path, total: int, warmup: int, dtype: str, device: torch.device, has_eval: bool
):
    import inspect

    from transformers import TrainingArguments

    from .train import default_eval_steps

    params = inspect.signature(TrainingArguments.__init__).parameters
    kw: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=o["batch_size"],
        per_device_eval_batch_size=o["batch_size"],
        gradient_accumulation_steps=o["grad_accum"],
        learning_rate=o["learning_rate"],
        weight_decay=o["weight_decay"],
        max_grad_norm=o["gradient_clipping"],
        num_train_epochs=o["num_epochs"],
        max_steps=o["max_steps"] if o["max_steps"] else -1,
        warmup_steps=warmup,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        logging_steps=o["log_steps"],
        save_steps=o["save_steps"],
        save_total_limit=2,
        eval_steps=o["eval_steps"] or default_eval_steps(total),
        seed=o["seed"],
        data_seed=o["seed"],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        torch_compile=o["compile"],
        dataloader_drop_last=True,
        report_to=["wandb"] if o["wandb"] else "none",
        run_name=o["wandb_run_name"],
        prediction_loss_only=True,
        use_cpu=device.type == "cpu",
    )
    strategy = "steps" if has_eval else "no"
    kw["eval_strategy" if "eval_strategy" in params else "evaluation_strategy"] = strategy  # renamed in 4.41
    if "save_safetensors" in params:
        kw["save_safetensors"] = True
    return TrainingArguments(**kw)


def train_hf(o: dict[str, Any]) -> int:
    """Train with ``transformers.Trainer`` using the options of :mod:`gptkernels.train`; returns the exit status."""
    from transformers import Trainer, TrainerCallback

    from .checkpoint import save_checkpoint
    from .cli import UsageError
    from .data import WindowDataset
    from .evaluate import evaluate_tokens, perplexity
    from .plotting import plot_losses
    from .tokenizer import tokenizer_to_spec
    from .train import (
        NOT_STORED,
        MetricsFile,
        check_out_dir,
        clear_out_dir,
        effective_warmup,
        fmt_duration,
        load_data,
        model_config,
        resolve_dtype,
    )

    out = check_out_dir(o)
    resume_from = None
    if o["resume"]:
        folders = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if not folders:
            raise UsageError(f"--resume: no Trainer checkpoint (checkpoint-*) in {out} to resume from")
        resume_from = str(folders[-1])
    tok, split = load_data(o, None)
    cfg = model_config(o, tok.n_vocab)
    L = o["max_length"] or cfg.context_length
    if L > cfg.context_length:
        raise UsageError(f"--max-length {L} exceeds the model's --context-length {cfg.context_length}")
    try:
        train_ds = WindowDataset(split.train, L, o["stride"], shift="implicit")
    except ValueError as e:
        raise UsageError(f"training split too small: {e}; use a smaller --max-length or more --data") from None
    eval_ds = WindowDataset(split.val, L, shift="implicit") if len(split.val) >= L else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = o["batch_size"] * world * o["grad_accum"]
    if global_batch > len(train_ds):
        raise UsageError(
            f"a step needs {global_batch} windows but the training split has only {len(train_ds)} windows of {L} "
            "tokens; use a smaller --batch-size or --max-length, or more --data"
        )
    steps_per_epoch = len(train_ds) // global_batch
    epoch_steps = o["num_epochs"] * steps_per_epoch
    total = min(epoch_steps, o["max_steps"]) if o["max_steps"] else epoch_steps
    warmup = effective_warmup(o["warmup_steps"], total)
    if o["wandb"]:
        os.environ.setdefault("WANDB_PROJECT", o["wandb_project"])
    from .cli import resolve_device

    device = resolve_device(o["device"])
    dtype = resolve_dtype(o["dtype"], device)
    args = _training_args(o, out, total, warmup, dtype, device, eval_ds is not None)
    main = args.process_index == 0

    torch.manual_seed(o["seed"])
    model = GPT(cfg).to(args.device)
    hf_model = wrap(model)
    optimizer = model.configure_optimizer(o["learning_rate"], o["weight_decay"])
    tokens_per_step = global_batch * L

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if o["overwrite"]:
            clear_out_dir(out)
    resume_step = int(resume_from.rsplit("-", 1)[-1]) if resume_from else None
    metrics = MetricsFile(out / "metrics.jsonl", resume_step) if main else None
    last_eval: dict[str, Any] = {}

    class MetricsCallback(TrainerCallback):
        """Trainer's logs → the same metrics.jsonl rows as the native loop."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.last_step = time.perf_counter(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            step = state.global_step
            if "loss" in logs:
                now = time.perf_counter()
                rate = (step - self.last_step) * tokens_per_step / max(now - self.t0, 1e-9)
                self.t0, self.last_step = now, step
                loss = float(logs["loss"])
                row = {"step": step, "epoch": logs.get("epoch"), "tokens": step * tokens_per_step}
                row.update(train_loss=loss, ppl=perplexity(loss), lr=logs.get("learning_rate"))
                row.update(grad_norm=logs.get("grad_norm"), tokens_per_s=rate)
                metrics.write(row)
            if "eval_loss" in logs:
                loss = float(logs["eval_loss"])
                row = {"step": step, "tokens": step * tokens_per_step, "val_loss": loss, "val_ppl": perplexity(loss)}
                metrics.write(row)
                last_eval.update(row)

    if main:
        print(
            f"model: {o['preset']} preset, {model.num_params():,} parameters; transformers.Trainer, "
            f"{total:,} steps of {global_batch} windows of {L} tokens, warmup {warmup}",
            flush=True,
        )
    trainer = Trainer(
        model=hf_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        optimizers=(optimizer, None),
        callbacks=[MetricsCallback()],
    )
    t_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - t_start
    if eval_ds is not None and last_eval.get("step") != trainer.state.global_step:
        trainer.evaluate()  # logged through the callback
    trainer.save_model(str(out / "hf"))  # every rank takes part; rank 0 writes
    if not main:
        return 0
    step = trainer.state.global_step
    model.save_hf(out / "gpt2")
    # A native checkpoint (weights, config, tokenizer; no optimizer) for python -m gptkernels.evaluate/generate.
    args_stored = {k: v for k, v in o.items() if k not in NOT_STORED}
    native = {
        "step": step,
        "epoch": 0,
        "batch_index": 0,
        "tokens": step * tokens_per_step,
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "tokenizer": tokenizer_to_spec(tok),
        "args": args_stored,
        "trainer": "hf",
    }
    ckpt = save_checkpoint(out, native, keep=2)
    metrics.close()
    plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{o['preset']} (transformers.Trainer)")
    val = None
    if len(split.val) >= 2:
        val = evaluate_tokens(model, split.val, L, None, o["batch_size"], args.device)
    summary = {"steps": step, "tokens": step * tokens_per_step, "wall_s": round(wall, 1)}
    if val is not None:
        summary.update(val_loss=val["loss"], val_ppl=val["ppl"])
    (out / "hf_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(
        f"done: {step:,} steps in {fmt_duration(wall)}"
        + (f"; validation loss {val['loss']:.4f}, perplexity {val['ppl']:,.2f}" if val else ""),
        flush=True,
    )
    print(f"model: {out} (transformers), {out / 'gpt2'} (GPT2LMHeadModel); checkpoint: {ckpt}", flush=True)
    return 0
