"""Checkpoint files: atomic writes, newest-two retention, weights_only loading, RNG round trips."""

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels.checkpoint import (
    atomic_torch_save,
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_from_state,
    resolve_checkpoint,
    save_checkpoint,
    set_rng_state,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "config": {"emb_dim": 8}}


def test_save_keeps_newest_two_and_latest_is_found_by_scanning(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, _state(step))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt_000010.pt", "ckpt_000015.pt"]
    assert latest_checkpoint(tmp_path).name == "ckpt_000015.pt"
    assert resolve_checkpoint(tmp_path) == tmp_path / "ckpt_000015.pt"
    state = load_checkpoint(tmp_path)
    assert state["step"] == 15 and torch.equal(state["model"]["w"], torch.full((3,), 15.0))
    assert state["path"].endswith("ckpt_000015.pt")
    # Step numbers sort numerically, not as text, past the zero padding.
    save_checkpoint(tmp_path, _state(1_000_000))
    assert latest_checkpoint(tmp_path).name == "ckpt_1000000.pt"


def test_leftover_temp_file_is_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path, _state(1))
    stale = tmp_path / ".ckpt_000002.pt.abc.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert latest_checkpoint(tmp_path).name == "ckpt_000001.pt"
    save_checkpoint(tmp_path, _state(3))
    assert not stale.exists()


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, _state(1))
    (tmp_path / "ckpt_000002.pt").write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        state = load_checkpoint(tmp_path)
    assert state["step"] == 1


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nope.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a gptkernels training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_failed_write_leaves_previous_file_intact(tmp_path):
    target = tmp_path / "ckpt_000001.pt"
    atomic_torch_save({"format": "x", "v": 1}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"v": Boom()}, target)
    assert torch.load(target, weights_only=True) == {"format": "x", "v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000001.pt"]


def test_sigkill_during_writes_never_leaves_a_partial_checkpoint(tmp_path):
    # A child rewrites big checkpoints in a loop; kill -9 it at an arbitrary moment and load what is left.
    script = textwrap.dedent(
        f"""
        import torch, sys
        from gptkernels.checkpoint import save_checkpoint
        big = torch.arange(2_000_000, dtype=torch.float64)
        step = 0
        while True:
            step += 1
            save_checkpoint({str(tmp_path)!r}, {{"step": step, "model": {{"w": big + step}}}})
            print(step, flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        for _ in range(3):  # wait for a few completed writes, then kill in the middle of the next ones
            proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
    state = load_checkpoint(tmp_path)
    assert state["step"] >= 3
    expected = torch.arange(2_000_000, dtype=torch.float64) + state["step"]
    assert torch.equal(state["model"]["w"], expected)  # the whole tensor of that step, not a torn write


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    saved = get_rng_state("cpu")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    atomic_torch_save({"rng": saved}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(loaded, "cpu")
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_model_round_trip_through_checkpoint(tmp_path):
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=1, kernels="torch")
    model = GPT(cfg)
    save_checkpoint(tmp_path, {"step": 7, "model": model.state_dict(), "config": cfg.to_dict()})
    state = load_checkpoint(tmp_path)
    loaded = model_from_state(state, kernels="torch")
    assert not loaded.training
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    idx = torch.randint(0, 97, (1, 5))
    torch.testing.assert_close(model.eval()(idx), loaded(idx), rtol=0, atol=0)
    assert os.path.getsize(state["path"]) > 0
