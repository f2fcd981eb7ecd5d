"""Bad input to generate and evaluate (issue 13): damaged or mismatched checkpoints, Hugging Face folders and
names, a tokenizer larger than the model, kernels that cannot run, datasets out of reach. Each is one
``error: ...`` line with exit status 2, fast, and never a network wait."""

import time

import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels import evaluate as evaluate_cli
from gptkernels import generate as generate_cli
from gptkernels.checkpoint import save_checkpoint
from gptkernels.tokenizer import CharTokenizer, tokenizer_to_spec

from .cli_helpers import one_thread  # noqa: F401 (fixture: pytest finds it by name)
from .test_cli import assert_one_line_error, run_in_process

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def run_dir(tmp_path):
    """A training output folder with two checkpoints of a tiny char-level model (no training run needed)."""
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.n_vocab, context_length=32, emb_dim=16, n_heads=2, n_layers=1, kernels="torch")
    out = tmp_path / "run"
    for step in (1, 2):
        state = {"step": step, "model": GPT(cfg).state_dict(), "config": cfg.to_dict()}
        save_checkpoint(out, {**state, "tokenizer": tokenizer_to_spec(tok), "args": {"data": []}})
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    return out


def test_damaged_checkpoint_is_one_line_naming_it_and_the_previous_good_one(run_dir, capsys):
    newest = run_dir / "ckpt_000002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # mid-file: inside a weight tensor
    newest.write_bytes(bytes(data))
    code, _, err = run_in_process(capsys, generate_cli.main, ["--checkpoint", str(newest), "--prompt", "the"])
    assert_one_line_error(code, err, "ckpt_000002.pt", "previous good checkpoint is", "ckpt_000001.pt")


def test_checkpoint_whose_weights_do_not_match_its_config(run_dir, capsys):
    from gptkernels.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir)
    state.pop("path")
    state["config"]["emb_dim"] = 32
    save_checkpoint(run_dir, {**state, "step": 3})
    text = str(run_dir.parent / "text.txt")
    for main, argv in [
        (generate_cli.main, ["--checkpoint", str(run_dir), "--prompt", "the"]),
        (evaluate_cli.main, ["--checkpoint", str(run_dir), "--data", text]),
    ]:
        code, _, err = run_in_process(capsys, main, argv)
        assert_one_line_error(code, err, "ckpt_000003.pt", "weights do not match the checkpoint's config")
    state.pop("config")
    save_checkpoint(run_dir, {**state, "step": 4})
    code, _, err = run_in_process(capsys, generate_cli.main, ["--checkpoint", str(run_dir), "--prompt", "the"])
    assert_one_line_error(code, err, "ckpt_000004.pt", "no model config")


def test_hf_folder_problems_are_one_line_and_never_reach_the_network(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "empty").mkdir(parents=True)
    (tmp_path / "models" / "empty" / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    start = time.monotonic()
    for argv, words in [
        (["--hf", "models/empty"], ["no weights"]),
        (["--hf", "models/gpt2-tiny"], ["no such model folder", "models/ is a local folder"]),  # a typo
        (["--hf", "./nothing-here"], ["no such model folder"]),
    ]:
        for main, extra in [(generate_cli.main, []), (evaluate_cli.main, ["--data", "builtin"])]:
            code, _, err = run_in_process(capsys, main, [*argv, *extra, "--kernels", "torch"])
            assert_one_line_error(code, err, *words)
    assert time.monotonic() - start < 20


def test_model_vocabulary_smaller_than_the_tokenizer(tmp_path, capsys):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=1)).save_hf(tmp_path / "m")
    (tmp_path / "t.txt").write_text("Hello there, a few words of text.", encoding="utf-8")
    for main, extra in [
        (generate_cli.main, ["--prompt", "Hello"]),
        (evaluate_cli.main, ["--data", str(tmp_path / "t.txt")]),
    ]:
        code, _, err = run_in_process(capsys, main, ["--hf", str(tmp_path / "m"), *extra, "--kernels", "torch"])
        assert_one_line_error(code, err, "vocabulary (64 tokens) is smaller than the gpt2 tokenizer's (50,257)")


def test_kernels_triton_on_a_cpu_without_the_interpreter(run_dir, capsys, monkeypatch):
    from gptkernels.ops import _backend

    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)  # as without TRITON_INTERPRET=1
    text = str(run_dir.parent / "text.txt")
    for main, extra in [(generate_cli.main, ["--prompt", "the"]), (evaluate_cli.main, ["--data", text])]:
        argv = ["--checkpoint", str(run_dir), *extra, "--kernels", "triton", "--device", "cpu"]
        code, _, err = run_in_process(capsys, main, argv)
        assert_one_line_error(code, err, "--kernels triton", "interpreter is off")


def test_hf_dataset_offline_and_not_cached_is_one_line(run_dir, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # What HF_HUB_OFFLINE=1 sets when the libraries are imported (they are already imported here).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    argv = ["--checkpoint", str(run_dir), "--data", "hf:nobody-has/this-dataset-xyz"]
    code, _, err = run_in_process(capsys, evaluate_cli.main, argv)
    assert_one_line_error(code, err, "hf:nobody-has/this-dataset-xyz", "offline mode", "not in the local cache")
    assert time.monotonic() - start < 30


def test_train_on_a_char_prepared_folder(tmp_path):
    from gptkernels.prepare import prepare

    from .cli_helpers import SMALL, run_cli

    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    prepare([str(tmp_path / "text.txt")], tmp_path / "prep", "char", progress=False)
    for i, extra in enumerate([["--tokenizer", "char"], []]):  # its own tokenizer, named or not
        args = [*SMALL, "--data", str(tmp_path / "prep"), *extra, "--max-steps", "2", "--sample-tokens", "0"]
        proc = run_cli("gptkernels.train", *args, "--out-dir", str(tmp_path / f"out{i}"), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
