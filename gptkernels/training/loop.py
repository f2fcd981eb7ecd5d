"""The native training loop and :func:`train`, the one entry point of training.

:func:`train` takes a :class:`TrainConfig` and returns a :class:`TrainResult`; problems are exceptions:
:class:`~gptkernels.cli.UsageError` (bad options, data or output folder: nothing written),
:class:`TrainingDiverged` (NaN/inf loss: the last good checkpoint is kept), :class:`TrainingInterrupted`
(SIGINT/SIGTERM: a checkpoint was saved to resume from) and :class:`~gptkernels.cli.OutputWriteError` (a file
could not be written). ``python -m gptkernels.train`` maps them to exit statuses 2, 1, 130/143 and 3. It can be
called many times in one process: it restores the signal handlers and thread count it changes and releases the
out-dir lock, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write_bytes, get_rng_state, latest_checkpoint, save_checkpoint, set_rng_state
from ..cli import UsageError
from ..evaluate import evaluate_tokens, perplexity
from .config import ARCH_KEYS, TrainConfig, TrainResult
from .metrics import MetricsFile, WandbLogger, fmt_duration, plural, result_from_files, say
from .outdir import OutDirLock, check_out_dir, clear_out_dir
from .resume import load_resume_state, overridden
from .runtime import choose_threads, init_distributed, load_data, local_world_size, peak_flops, resolve_dtype
from .schedule import FINAL_LR_FRACTION, default_eval_steps, effective_warmup, lr_factor, plan_steps


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after it saved a checkpoint (``checkpoint``) to resume from."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}: saved {checkpoint}; continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def train(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says and return the final numbers; see the module docstring for the exceptions.

    Example::

        from gptkernels.training import TrainConfig, train
        result = train(TrainConfig(preset="tiny", max_steps=200, out_dir="out/tiny"))
        print(result.final_val_loss, result.final_val_bpb, result.checkpoint)
    """
    return run_training(config)


