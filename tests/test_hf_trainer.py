"""--trainer hf: the GPT inside transformers.Trainer learns like the native loop, and its outputs load back."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels.checkpoint import load_checkpoint, load_model
from gptkernels.model import shift_labels
from gptkernels.plotting import read_metrics

from .cli_helpers import SMALL, run_cli, small_corpus  # noqa: F401 (the corpus fixture: pytest finds it by name)

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install 'gptkernels[hf]')")


def train(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [*SMALL, "--data", str(corpus), "--tokenizer", "char", "--drop-rate", "0", "--max-steps", "30"]
    args += ["--log-steps", "5", "--eval-steps", "15", "--save-steps", "15", "--sample-tokens", "0"]
    args += ["--out-dir", str(out), *extra]
    return run_cli("gptkernels.train", *args, cwd=out.parent, timeout=300, WANDB_MODE="disabled")


def test_wrapper_loss_is_the_implicitly_shifted_native_loss():
    from gptkernels.hf_trainer import wrap

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=12, emb_dim=16, n_heads=2, n_layers=1, kernels="torch"))
    hf = wrap(model)
    x = torch.randint(0, 50, (3, 12))
    out = hf(input_ids=x, labels=x)
    _, expected = model(x[:, :-1], x[:, 1:])  # explicit shift: the same predictions
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(hf(input_ids=x).logits, model(x))
    assert (shift_labels(x)[:, -1] == -100).all()


def test_hf_trainer_matches_native_loop_and_saves_loadable_models(corpus, tmp_path):
    native, hf = tmp_path / "native", tmp_path / "hf"
    p1 = train(corpus, native)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = train(corpus, hf, "--trainer", "hf")
    assert p2.returncode == 0, p2.stderr[-3000:]

    def losses(out: Path) -> tuple[list[float], list[float]]:
        rows = read_metrics(out / "metrics.jsonl")
        return [r["train_loss"] for r in rows if "train_loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]

    (tn, vn), (th, vh) = losses(native), losses(hf)
    assert len(th) == 6 and th[-1] < th[0] and tn[-1] < tn[0]  # both learn
    assert th[-1] == pytest.approx(tn[-1], rel=0.1)
    assert vh[-1] == pytest.approx(vn[-1], rel=0.1)
    summary = json.loads((hf / "hf_summary.json").read_text())
    assert summary["steps"] == 30 and summary["val_loss"] == pytest.approx(vn[-1], rel=0.1)
    # One validation number, computed as the native loop computes it (every held-out token once), printed
    # once per evaluation in the native loop's format; no raw log dicts, bars or escape codes in a redirected log.
    assert summary["val_loss"] == vh[-1]
    assert [r["step"] for r in read_metrics(hf / "metrics.jsonl") if "val_loss" in r] == [0, 15, 30]
    assert f"step 30: validation loss {vh[-1]:.4f}" in p2.stdout and f"validation loss {vh[-1]:.4f}" in p2.stdout
    assert p2.stdout.count("validation loss") == 4  # steps 0, 15, 30 and the "done:" line
    for stream in (p2.stdout, p2.stderr):
        assert "\r" not in stream and "\x1b" not in stream and "{'loss'" not in stream and "eval_loss" not in stream

    # The outputs: Trainer checkpoints (newest two), the wrapped model, a plain GPT-2 export, a native checkpoint.
    assert sorted(p.name for p in hf.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]
    assert (hf / "loss.png").read_bytes()[:4] == b"\x89PNG"
    from gptkernels.hf_trainer import load_hf_model

    wrapped = load_hf_model(hf / "hf").eval()
    gpt, tok = load_model(hf, kernels="torch")
    exported = GPT.from_hf(hf / "gpt2", kernels="torch").eval()
    x = torch.tensor([tok.encode("The value of")])
    ref = gpt(x)
    torch.testing.assert_close(wrapped.set_kernels("torch")(x), ref)
    torch.testing.assert_close(exported(x), ref, rtol=1e-5, atol=1e-5)

    # A second run into the same folder is refused; --resume continues from the newest Trainer checkpoint.
    p3 = train(corpus, hf, "--trainer", "hf")
    assert p3.returncode == 2 and p3.stderr.startswith("error: ") and "--resume" in p3.stderr
    p4 = train(corpus, hf, "--trainer", "hf", "--resume", "--max-steps", "35")
    assert p4.returncode == 0, p4.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(hf / "metrics.jsonl") if "train_loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30, 35]
    assert load_checkpoint(hf)["step"] == 35 and json.loads((hf / "hf_summary.json").read_text())["steps"] == 35
