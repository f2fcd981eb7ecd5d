"""python -m gptkernels.train: a shortened default run, resume after SIGKILL/SIGINT, NaN stop, W&B offline,
the learning-rate schedule, config files, and sliding-window evaluation.

Training runs in subprocesses with the PyTorch ops (GPTKERNELS_BACKEND=torch: Triton's interpreter is far too
slow for training) and one thread each (two cores shared with the rest of the suite).
"""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptkernels import GPT, GPTConfig
from gptkernels.checkpoint import list_checkpoints, load_checkpoint
from gptkernels.cli import UsageError
from gptkernels.evaluate import evaluate_tokens, window_starts
from gptkernels.plotting import read_metrics
from gptkernels.train import DEFAULTS, default_eval_steps, effective_warmup, lr_factor, resolve_options

from .cli_helpers import SMALL, cli_env, one_thread, run_cli, small_corpus, start_and_wait_for_checkpoint  # noqa: F401 (fixtures: found by name)

TRAIN_KEYS = {"step", "tokens", "train_loss", "ppl", "lr", "grad_norm", "tokens_per_s"}


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]


def eval_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]


# ---------------------------------------------------------------------------------------------------------
# The default command, shortened
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The no-argument command with a smaller model and run: GPT-2 tokenizer, built-in corpus, out/ default."""
    cwd = tmp_path_factory.mktemp("default")
    args = [*SMALL, "--max-steps", "30", "--eval-steps", "15", "--log-steps", "5", "--max-tokens", "30000"]
    # Record whether wandb got imported: without --wandb it must not be.
    code = (
        "import atexit, runpy, sys; atexit.register(lambda: print('WANDB_IMPORTED', 'wandb' in sys.modules)); "
        f"sys.argv = ['gptkernels.train', *{args!r}]; runpy.run_module('gptkernels.train', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    return cwd, proc, args


def test_default_command_trains_evaluates_and_writes_its_files(default_run):
    cwd, proc, _ = default_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / "out"
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_000030.pt"]
    assert "WANDB_IMPORTED False" in proc.stdout

    rows = train_rows(out)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    for r in rows:
        assert TRAIN_KEYS <= r.keys()
        assert r["tokens"] == r["step"] * 8 * 32
        assert math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 and r["lr"] > 0
        assert r["ppl"] == pytest.approx(math.exp(r["train_loss"]))
    evals = eval_rows(out)
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[0]["val_loss"] == pytest.approx(math.log(50257), abs=0.5)  # untrained: about uniform
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1  # the loss falls
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))

    # What a person sees: statistics, per-step lines, evaluations with samples, a progress bar with tok/s.
    assert "3 windows" not in proc.stdout  # sanity: counts are formatted, not placeholders
    for text in ("parameters", "documents", "training windows", "validation loss", "sample: The value of", "done:"):
        assert text in proc.stdout, text
    # Redirected output: no progress bar redrawing itself with \r, but a step line every --log-steps with an ETA.
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert "step     30/30 |" in proc.stdout and "tok/s | eta 0m" in proc.stdout
    assert "threads: 1 thread per process (OMP_NUM_THREADS)" in proc.stdout  # the header says how many threads

    png = out / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100

    info = json.loads((out / "run.json").read_text())
    assert info["parameters"] > 0 and info["data"]["train_windows"] > 0 and info["options"]["max_steps"] == 30
    state = load_checkpoint(out)
    assert state["step"] == 30 and state["tokenizer"]["name"] == "gpt2" and state["config"]["emb_dim"] == 32
    assert state["args"]["data"] == ["builtin"]


def test_second_run_refuses_to_overwrite_then_overwrite_starts_afresh(default_run):
    cwd, _, args = default_run
    out = cwd / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run_cli("gptkernels.train", *args, cwd=cwd)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched

    # Resuming a finished run has nothing to do and changes nothing.
    proc = run_cli("gptkernels.train", "--resume", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_000030.pt"]


# ---------------------------------------------------------------------------------------------------------
# Resume: SIGKILL and SIGINT
# ---------------------------------------------------------------------------------------------------------


def resume_args(corpus: Path, out: Path) -> list[str]:
    return [
        *SMALL,
        "--data",
        str(corpus),
        "--tokenizer",
        "char",
        "--drop-rate",
        "0.1",  # dropout on: a resumed run must also restore the random streams
        "--max-steps",
        "40",
        "--log-steps",
        "1",
        "--eval-steps",
        "20",
        "--save-steps",
        "5",
        "--sample-tokens",
        "8",
        "--out-dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = run_cli("gptkernels.train", *resume_args(corpus, out), cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


def _assert_same_metrics(resumed: list[dict], straight: list[dict]) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # every step exactly once
    for a, b in zip(resumed, straight):
        for key in ("train_loss", "lr", "grad_norm", "tokens", "val_loss", "epoch"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))


def test_resume_after_sigkill_equals_uninterrupted_run(corpus, uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = resume_args(corpus, out)
    proc = start_and_wait_for_checkpoint(args, out)
    proc.send_signal(signal.SIGKILL)  # at any moment, possibly in the middle of writing the next checkpoint
    proc.communicate()
    killed_at = load_checkpoint(out)["step"]
    assert 5 <= killed_at < 40, "the run ended before it could be killed"

    proc = run_cli("gptkernels.train", "--resume", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'ckpt_'}" in proc.stdout
    _assert_same_metrics(read_metrics(out / "metrics.jsonl"), uninterrupted)


def test_sigint_saves_a_checkpoint_and_exits_130_and_resume_matches(corpus, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait_for_checkpoint(resume_args(corpus, out), out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the run finished before SIGINT arrived")
    assert proc.returncode == 130, stderr[-3000:]
    assert "SIGINT at step" in stdout and "--resume" in stdout
    assert "SIGINT: stopping after step" in stderr and "a checkpoint will be written" in stderr  # said at once
    stopped = load_checkpoint(out)["step"]
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) <= stopped  # saved where it stopped

    proc = run_cli("gptkernels.train", "--resume", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_metrics(read_metrics(out / "metrics.jsonl"), uninterrupted)


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    args = [*SMALL, "--data", str(corpus), "--tokenizer", "char", "--out-dir", str(out), "--sample-tokens", "0"]
    args += ["--learning-rate", "1e30", "--warmup-steps", "0", "--max-steps", "20", "--save-steps", "1"]
    args += ["--log-steps", "1", "--eval-steps", "100"]
    proc = run_cli("gptkernels.train", *args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss became NaN or infinite") and "--resume" in last
    state = load_checkpoint(out)
    assert state["step"] >= 1
    rows = train_rows(out)
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert max(r["step"] for r in rows) <= state["step"]  # no checkpoint after the loss went bad


# ---------------------------------------------------------------------------------------------------------
# Weights & Biases, offline
# ---------------------------------------------------------------------------------------------------------


def test_wandb_offline_run_records_metrics_and_checkpoint(corpus, tmp_path):
    pytest.importorskip("wandb")
    out, wandb_dir = tmp_path / "run", tmp_path / "wb"
    wandb_dir.mkdir()
    args = [*SMALL, "--data", str(corpus), "--tokenizer", "char", "--out-dir", str(out), "--max-steps", "6"]
    args += ["--log-steps", "2", "--eval-steps", "3", "--sample-tokens", "0", "--wandb", "--wandb-run-name", "t1"]
    proc = run_cli("gptkernels.train", *args, cwd=tmp_path, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(wandb_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))  # the local record that `wandb sync` would upload
    assert len(records) == 1
    data = records[0].read_bytes()
    # History values are stored as JSON text inside the record log: the exact numbers of metrics.jsonl.
    for row in (train_rows(out)[-1], eval_rows(out)[-1]):
        for key in ("train_loss", "grad_norm", "val_loss", "val_ppl"):
            if key in row:
                assert key.encode() in data and json.dumps(row[key]).encode() in data, key
    state = load_checkpoint(out)
    assert state["wandb_run_id"] in runs[0].name
    assert f"model-{state['wandb_run_id']}".encode() in data  # the final checkpoint, logged as an artifact
    assert b"ckpt_000006.pt" in data


# ---------------------------------------------------------------------------------------------------------
# In-process: schedule, options, evaluation
# ---------------------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    assert effective_warmup(1000, 300) == 30  # short runs: at most 10% of the steps
    assert effective_warmup(1000, 100_000) == 1000
    assert effective_warmup(0, 300) == 0
    w, total = 30, 300
    f = [lr_factor(s, w, total) for s in range(total + 1)]
    assert f[0] == pytest.approx(1 / 30) and f[29] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:30], f[1:30]))  # rising during warmup
    assert all(a >= b for a, b in zip(f[30:], f[31:]))  # then falling
    assert f[30 + (total - 30) // 2] == pytest.approx(0.55)  # cosine: halfway between 1 and 0.1
    assert f[total] == pytest.approx(0.1)
    assert lr_factor(0, 0, 10) == 1.0
    # Without --eval-steps: every 500 steps, but at least four times per run.
    assert default_eval_steps(300) == 75 and default_eval_steps(100_000) == 500 and default_eval_steps(2) == 1


def test_config_file_yaml_and_json_with_command_line_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning-rate: 3e-4\nbatch_size: 4\ndata: [a.txt, b.txt]\nqkv_bias: true\n")
    o, state = resolve_options(["--config", str(cfg), "--batch-size", "2"])
    assert state is None
    assert o["learning_rate"] == 3e-4 and o["batch_size"] == 2 and o["data"] == ["a.txt", "b.txt"]
    assert o["qkv_bias"] is True and o["num_epochs"] == DEFAULTS["num_epochs"]
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"preset": "gpt2", "max_steps": 7}))
    o, _ = resolve_options(["--config", str(js)])
    assert o["preset"] == "gpt2" and o["max_steps"] == 7
    for bad, match in [
        ({"learning_rat": 1}, "unknown option"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"shift": "sideways"}, "shift must be one of"),
        ({"compile": "yes"}, "true or false"),
    ]:
        js.write_text(json.dumps(bad))
        with pytest.raises(UsageError, match=match):
            resolve_options(["--config", str(js)])
    with pytest.raises(UsageError, match="no such file"):
        resolve_options(["--config", str(tmp_path / "missing.yaml")])


def _tiny_model(vocab: int = 41, ctx: int = 16) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=16, n_heads=2, n_layers=2, kernels="torch")
    return GPT(cfg).eval()


@torch.no_grad()
def _reference_loss(model: GPT, tokens: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Each target scored by the first window that contains it, via the full logits (no -100 masks)."""
    n_targets = len(tokens) - 1
    length = min(max_length, n_targets)
    losses, done = [], 0
    for b in window_starts(n_targets, max_length, stride):
        logits = model(tokens[b : b + length][None])[0]  # (length, V)
        for j in range(max(done, b) + 1, b + length + 1):  # target positions not scored yet
            losses.append(F.cross_entropy(logits[j - 1 - b].double(), tokens[j]))
        done = b + length
    return float(torch.stack(losses).mean()), len(losses)


