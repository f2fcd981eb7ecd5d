"""The evaluate and generate commands on a trained checkpoint, and every kind of bad input to the three
commands: one ``error: ...`` line on stderr, exit status 2, no traceback, nothing written or overwritten."""

import json
import sys
from pathlib import Path

import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels import evaluate as evaluate_cli
from gptkernels import generate as generate_cli
from gptkernels import train as train_cli
from gptkernels.checkpoint import list_checkpoints, load_checkpoint
from gptkernels.cli import cli_main
from gptkernels.plotting import read_metrics

from .cli_helpers import SMALL, one_thread, run_cli, small_corpus  # noqa: F401 (fixtures: pytest finds them by name)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    args = [*SMALL, "--data", str(corpus), "--tokenizer", "char", "--max-steps", "12", "--eval-steps", "6"]
    args += ["--save-steps", "4", "--sample-tokens", "0", "--out-dir", str(out)]
    proc = run_cli("gptkernels.train", *args, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_in_process(capsys, main, argv: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli_main(main, argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


# ---------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------


def test_evaluate_cli_reproduces_the_training_validation_loss(trained, corpus, tmp_path):
    proc = run_cli("gptkernels.evaluate", "--checkpoint", str(trained), "--data", str(corpus), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    final = [row for row in read_metrics(trained / "metrics.jsonl") if "val_loss" in row][-1]
    assert r["split"] == "val"  # the checkpoint's own data: its validation split, as in training
    assert r["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert r["ppl"] == pytest.approx(final["val_ppl"], rel=1e-6)


def test_evaluate_cli_on_a_file_other_data_and_overlapping_windows(trained, corpus, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    ckpt = str(list_checkpoints(trained)[-1])
    argv = ["--checkpoint", ckpt, "--data", str(other), "--stride", "8", "--kernels", "torch", "--json"]
    code, out, err = run_in_process(capsys, evaluate_cli.main, argv)
    assert code == 0, err
    r = json.loads(out)
    n_tokens = len(other.read_text(encoding="utf-8")) + 1  # one token per character, plus <|endoftext|>
    assert r["split"] == "all" and r["tokens"] == n_tokens - 1  # every next-token prediction, once
    assert r["stride"] == 8 and r["max_length"] == 32
    code, out, err = run_in_process(capsys, evaluate_cli.main, argv[:-1])
    assert code == 0 and "perplexity" in out and "loss" in out


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------


def test_generate_cli_streams_reproducible_text(trained, tmp_path, capsys, monkeypatch):
    argv = ["--checkpoint", str(trained), "--prompt", "The ", "--max-new-tokens", "20", "--seed", "3"]
    argv += ["--top-k", "10", "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.1", "--kernels", "torch"]
    writes: list[str] = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: (writes.append(s), real_write(s))[1])
    code, out, err = run_in_process(capsys, generate_cli.main, argv)
    monkeypatch.undo()
    assert code == 0, err
    assert out.startswith("The ") and out.endswith("\n")
    assert len(out) == len("The ") + 20 + 1  # char tokenizer: one character per token
    assert len(writes) >= 10  # streamed piece by piece, not printed at the end
    code2, out2, _ = run_in_process(capsys, generate_cli.main, argv)
    assert code2 == 0 and out2 == out  # same seed, same text

    proc = run_cli("gptkernels.generate", *argv[:-2], "--temperature", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The ")


def test_generate_cli_from_a_hugging_face_folder(tmp_path, capsys):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    GPT(GPTConfig(context_length=16, emb_dim=16, n_heads=2, n_layers=1, kernels="torch")).save_hf(tmp_path / "hf")
    argv = ["--hf", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "0"]
    code, out, err = run_in_process(capsys, generate_cli.main, [*argv, "--kernels", "torch"])
    assert code == 0, err
    assert out.startswith("Hello") and len(out) > len("Hello\n")


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------------


def test_unknown_option_and_missing_data_from_the_real_command(tmp_path):
    proc = run_cli("gptkernels.train", "--bogus", "1", cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "--bogus")
    proc = run_cli("gptkernels.train", "--data", str(tmp_path / "nope.txt"), cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "nope.txt")
    assert list(tmp_path.iterdir()) == []  # no out/ created


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--max-length", "64"], ["--max-length 64", "context-length 32"]),
        (["--batch-size", "5000"], ["--batch-size", "windows"]),
        (["--dtype", "fp16", "--device", "cpu"], ["fp16"]),
        (["--n-heads", "3"], ["divisible"]),
        (["--learning-rate", "-1"], ["--learning-rate"]),
        (["--val-fraction", "1.5"], ["--val-fraction"]),
        (["--kernels", "cuda"], ["--kernels"]),
        (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
        (["--learning-rate", "inf"], ["--learning-rate", "finite"]),
        (["--learning-rate", "1e38"], ["--learning-rate", "at most"]),
        (["--weight-decay", "inf"], ["--weight-decay", "finite"]),
        (["--max-steps", "2.5"], ["--max-steps", "expected an integer"]),
        (["--threads", "0"], ["--threads"]),
    ],
)
def test_train_bad_options_are_one_line_errors(extra, words, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*SMALL, "--data", str(corpus), "--tokenizer", "char", "--out-dir", str(tmp_path / "out"), *extra]
    code, _, err = run_in_process(capsys, train_cli.main, argv)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_train_refuses_bad_out_dirs_and_resumes(trained, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [*SMALL, "--data", str(corpus), "--tokenizer", "char"]
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    code, _, err = run_in_process(capsys, train_cli.main, [*base, "--out-dir", str(afile)])
    assert_one_line_error(code, err, "is a file")
    assert afile.read_text() == "not a folder"

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_in_process(capsys, train_cli.main, ["--resume", "--out-dir", str(empty)])
    assert_one_line_error(code, err, "--resume", "no checkpoint")
    assert list(empty.iterdir()) == []

    before = snapshot(trained)
    code, _, err = run_in_process(capsys, train_cli.main, [*base, "--out-dir", str(trained)])
    assert_one_line_error(code, err, "already holds a run", "--resume", "--overwrite")
    code, _, err = run_in_process(capsys, train_cli.main, ["--resume", "--out-dir", str(trained), "--preset", "gpt2"])
    assert_one_line_error(code, err, "another architecture", "emb_dim")
    code, _, err = run_in_process(capsys, train_cli.main, ["--resume", "--out-dir", str(trained), "--n-layers", "3"])
    assert_one_line_error(code, err, "another architecture", "n_layers")
    assert snapshot(trained) == before  # nothing overwritten


def test_train_bad_config_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1, 2\n")
    code, _, err = run_in_process(capsys, train_cli.main, ["--config", str(bad)])
    assert_one_line_error(code, err, "cannot parse")
    bad.write_text("nonsense_key: 1\n")
    code, _, err = run_in_process(capsys, train_cli.main, ["--config", str(bad)])
    assert_one_line_error(code, err, "nonsense_key")


def test_evaluate_and_generate_bad_input(trained, corpus, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    for main, argv, words in [
        (evaluate_cli.main, ["--checkpoint", missing, "--data", str(corpus)], ["missing"]),
        (evaluate_cli.main, ["--checkpoint", str(trained)], ["--data"]),
        (evaluate_cli.main, ["--checkpoint", str(trained), "--data", str(corpus), "--max-length", "33"], ["33"]),
        (evaluate_cli.main, ["--checkpoint", str(trained), "--data", str(corpus), "--stride", "40"], ["--stride"]),
        (evaluate_cli.main, ["--checkpoint", str(trained), "--data", missing], ["missing"]),
        (generate_cli.main, ["--checkpoint", missing], ["missing"]),
        (generate_cli.main, ["--checkpoint", str(trained), "--top-p", "1.5"], ["--top-p"]),
        (generate_cli.main, ["--checkpoint", str(trained), "--temperature", "-1"], ["--temperature"]),
        (generate_cli.main, ["--checkpoint", str(trained), "--prompt", "\u2603"], ["vocabulary"]),
        (generate_cli.main, ["--prompt", "x"], ["--checkpoint", "--hf"]),
    ]:
        code, _, err = run_in_process(capsys, main, argv)
        assert_one_line_error(code, err, *words)
    assert load_checkpoint(trained)["step"] == 12