def run_training(config: TrainConfig, state: dict[str, Any] | None = None) -> TrainResult:
    """:func:`train`, with the resumed checkpoint ``state`` when the caller has loaded it already."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(config).__name__}")
    config.validate()
    if config.trainer == "hf":
        from ..hf_trainer import train_hf

        return train_hf(config)
    if config.resume and state is None:
        state = load_resume_state(config.out_dir)
    return NativeTrainer(config, state).run()


def _short(v: Any) -> str:
    return " ".join(v) if isinstance(v, list) else repr(v) if isinstance(v, str) else str(v)


class NativeTrainer:
    """One run of this package's loop: :meth:`run` sets up, trains and returns a :class:`TrainResult`."""

    def __init__(self, config: TrainConfig, state: dict[str, Any] | None) -> None:
        self.c, self.state = config, state
        self.rank, self.world, self.device = init_distributed(config.device, config.dist_timeout)
        self.main = self.rank == 0
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.stop_signal: int | None = None
        self.saving = False  # a checkpoint is being written: a repeated Ctrl-C waits for it
        self.notes: list[str] = []  # lines for the header: what resuming changed
        self.wandb: WandbLogger | None = None
        self.metrics: MetricsFile | None = None
        self.last_eval: dict[str, Any] | None = None

    def print(self, *args: Any) -> None:
        if self.main:
            say(*args)

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from ..data import WindowDataset
        from ..model import GPT
        from ..tokenizer import tokenizer_to_spec

        c, state = self.c, self.state
        self.out = check_out_dir(c.out_dir, c.resume, c.overwrite)
        if state is not None and "optimizer" not in state:
            raise UsageError(f"--resume: {state['path']} was written by --trainer hf; resume it with --trainer hf")
        if state is not None:
            self.check_resume_options(state)
        spec = state["tokenizer"] if state else None
        self.tokenizer, self.split = load_data(c.data, c.tokenizer, c.val_fraction, c.max_tokens, spec)
        self.cfg = c.model_config(self.tokenizer.n_vocab)
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
            from ..ops._backend import why_not_triton

            reason = why_not_triton(self.device)
            if reason is not None:
                raise UsageError(f"--kernels triton: {reason}")
        L = c.max_length or self.cfg.context_length
        if L > self.cfg.context_length:
            raise UsageError(f"--max-length {L} exceeds the model's --context-length {self.cfg.context_length}")
        self.max_length = L
        try:
            self.windows = WindowDataset(self.split.train, L, c.stride, c.shift)
        except ValueError as e:
            raise UsageError(f"training split too small: {e}; use a smaller --max-length or more --data") from None
        self.global_batch = c.batch_size * self.world * c.grad_accum
        n = len(self.windows)
        if self.global_batch > n:
            raise UsageError(
                f"a step needs --batch-size {c.batch_size} × {self.world} process(es) × --grad-accum "
                f"{c.grad_accum} = {self.global_batch} windows but the training split has only {n} windows of "
                f"{L} tokens; use a smaller --batch-size or --max-length, or more --data"
            )
        self.steps_per_epoch, self.total_steps = plan_steps(n, self.global_batch, c.num_epochs, c.max_steps)
        self.warmup = effective_warmup(c.warmup_steps, self.total_steps)
        # The schedule is planned when a run starts and kept when it is resumed, even with another --max-steps:
        # steps past its end continue at the final learning rate (no second warmup, no second cosine).
        self.planned_steps = self.total_steps
        planned = (state or {}).get("schedule")
        if planned is not None:
            self.warmup, self.planned_steps = planned["warmup_steps"], planned["total_steps"]
            if self.total_steps > self.planned_steps:
                self.notes.append(
                    f"extending the run from {plural(self.planned_steps, 'step')} to {self.total_steps:,}: its "
                    f"learning-rate schedule ended at step {self.planned_steps:,}, so the extra steps continue at "
                    f"its final learning rate {c.learning_rate * FINAL_LR_FRACTION:g} (start a new run, or "
                    "fine-tune from this one, for a new warmup and cosine)"
                )
            elif self.total_steps < self.planned_steps:
                self.notes.append(
                    f"stopping at step {self.total_steps:,} of the {self.planned_steps:,} the run was planned "
                    "for: its learning rate follows the original schedule and will not have decayed fully"
                )
        self.eval_steps = c.eval_steps or default_eval_steps(self.total_steps)

        # Same initial weights on every rank; dropout streams differ per rank.
        torch.manual_seed(c.seed)
        self.model = GPT(self.cfg).to(self.device)
        self.opt = self.model.configure_optimizer(c.learning_rate, c.weight_decay)
        warmup, total = self.warmup, self.planned_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, warmup, total))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")
        self.step, self.epoch, self.offset, self.tokens = 0, 0, 0, 0
        self.pending = {"loss_sum": 0.0, "steps": 0}
        torch.manual_seed(c.seed + self.rank)
        if state is not None:
            self.restore(state)
        self.tokenizer_spec = tokenizer_to_spec(self.tokenizer)

        train_model: torch.nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if c.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model
        self.amp = self.dtype in ("bf16", "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.dtype)
        self.peak = peak_flops(self.device)
        self.flops_per_token = self.model.flops_per_token(L)
        self._perm_epoch, self._perm = -1, None

    def check_resume_options(self, state: dict[str, Any]) -> None:
        """Refuse a different tokenizer; name every other option that differs from the checkpoint's."""
        changed = overridden(self.c.stored(), state)
        if "tokenizer" in changed:
            old, new = changed["tokenizer"]
            raise UsageError(
                f"--resume: {state['path']} was trained with --tokenizer {old}; it cannot continue with "
                f"--tokenizer {new} (the model's vocabulary is that tokenizer's); drop --tokenizer"
            )
        if changed:
            shown = ", ".join(f"{k} {_short(a)} → {_short(b)}" for k, (a, b) in changed.items())
            note = f"resuming with options changed from the checkpoint's: {shown}"
            order = sorted({"data", "seed", "max_tokens", "val_fraction", "batch_size", "grad_accum"} & changed.keys())
            if order:
                note += f" (changing {', '.join(order)} means this is no longer the run an uninterrupted one would be)"
            self.notes.append(note)

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
                "sources": list(self.c.data),
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
            g = torch.Generator().manual_seed(self.c.seed * 100_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g), self.epoch
        idx = self._perm[self.offset : self.offset + self.global_batch]
        self.offset += self.global_batch
        return idx

    def micro_batch(self, idx: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ..model import shift_labels

        B = self.c.batch_size
        start = (micro * self.world + self.rank) * B  # micro-batches in order, each split across the ranks
        items = [self.windows[int(i)] for i in idx[start : start + B]]
        if self.c.shift == "explicit":
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
        c = self.c
        idx = self.next_indices()
        loss_sum = torch.zeros((), device=self.device)
        accum = c.grad_accum
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
        clip = c.gradient_clipping if c.gradient_clipping > 0 else float("inf")
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
            self.c.batch_size,
            self.device,
            autocast_dtype=self.amp_dtype,
            max_tokens=self.c.eval_max_tokens,
            tokenizer=self.tokenizer,
        )
        row = {"step": self.step, "tokens": self.tokens, "val_loss": r["loss"], "val_ppl": r["ppl"]}
        row["val_bpb"] = r["bpb"]
        self.print(
            f"step {self.step}: validation loss {r['loss']:.4f}, perplexity {r['ppl']:,.2f}, "
            f"{r['bpb']:.4f} bits per byte"
        )
        if self.c.sample_tokens > 0:
            self.print(f"  sample: {self.sample()}")
        return row

    def sample(self) -> str:
        from ..generation import generate_text

        try:
            text = generate_text(
                self.model,
                self.c.sample_prompt,
                max_new_tokens=self.c.sample_tokens,
                temperature=0.8,
                top_k=40,
                tokenizer=self.tokenizer,
                seed=self.c.seed,  # its own generator: the training random streams are untouched
            )
        except Exception as e:  # e.g. a prompt character a char tokenizer never saw: a sample never stops training
            return f"(no sample: {type(e).__name__}: {' '.join(str(e).split())})"
        return " ".join(text.split())  # one line

    def save(self, eval_due: bool = False) -> Path | None:
        """Collective: every rank contributes its random state; rank 0 writes. Parameters that are not finite are
        never saved (the checkpoint before them stays the last good one)."""
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingDiverged(
                f"the parameters became NaN or infinite by step {self.step} ({bad[0]}"
                + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                + f"); not saved. The last good checkpoint is {latest_checkpoint(self.out) or '(none yet)'}: "
                "resume from it with --resume, perhaps with a lower --learning-rate"
            )
        rng = get_rng_state(self.device)
        if self.world > 1:
            import torch.distributed as dist

            rngs: list[Any] = [None] * self.world
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if not self.main:
            return None
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
            "args": self.c.stored(),
            "pending": dict(self.pending),
            "wandb_run_id": self.wandb.id if self.wandb is not None else None,
            "schedule": {"warmup_steps": self.warmup, "total_steps": self.planned_steps},
            "eval_due": eval_due,  # stopped by a signal before this step's evaluation: --resume runs it first
        }
        self.saving = True
        try:
            return save_checkpoint(self.out, state, keep=2)
        finally:
            self.saving = False

    # -- the loop -----------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        """First Ctrl-C (or SIGTERM): say at once that the run stops after this step with a checkpoint. Second:
        say it is still finishing (during the save: that it waits for it). Third: stop now, losing this step."""
        name = signal.Signals(signum).name
        self.signals_seen = getattr(self, "signals_seen", 0) + 1
        if self.signals_seen == 1:
            self.stop_signal = signum
            msg = (
                f"{name}: stopping after step {self.step + 1:,} (the current one); a checkpoint will be written then "
                "to resume from with --resume. Ctrl-C twice more stops at once, losing the steps since the last "
                "checkpoint."
            )
        elif self.signals_seen == 2:
            doing = "writing the checkpoint" if self.saving else f"finishing step {self.step + 1:,}"
            msg = f"{name}: still {doing}; waiting for it. Ctrl-C once more stops at once and loses the step."
        else:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        if self.main:
            os.write(2, f"\n{msg}\n".encode())  # os.write: safe inside a signal handler, unlike print

    def _stop_requested(self) -> int:
        """The signal that asked to stop (0: none); with several processes, any rank's request stops them all."""
        flag = self.stop_signal or 0
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([flag], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def run(self) -> TrainResult:
        threads_before = torch.get_num_threads()
        lock: OutDirLock | None = None
        handlers = {}
        try:
            if self.device.type == "cpu":
                self.threads, self.threads_why = choose_threads(self.c.threads, local_processes=local_world_size())
                torch.set_num_threads(self.threads)
            self.setup()
            if self.step >= self.total_steps:
                self.print(
                    f"nothing to do: the run in {self.out} is at step {self.step}, its last ({self.total_steps})"
                )
                ckpt = latest_checkpoint(self.out)
                return result_from_files(self.out, self.model, self.step, self.tokens, 0.0, ckpt)
            lock = OutDirLock(self.out) if self.main else None
            if lock is not None:
                lock.acquire()  # before anything is written or removed
            self._start()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                    handlers[sig] = signal.signal(sig, self._on_signal)
            return self._loop()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if self.metrics is not None:
                self.metrics.close()
            if lock is not None:
                lock.release()
            torch.set_num_threads(threads_before)

    def _start(self) -> None:
        """Rank 0: clear (--overwrite), write run.json, open metrics.jsonl and W&B, print the header."""
        c, out = self.c, self.out
        self.resume_step = self.state["step"] if self.state is not None else None
        if not self.main:
            return
        info = self.describe()
        d, sch = info["data"], info["schedule"]
        out.mkdir(parents=True, exist_ok=True)
        if c.overwrite:
            clear_out_dir(out)
        run_info = {"options": c.stored(), **info}
        data = json.dumps(run_info, indent=2).encode()
        atomic_write_bytes(out / "run.json", lambda f: f.write(data))
        self.metrics = MetricsFile(out / "metrics.jsonl", self.resume_step)
        if c.wandb:
            run_id = self.state.get("wandb_run_id") if self.state else None
            self.wandb = WandbLogger(c.wandb_project, c.wandb_run_name, run_info, out, run_id)
        self.print(
            f"model: {c.preset} preset, {info['parameters']:,} parameters "
            f"({plural(self.cfg.n_layers, 'layer')} × {self.cfg.emb_dim} wide, {plural(self.cfg.n_heads, 'head')}, "
            f"context {self.cfg.context_length}, vocab {self.cfg.vocab_size:,})"
        )
        self.print(
            f"data: {', '.join(d['sources'])}: {plural(d['documents'], 'document')}, {d['tokens']:,} tokens → "
            f"train {d['train_tokens']:,} / val {d['val_tokens']:,}; {d['train_windows']:,} training windows "
            f"of {d['max_length']} (stride {d['stride']})"
        )
        self.print(
            f"training: {plural(self.total_steps, 'step')} of {plural(self.global_batch, 'window')} "
            f"({sch['tokens_per_step']:,} tokens; {self.world} process(es)) on {self.device}, {self.dtype}; "
            f"lr {c.learning_rate:g}, warmup {self.warmup}, cosine to {c.learning_rate * FINAL_LR_FRACTION:g}"
            + (f" at step {self.planned_steps:,}" if self.planned_steps != self.total_steps else "")
        )
        if self.device.type == "cpu":
            self.print(
                f"threads: {plural(self.threads, 'thread')} per process ({self.threads_why}); --threads N to change"
            )
        if c.sample_tokens > 0:  # samples at each evaluation: say which sampling op draws them (and build it now)
            from ..sampling import extension_status

            self.print(f"sampling: {extension_status()}")
        if self.resume_step is not None:
            self.print(f"resuming from {self.state['path']} at step {self.resume_step:,}")
        for note in self.notes:
            self.print(note)
        save = getattr(self.tokenizer, "save", None)
        if callable(save):  # a tokenizer trained on this data (e.g. a small BPE): beside the checkpoints
            save(str(out / "tokenizer.json"))

    def _loop(self) -> TrainResult:
        from tqdm import tqdm

        c = self.c
        last_ckpt = latest_checkpoint(self.out) if self.main else None
        if self.resume_step is None or (self.state or {}).get("eval_due"):
            self._log_eval()
        # A live bar on a terminal; in a redirected log the step lines (every --log-steps, with an ETA) suffice.
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.main and sys.stderr.isatty()),
            smoothing=0.1,
        )
        self.start_step = self.step
        loss_acc = torch.zeros((), device=self.device)
        grad_bad = torch.zeros((), device=self.device)
        n_acc, since = 0, self.step
        t0 = self.t_start = time.perf_counter()
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
                log = self.step % c.log_steps == 0 or last
                # Asked to stop: skip a due evaluation (it can take long) and let --resume run it.
                ev_due = self.step % self.eval_steps == 0 or last
                ev = ev_due and not (stop and not last)
                save = self.step % c.save_steps == 0 or last or stop
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
                    last_ckpt = self.save(eval_due=ev_due and not ev) or last_ckpt
                if ev or save:
                    t0 = time.perf_counter()  # evaluation and saving do not count against tokens/s
                    since = self.step
                if stop:
                    bar.close()
                    self.print(
                        f"{signal.Signals(stop).name} at step {self.step}: saved {last_ckpt}; continue with --resume"
                    )
                    self._barrier()
                    raise TrainingInterrupted(stop, self.step, last_ckpt)
        wall = time.perf_counter() - self.t_start
        result = self._finish(wall, last_ckpt)
        self._barrier()  # no rank leaves (and tears the process group down) while another still works
        return result

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
            f"{tokens_per_s:,.0f} tok/s{extra} | eta {fmt_duration(self.eta())}"
        )

    def eta(self) -> float:
        """Seconds left at this call's average pace (evaluations and saves included)."""
        done = self.step - self.start_step
        return (time.perf_counter() - self.t_start) / max(1, done) * (self.total_steps - self.step)

    def _log_eval(self) -> None:
        row = self.evaluate()
        if row is not None:
            self.metrics.write(row)
            if self.wandb is not None:
                self.wandb.log(row)
            self.last_eval = row
            from ..plotting import plot_losses

            plot_losses(self.metrics.path, self.out / "loss.png", title=self.title())
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def title(self) -> str:
        return f"{self.c.preset} ({self.model.num_params() / 1e6:.2f}M parameters) on {', '.join(self.c.data)}"

    def _finish(self, wall: float, last_ckpt: Path | None) -> TrainResult:
        result = result_from_files(self.out, self.model, self.step, self.tokens, wall, last_ckpt)
        if not self.main:
            return result
        from ..plotting import plot_losses

        plot_losses(self.metrics.path, self.out / "loss.png", title=self.title())
        ev = self.last_eval
        summary = {"steps": self.step, "tokens": self.tokens, "wall_s": round(wall, 1)}
        if ev is not None:
            summary.update(val_loss=ev["val_loss"], val_ppl=ev["val_ppl"], val_bpb=ev["val_bpb"])
        if self.wandb is not None:
            self.wandb.finish(last_ckpt, summary)
        self.print(
            f"done: {plural(self.step, 'step')}, {plural(self.tokens, 'token')} in {fmt_duration(wall)}"
            + (
                f"; validation loss {ev['val_loss']:.4f}, perplexity {ev['val_ppl']:,.2f}, "
                f"{ev['val_bpb']:.4f} bits per byte"
                if ev
                else ""
            )
        )
        self.print(f"checkpoint: {last_ckpt}")
        self.print(f"metrics: {self.out / 'metrics.jsonl'}, picture: {self.out / 'loss.png'}")
        return result