@pytest.mark.parametrize("n_tokens, max_length, stride", [(50, 8, 8), (50, 8, 3), (50, 8, 1), (9, 16, 4), (2, 8, 8)])
def test_evaluate_tokens_scores_every_token_exactly_once(n_tokens, max_length, stride):
    model = _tiny_model()
    tokens = torch.randint(0, 41, (n_tokens,))
    r = evaluate_tokens(model, tokens, max_length, stride, batch_size=3, device="cpu")
    ref, count = _reference_loss(model, tokens, max_length, stride)
    assert r["tokens"] == count == n_tokens - 1
    assert r["loss"] == pytest.approx(ref, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    # Overlapping windows give each prediction at least as much context: with stride 1, target j sees
    # exactly min(j, max_length) tokens; check one by hand.
    if stride == 1 and n_tokens > max_length + 1:
        j = n_tokens - 1
        logits = model(tokens[j - max_length : j][None])[0, -1]
        single = evaluate_tokens(model, tokens[j - max_length : j + 1], max_length, 1, 1, "cpu")
        assert single["tokens"] == max_length  # the window's own targets
        assert F.cross_entropy(logits, tokens[j]).item() <= single["loss"] * max_length + 1e-4


def test_evaluate_tokens_rejects_bad_arguments():
    model = _tiny_model()
    tokens = torch.randint(0, 41, (30,))
    with pytest.raises(ValueError, match="stride"):
        evaluate_tokens(model, tokens, 8, 9)
    with pytest.raises(ValueError, match="max_length"):
        evaluate_tokens(model, tokens, 17)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_tokens(model, tokens[:1], 8)
    assert model.training is False
    model.train()
    evaluate_tokens(model, tokens, 8)
    assert model.training is True  # restored
