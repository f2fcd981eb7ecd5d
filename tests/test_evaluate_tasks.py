"""``python -m gptkernels.evaluate``: bits per byte beside perplexity, and --task benchmarks in one table."""

import json
import math

import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels import evaluate as evaluate_cli
from gptkernels.checkpoint import save_checkpoint
from gptkernels.cli import cli_main
from gptkernels.evaluation import load_hellaswag, score_multiple_choice
from gptkernels.tokenizer import get_tokenizer, tokenizer_to_spec

from .cli_helpers import ROOT, one_thread  # noqa: F401 (fixture)

SAMPLE = ROOT / "tests" / "data" / "hellaswag_sample.jsonl"
ARC = ROOT / "tests" / "data" / "arc_sample.jsonl"
TEXT = "Tea, coffee and crème brûlée at the café. " * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny byte-level GPT saved as a training checkpoint, and a text file to score."""
    root = tmp_path_factory.mktemp("evaluate_tasks")
    torch.manual_seed(0)
    tok = get_tokenizer("byte")
    cfg = GPTConfig(vocab_size=tok.n_vocab, context_length=96, emb_dim=32, n_heads=2, n_layers=2, kernels="torch")
    model = GPT(cfg).eval()
    state = {"step": 0, "model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": tokenizer_to_spec(tok)}
    path = save_checkpoint(root / "run", state)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return {"path": path, "model": model, "tok": tok, "text": root / "text.txt"}


def run(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli_main(evaluate_cli.main, [*argv, "--device", "cpu", "--kernels", "torch"])
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_bits_per_byte_is_printed_and_in_the_json(checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint["path"]), "--data", str(checkpoint["text"])]
    code, out, err = run(capsys, [*argv, "--json"])
    assert code == 0, err
    r = json.loads(out)
    # every byte but the first is a scored target, and the <|endoftext|> after the document counts its 13 bytes
    assert r["bytes"] == len(TEXT.encode("utf-8")) - 1 + len("<|endoftext|>")
    assert r["bpb"] == pytest.approx(r["loss"] * r["tokens"] / (math.log(2) * r["bytes"]), rel=1e-9)
    code, out, err = run(capsys, argv)
    assert code == 0 and f"bits per byte {r['bpb']:.4f}" in out and f"perplexity {r['ppl']:.2f}" in out


def test_task_json_equals_the_library_result(checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint["path"]), "--task", f"hellaswag={SAMPLE}", "--batch-size", "5", "--json"]
    code, out, err = run(capsys, argv)
    assert code == 0, err
    r = json.loads(out)
    expected = score_multiple_choice(checkpoint["model"], checkpoint["tok"], load_hellaswag(str(SAMPLE)))
    got = r["tasks"]["hellaswag"]
    assert got["n"] == 6 and got["source"] == str(SAMPLE)
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert got[metric] == pytest.approx(expected[metric])
    code, out, err = run(capsys, [*argv, "--task", f"hellaswag={ARC}"])
    assert code == 2 and "arc_sample.jsonl: record 1: not a HellaSwag record" in err  # one line, names the file
    code, out, err = run(capsys, [*argv, "--limit", "2", "--task", f"arc_easy={ARC}", "--task", f"hellaswag={SAMPLE}"])
    tasks = json.loads(out)["tasks"]
    assert code == 0 and tasks["hellaswag"]["n"] == tasks["arc_easy"]["n"] == 2
    assert tasks[f"hellaswag={SAMPLE}"]["acc"] == tasks["hellaswag"]["acc"]  # the same task twice: both kept


def test_data_and_tasks_print_one_table(checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint["path"]), "--data", str(checkpoint["text"]), "--task", f"hellaswag={SAMPLE}"]
    code, out, err = run(capsys, argv)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == str(checkpoint["path"])
    assert [c.strip() for c in lines[1].strip("|").split("|")] == ["task", "metric", "value", "n"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[3:]]
    assert [c[1] for c in cells] == ["loss", "ppl", "bpb", "acc", "acc_norm"]
    assert cells[3][0] == "hellaswag" and cells[3][3] == "6"
    code, js, err = run(capsys, [*argv, "--json"])
    r = json.loads(js)
    assert cells[2][2] == f"{r['bpb']:.4f}" and cells[4][2] == f"{r['tasks']['hellaswag']['acc_norm']:.4f}"


def test_task_bad_input_is_one_line(checkpoint, tmp_path, capsys):
    ckpt = ["--checkpoint", str(checkpoint["path"])]
    for argv, words in [
        (ckpt, ["--data", "--task"]),
        ([*ckpt, "--task", "piqa"], ["unknown task", "hellaswag"]),
        ([*ckpt, "--task", f"hellaswag={tmp_path / 'missing.jsonl'}"], ["missing.jsonl"]),
        ([*ckpt, "--task", f"hellaswag={SAMPLE}", "--limit", "0"], ["--limit"]),
        ([*ckpt, "--data", str(checkpoint["text"]), "--limit", "3"], ["--limit goes with --task"]),
    ]:
        code, out, err = run(capsys, argv)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert all(w in err for w in words), (words, err)
