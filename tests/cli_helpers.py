"""Shared setup for the tests that run the command-line tools: a small model, a small corpus, and the
environment and runner for ``python -m gptkernels.<command>`` subprocesses.

Test modules import the fixtures by name (``from .cli_helpers import one_thread, small_corpus``); pytest then
uses them as if they were defined in that module.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "32"]

# Set by torchrun or an outer launcher; a child that inherits them would try to join that process group.
_DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a command under test: PyTorch ops (Triton's interpreter is far too slow for
    training), one thread, this checkout importable, offline, no inherited W&B mode or process group.
    ``extra`` is applied last, e.g. ``WANDB_MODE="offline"``."""
    env = {**os.environ, "GPTKERNELS_BACKEND": "torch", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in (*_DISTRIBUTED_VARS, "WANDB_MODE"):
        env.pop(key, None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def run_cli(module: str, *args: str, cwd: Path, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """``python -m module *args`` in ``cwd`` with :func:`cli_env` plus ``env``; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_small_corpus(path: Path) -> Path:
    """~32 KB of English prose and code from CPython's docs: a char-level corpus that trains in seconds."""
    from pydoc_data.topics import topics

    path.write_text("".join(topics[k] for k in sorted(topics)[:8]), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: one intra-op thread is faster than two fighting the rest of the suite for two cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", name="corpus")
def small_corpus(tmp_path_factory) -> Path:
    """The corpus of :func:`write_small_corpus`, once per test module; tests ask for it as ``corpus``."""
    return write_small_corpus(tmp_path_factory.mktemp("corpus") / "small.txt")


def start_and_wait_for_checkpoint(args: list[str], out: Path) -> subprocess.Popen:
    """Start ``python -m gptkernels.train *args`` (from ``out``'s parent) and return once ``out`` has a checkpoint."""
    from gptkernels.checkpoint import latest_checkpoint

    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkernels.train", *args],
        cwd=out.parent,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    return proc
