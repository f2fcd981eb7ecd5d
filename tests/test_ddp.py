"""torchrun + DistributedDataParallel on the CPU (gloo): two processes train exactly what one process does
with the same global batch, and only rank 0 writes files."""

from pathlib import Path

import pytest
import torch

from gptkernels.checkpoint import list_checkpoints, load_checkpoint
from gptkernels.plotting import read_metrics

from .cli_helpers import SMALL, run_cli, small_corpus  # noqa: F401 (the corpus fixture: pytest finds it by name)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def common_args(corpus: Path, out: Path) -> list[str]:
    # drop_rate 0: with dropout the two layouts would draw different masks.
    args = [*SMALL, "--data", str(corpus), "--tokenizer", "char", "--drop-rate", "0", "--max-steps", "6"]
    args += ["--log-steps", "1", "--eval-steps", "3", "--save-steps", "3", "--sample-tokens", "0"]
    return [*args, "--out-dir", str(out)]


def test_two_processes_equal_one_process_with_the_same_global_batch(corpus, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    proc = run_cli("gptkernels.train", *common_args(corpus, single), "--batch-size", "8", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # 2 ranks × 2 micro-batches (gradient accumulation, DDP no_sync on the first) × 2 windows = 8 per step.
    launcher = ["--nproc_per_node=2", "--standalone", "-m", "gptkernels.train"]
    args = [*common_args(corpus, ddp), "--batch-size", "2", "--grad-accum", "2"]
    proc = run_cli("torch.distributed.run", *launcher, *args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("done:") == 1  # only rank 0 reports

    a, b = load_checkpoint(single), load_checkpoint(ddp)
    assert a["step"] == b["step"] == 6 and a["tokens"] == b["tokens"] == 6 * 8 * 32
    assert len(b["rng"]) == 2  # each rank's random state, for an exact resume
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)

    rows_a, rows_b = read_metrics(single / "metrics.jsonl"), read_metrics(ddp / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]  # each row once: rank 0 writes alone
    for ra, rb in zip(rows_a, rows_b):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)
    assert [p.name for p in list_checkpoints(ddp)] == ["ckpt_000003.pt", "ckpt_000006.pt"]
    assert (ddp / "loss.png").is_file()
