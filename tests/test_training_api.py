"""gptkernels.training as a library: ``train(TrainConfig(...)) -> TrainResult``, called twice in one process,
options validated in one place, errors raised (never sys.exit)."""

import math
import signal

import pytest

from gptkernels.checkpoint import load_checkpoint
from gptkernels.cli import UsageError
from gptkernels.plotting import read_metrics
from gptkernels.training import TrainConfig, TrainResult, train
from gptkernels.training.config import defaults

from .cli_helpers import one_thread, small_corpus  # noqa: F401 (fixtures: found by name)

SMALL = dict(emb_dim=32, n_layers=2, n_heads=2, context_length=32, tokenizer="char", sample_tokens=0, kernels="torch")


def test_train_returns_final_numbers_and_runs_twice_in_one_process(corpus, tmp_path):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    results = []
    for name in ("a", "b"):
        cfg = TrainConfig(data=[str(corpus)], max_steps=6, log_steps=3, eval_steps=3, out_dir=tmp_path / name, **SMALL)
        results.append(train(cfg))
    a, b = results
    assert isinstance(a, TrainResult)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert a.steps == 6 and a.tokens == 6 * 8 * 32 and a.wall_time_s > 0
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    last_val = [r for r in rows if "val_loss" in r][-1]
    assert last_val["step"] == 6 and a.final_val_loss == last_val["val_loss"]
    assert a.final_val_ppl == pytest.approx(math.exp(a.final_val_loss))
    assert 0 < a.final_val_bpb == last_val["val_bpb"] < 20
    assert a.final_train_loss == [r for r in rows if "train_loss" in r][-1]["train_loss"]
    assert a.n_params > a.n_params_non_embedding > 0
    assert a.checkpoint == tmp_path / "a" / "ckpt_000006.pt" and load_checkpoint(a.checkpoint)["step"] == 6
    assert b.final_val_loss == a.final_val_loss  # seeded: the same run gives the same numbers in one process
    assert a.to_dict()["checkpoint"] == str(a.checkpoint)


def test_config_defaults_match_the_command_line_and_bad_values_raise(tmp_path):
    from gptkernels.train import build_parser

    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == set(defaults())  # one field per option
    for bad, words in [
        (dict(learning_rate=float("inf")), "--learning-rate"),
        (dict(learning_rate=1e38), "--learning-rate"),
        (dict(weight_decay=float("inf")), "--weight-decay"),
        (dict(batch_size=0), "--batch-size"),
        (dict(max_steps=2.5), "--max-steps"),
        (dict(shift="sideways"), "--shift"),
        (dict(data=[]), "--data"),
        (dict(resume=True, overwrite=True), "--overwrite"),
    ]:
        with pytest.raises(UsageError, match=words):
            TrainConfig(**bad)
    from gptkernels.train import resolve_options

    assert resolve_options(["--max-steps", "1e3"])[0]["max_steps"] == 1000  # a whole number in e-notation
    cfg = TrainConfig.from_dict({"learning-rate": "3e-4", "max_steps": "1e3", "data": "x.txt"})
    assert cfg.learning_rate == 3e-4 and cfg.max_steps == 1000 and cfg.data == ["x.txt"]
    with pytest.raises(UsageError, match="grid: unknown option 'nope'"):
        TrainConfig.from_dict({"nope": 1}, source="grid")


def test_train_raises_instead_of_exiting(corpus, tmp_path):
    cfg = TrainConfig(data=[str(corpus)], max_length=64, out_dir=tmp_path / "x", **SMALL)
    with pytest.raises(UsageError, match="--max-length 64"):
        train(cfg)
    assert not (tmp_path / "x").exists()
