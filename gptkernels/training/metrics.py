"""What a run reports: ``metrics.jsonl``, Weights & Biases, the console lines and the progress display."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes, output_errors
from ..cli import UsageError
from .config import TrainResult


def fmt_duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 step``, ``300 steps`` (thousands separated)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def say(*args: Any) -> None:
    """One line on stdout that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
    sys.stdout.flush()


class MetricsFile:
    """``metrics.jsonl``: one JSON object per line, flushed per row. On resume, rows after the checkpoint's step
    (written by the run that crashed) are dropped so that every step appears once."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None or not path.exists():
            path.write_text("", encoding="utf-8")
        else:
            from ..plotting import read_metrics

            keep = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            data = "".join(json.dumps(r) + "\n" for r in keep).encode()
            atomic_write_bytes(path, lambda f: f.write(data))
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, row: dict[str, Any]) -> None:
        with output_errors(self.path):  # a full disk here is exit 3 with the file named, like a checkpoint
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def final_rows(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The last training row and the last validation row of a ``metrics.jsonl``."""
    from ..plotting import read_metrics

    rows = read_metrics(path) if path.exists() else []
    train = next((r for r in reversed(rows) if "train_loss" in r), None)
    val = next((r for r in reversed(rows) if "val_loss" in r), None)
    return train, val


class WandbLogger:
    """Weights & Biases, imported only with --wandb (WANDB_MODE=offline keeps everything local)."""

    def __init__(self, project: str, name: str | None, config: dict[str, Any], out: Path, run_id: str | None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise UsageError("--wandb needs the wandb package: pip install wandb") from e
        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            name=name,
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


def result_from_files(out: Path, model: Any, step: int, tokens: int, wall: float, ckpt: Path | None) -> TrainResult:
    train_row, val_row = final_rows(out / "metrics.jsonl")
    return TrainResult(
        steps=step,
        tokens=tokens,
        wall_time_s=wall,
        final_train_loss=train_row["train_loss"] if train_row else None,
        final_val_loss=val_row["val_loss"] if val_row else None,
        final_val_ppl=val_row["val_ppl"] if val_row else None,
        final_val_bpb=val_row.get("val_bpb") if val_row else None,
        n_params=model.num_params(),
        n_params_non_embedding=model.num_params(non_embedding=True),
        out_dir=out,
        checkpoint=ckpt,
        metrics={"train": train_row, "val": val_row},
    )
