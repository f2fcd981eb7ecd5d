"""The run's folder and life: --overwrite removes only training's own files, one run per folder (lock), Ctrl-C
twice, extending a finished run keeps its learning-rate schedule, --resume with other options, thread choice,
non-finite parameters never saved, a failed write (exit 3)."""

import os
import signal
from pathlib import Path

import pytest
import torch

from gptkernels.checkpoint import list_checkpoints, load_checkpoint
from gptkernels.cli import OutputWriteError, UsageError
from gptkernels.plotting import read_metrics
from gptkernels.training import TrainConfig, TrainingDiverged, train
from gptkernels.training.outdir import OutDirLock

from .cli_helpers import SMALL, cli_env, one_thread, run_cli, small_corpus, start_and_wait_for_checkpoint  # noqa: F401 (fixtures: found by name)

FAST = ["--tokenizer", "char", "--sample-tokens", "0", "--log-steps", "1"]


def fast_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [*SMALL, "--data", str(corpus), *FAST, "--out-dir", str(out), *extra]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``python -m gptkernels.train *argv`` in this process: (exit status, stdout, stderr)."""
    from gptkernels import train as train_cli
    from gptkernels.cli import cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(train_cli.main, [*argv, "--kernels", "torch"] if "--resume" not in argv else list(argv))
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def small_config(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(emb_dim=32, n_layers=2, n_heads=2, context_length=32, tokenizer="char", sample_tokens=0)
    return TrainConfig(data=[str(corpus)], out_dir=str(out), kernels="torch", **{**base, **kw})


# ---------------------------------------------------------------------------------------------------------
# --overwrite and the lock
# ---------------------------------------------------------------------------------------------------------


def test_overwrite_removes_only_this_runs_files_never_a_nested_run(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, *fast_args(corpus, out, "--max-steps", "2"))
    assert code == 0, err
    # Beside it: a nested run in out/hf (the README's --out-dir out/hf), a user's file, an old Trainer checkpoint
    # folder and an old --trainer hf export in out/gpt2.
    nested = out / "hf"
    nested.mkdir()
    (nested / "ckpt_000005.pt").write_bytes(b"another run's checkpoint")
    (nested / "metrics.jsonl").write_text("{}\n")
    (nested / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "trainer_state.json").write_text("{}")
    (out / "gpt2").mkdir()
    (out / "gpt2" / "config.json").write_text("{}")
    (out / "gpt2" / "model.safetensors").write_bytes(b"x")

    code, _, err = cli(capsys, *fast_args(corpus, out, "--max-steps", "3", "--overwrite"))
    assert code == 0, err
    assert (nested / "ckpt_000005.pt").read_bytes() == b"another run's checkpoint"  # the nested run is whole
    assert (nested / "metrics.jsonl").exists() and (nested / "config.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoint-7").exists() and not (out / "gpt2").exists()  # training's own outputs: gone
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_000003.pt"]
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 3  # the new run's metrics only


def test_a_second_run_or_overwrite_beside_a_live_run_is_refused_naming_its_pid(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = small_config(corpus, out, max_steps=2)
    train(cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".train.lock"}
    with OutDirLock(out):  # what a live run holds for its whole life
        code, _, err = cli(capsys, *fast_args(corpus, out, "--max-steps", "4", "--overwrite"))
        assert code == 2 and err.count("\n") == 1, err
        assert f"in use by another training run (pid {os.getpid()})" in err
        with pytest.raises(UsageError, match="in use by another training run"):
            train(small_config(corpus, out, max_steps=4, resume=True))
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".train.lock"}
    assert after == before  # nothing removed or written
    assert train(small_config(corpus, out, max_steps=3, resume=True)).steps == 3  # released: the run continues


def test_a_failed_write_propagates_releases_the_lock_and_exits_3(corpus, tmp_path, monkeypatch, capsys):
    from gptkernels.training import loop

    def fail(*args, **kwargs):
        raise OutputWriteError("cannot write checkpoint: No space left on device")

    monkeypatch.setattr(loop, "save_checkpoint", fail)
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError):
        train(small_config(corpus, out, max_steps=2))
    with OutDirLock(out):  # released by the failed run
        pass
    code, _, err = cli(capsys, *fast_args(corpus, tmp_path / "o2", "--max-steps", "2"))
    assert code == 3 and err.startswith("error: cannot write checkpoint") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------------


def test_second_ctrl_c_waits_for_the_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    # Steps of about a second on one thread, so that the second Ctrl-C lands while the step is still running.
    args = [*fast_args(corpus, out), "--emb-dim", "256", "--n-layers", "4", "--context-length", "128"]
    args += ["--batch-size", "16", "--max-steps", "50", "--save-steps", "1", "--eval-steps", "100"]
    proc = start_and_wait_for_checkpoint(args, out)  # out's parent is tmp_path
    proc.send_signal(signal.SIGINT)
    lines = []
    while not any("a checkpoint will be written" in line for line in lines):  # printed at once, mid-step
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    stderr = "".join(lines) + stderr
    assert proc.returncode == 130, stderr[-3000:]
    assert "SIGINT: still finishing step" in stderr or "SIGINT: still writing the checkpoint" in stderr
    assert "waiting for it" in stderr
    stopped = int(stdout.split("SIGINT at step ")[1].split(":")[0])
    assert load_checkpoint(out)["step"] == stopped  # the step that was running when Ctrl-C came was saved


# ---------------------------------------------------------------------------------------------------------
# Resume: extending a finished run, other options
# ---------------------------------------------------------------------------------------------------------


def test_extending_a_finished_run_continues_at_the_final_learning_rate(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *fast_args(corpus, out, "--max-steps", "10", "--learning-rate", "1e-3"))
    assert code == 0, err
    code, stdout, err = cli(capsys, "--resume", "--out-dir", str(out), "--max-steps", "14")
    assert code == 0, err
    assert "extending the run from 10 steps to 14" in stdout and "final learning rate 0.0001" in stdout
    lrs = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r}
    assert lrs[10] == pytest.approx(1e-4)  # the cosine's end
    assert [lrs[s] for s in (11, 12, 13, 14)] == pytest.approx([1e-4] * 4)  # no second warmup

    # Other options: the tokenizer cannot change; a changed seed is said, not silently applied.
    code, _, err = cli(capsys, "--resume", "--out-dir", str(out), "--tokenizer", "gpt2")
    assert code == 2 and "--tokenizer char" in err and err.count("\n") == 1, err
    code, stdout, err = cli(capsys, "--resume", "--out-dir", str(out), "--max-steps", "15", "--seed", "5")
    assert code == 0, err
    assert "options changed from the checkpoint's: max_steps 14 → 15, seed 123 → 5" in stdout
    assert "no longer the run an uninterrupted one would be" in stdout


# ---------------------------------------------------------------------------------------------------------
# Options and numbers
# ---------------------------------------------------------------------------------------------------------


def test_threads_default_from_free_cores(monkeypatch):
    from gptkernels.training import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    for load, processes, want in [(0.0, 1, 4), (1.2, 1, 3), (3.9, 1, 1), (9.0, 1, 1), (0.0, 2, 2), (0.0, 8, 1)]:
        monkeypatch.setattr(runtime.os, "getloadavg", lambda load=load: (load, load, load))
        n, why = runtime.choose_threads(None, processes)
        assert n == want, (load, processes)
        assert f"load average {load:.2f}" in why and "4 cores" in why
    assert runtime.choose_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.choose_threads(None)[1] == "OMP_NUM_THREADS"


def test_distributed_collectives_get_the_timeout(monkeypatch):
    import datetime

    import torch.distributed as dist

    from gptkernels.training import runtime

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    for k, v in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1").items():
        monkeypatch.setenv(k, v)
    assert runtime.init_distributed("cpu", timeout_s=42) == (1, 2, torch.device("cpu"))
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=42)}
    assert TrainConfig().dist_timeout == 600
    with pytest.raises(UsageError, match="--dist-timeout"):
        TrainConfig(dist_timeout=0)


def test_non_finite_parameters_are_never_saved(corpus, tmp_path):
    from gptkernels.training.loop import NativeTrainer

    out = tmp_path / "run"
    trainer = NativeTrainer(small_config(corpus, out, max_steps=2), None)
    trainer.setup()
    with torch.no_grad():
        trainer.model.transformer.h[0].attn.c_attn.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="parameters became NaN or infinite by step 0.*c_attn.weight"):
        trainer.save()
    assert list_checkpoints(out) == []


def test_a_tokenizer_trained_on_the_data_is_built_from_it_and_saved_beside_the_checkpoint(corpus, tmp_path):
    from gptkernels.checkpoint import load_model
    from gptkernels.tokenizer import get_tokenizer

    out = tmp_path / "run"
    train(small_config(corpus, out, max_steps=1, tokenizer="bpe:300"))
    text = corpus.read_text(encoding="utf-8")
    saved = get_tokenizer(f"bpe:{out / 'tokenizer.json'}")  # the file beside the checkpoint
    _, from_checkpoint = load_model(out)  # the spec inside the checkpoint
    trained_here = get_tokenizer("bpe:300", text=[text])  # the same training, deterministic
    assert saved.n_vocab == from_checkpoint.n_vocab == trained_here.n_vocab
    ids = trained_here.encode_ordinary(text)
    assert saved.encode_ordinary(text) == from_checkpoint.encode_ordinary(text) == ids
    assert len(ids) < 0.9 * len(text)  # merges learned from this corpus: fewer tokens than characters
