"""The run's output folder: refuse to clobber another run, ``--overwrite`` exactly what training writes, and one
run per folder at a time (an exclusive lock for the run's life)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..checkpoint import list_checkpoints
from ..cli import UsageError

LOCK_NAME = ".train.lock"
# Files a training run (either trainer) writes at the top of its folder, besides ckpt_<step>.pt.
RUN_FILES = ("metrics.jsonl", "loss.png", "run.json", "hf_summary.json", "tokenizer.json")
# Model folders that --trainer hf exports into its folder: removed only when they are such an export.
EXPORT_DIRS = ("hf", "gpt2")


def trainer_checkpoints(out: Path) -> list[Path]:
    """transformers.Trainer's ``checkpoint-<step>`` folders, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def existing_run(out: Path) -> list[Path]:
    """The checkpoints of a run already in ``out`` (native and Trainer's)."""
    return list_checkpoints(out) + trainer_checkpoints(out) if out.is_dir() else []


def is_run_folder(p: Path) -> bool:
    """Whether ``p`` holds a training run of its own (a nested ``--out-dir``): never removed by --overwrite."""
    if not p.is_dir():
        return False
    if list_checkpoints(p) or trainer_checkpoints(p):
        return True
    return any((p / name).exists() for name in (*RUN_FILES, LOCK_NAME))


def check_out_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """The output folder, refusing to clobber another run unless ``resume`` or ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file, not a folder")
    existing = existing_run(out)
    if existing and not (resume or overwrite):
        raise UsageError(
            f"--out-dir {out} already holds a run ({existing[-1].name}); pass --resume to continue it, "
            "--overwrite to start over, or another --out-dir"
        )
    return out


def _is_export(p: Path) -> bool:
    # save_pretrained writes files only (config.json, weights, generation_config.json): no subfolders.
    return (p / "config.json").is_file() and not is_run_folder(p) and not any(c.is_dir() for c in p.iterdir())


def clear_out_dir(out: Path) -> list[Path]:
    """``--overwrite``: remove what a training run writes at the top of ``out`` and nothing else; never another
    run's folder (``out/hf`` may be a nested run as well as --trainer hf's export). Returns what was removed."""
    removed = []
    for p in list_checkpoints(out) + sorted(out.glob(".ckpt_*.tmp")):
        p.unlink(missing_ok=True)
        removed.append(p)
    for p in trainer_checkpoints(out):
        if not is_run_folder(p):
            shutil.rmtree(p)
            removed.append(p)
    for name in RUN_FILES:
        p = out / name
        if p.is_file():
            p.unlink()
            removed.append(p)
    for name in EXPORT_DIRS:
        p = out / name
        if p.is_dir() and _is_export(p):
            shutil.rmtree(p)
            removed.append(p)
    return removed


class OutDirLock:
    """An exclusive ``flock`` on ``<out>/.train.lock`` for a run's life: a second run (or an ``--overwrite``) in
    the same folder is refused with the holder's pid. The kernel drops the lock when the process dies, so a
    killed run never leaves a stale lock. A no-op where ``fcntl`` does not exist (Windows)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> OutDirLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise UsageError(
                f"--out-dir {self.path.parent} is in use by another training run (pid {holder}); wait for it to "
                "finish or stop it, or use another --out-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
