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


# ---------------------------------------------------------------------------------------------------------
# Integrity, failed writes, weights that do not fit their config (issue 13)
def _small_model_state(step: int) -> dict:
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=1, kernels="torch")
    return {"step": step, "model": GPT(cfg).state_dict(), "config": cfg.to_dict(), "args": {"lr": 1e-3}}


def test_checksum_refuses_changed_bytes_and_names_the_previous_good_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _small_model_state(1))
    state = _small_model_state(2)
    marker = torch.arange(64, dtype=torch.float32) + 0.123  # bytes easy to find in the file
    wpe = state["model"]["transformer.wpe.weight"]
    state["model"]["transformer.wpe.weight"] = torch.cat([marker, wpe.flatten()[64:]]).view(16, 16)
    path = save_checkpoint(tmp_path, state)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(marker.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10  # one bit of one weight: still a valid zip and pickle, a different number
    path.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=r"ckpt_000002\.pt: damaged.*checksum.*previous good checkpoint is .*ckpt_000001\.pt"
    ):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match=r"ckpt_000002\.pt.*previous one, ckpt_000001\.pt"):
        assert load_checkpoint(tmp_path)["step"] == 1  # a folder falls back to its newest intact checkpoint


def test_random_byte_flips_are_caught_or_change_nothing(tmp_path):
    original = _small_model_state(3)
    path = save_checkpoint(tmp_path, original)
    data = path.read_bytes()
    rng = random.Random(0)
    caught = 0
    for i in range(12):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        p = tmp_path / f"flip{i}.pt"
        p.write_bytes(bytes(flipped))
        try:
            state = load_checkpoint(p)
        except ValueError:
            caught += 1
            continue
        # Not caught: the flip hit bytes that carry no content (zip bookkeeping); what loads is the original.
        assert state["step"] == 3 and all(torch.equal(state["model"][k], v) for k, v in original["model"].items())
    assert caught >= 8


def test_checkpoints_without_checksum_load_only_from_before_checksums(tmp_path):
    legacy = {"format": "gptkernels-checkpoint", "version": 1, "step": 4, "model": {"w": torch.ones(2)}}
    torch.save(legacy, tmp_path / "ckpt_000004.pt")
    assert load_checkpoint(tmp_path / "ckpt_000004.pt")["step"] == 4
    torch.save({**legacy, "version": 2}, tmp_path / "ckpt_000005.pt")
    with pytest.raises(ValueError, match="no checksum"):
        load_checkpoint(tmp_path / "ckpt_000005.pt")


def test_disk_full_during_a_checkpoint_write_is_an_output_write_error(tmp_path, monkeypatch):
    from gptkernels.cli import OutputWriteError

    first = save_checkpoint(tmp_path, _state(1))

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputWriteError, match=r"cannot write .*ckpt_000002\.pt: No space left on device"):
        save_checkpoint(tmp_path, _state(2))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp file left, the earlier one kept
    assert load_checkpoint(tmp_path)["step"] == 1


def test_file_size_limit_during_torch_save_is_an_output_write_error(tmp_path):
    # `ulimit -f`: torch's zip writer fails inside C++ and raises RuntimeError (inline_container.cc).
    script = textwrap.dedent(
        f"""
        import resource, torch
        from gptkernels.checkpoint import save_checkpoint, load_checkpoint
        from gptkernels.cli import OutputWriteError
        save_checkpoint({str(tmp_path)!r}, {{"step": 1, "model": {{"w": torch.ones(10)}}}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            save_checkpoint({str(tmp_path)!r}, {{"step": 2, "model": {{"w": torch.ones(1_000_000)}}}})
        except OutputWriteError as e:
            print("OutputWriteError:", e)
        print("loads:", load_checkpoint({str(tmp_path)!r})["step"])
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OutputWriteError: cannot write" in r.stdout and "ckpt_000002.pt" in r.stdout
    assert "loads: 1" in r.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000001.pt"]


def test_weights_that_do_not_fit_the_config_are_refused_before_allocating():
    from gptkernels.checkpoint import check_model_state

    good = _small_model_state(1)
    no_config = {k: v for k, v in good.items() if k != "config"}
    other = {**good, "config": {**good["config"], "emb_dim": 32}}
    absurd = {**good, "config": {**good["config"], "vocab_size": 10**12}}  # 64 TB at gpt2's width
    deep = {**good, "config": {**good["config"], "n_layers": 10**9}}  # too slow to build even on the meta device
    bad_type = {**good, "config": {**good["config"], "qkv_bias": "no"}}
    cases = [
        (no_config, "no model config"),
        (other, r"weights do not match the checkpoint's config: shape of transformer\.wte\.weight \(97, 16\)"),
        (absurd, r"the config describes a model of 64,000 GB in fp32; refusing to build it"),
        (deep, r"the config describes a model of 13,120 GB in fp32; refusing to build it"),
        (bad_type, "bad model config: GPTConfig.qkv_bias"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            model_from_state({**state, "path": "x.pt"})
    assert check_model_state(good).vocab_size == 97


def test_atomic_writes_respect_the_umask(tmp_path):
    """Checkpoints and run files get the permissions any other file would (mkstemp alone makes them 0600)."""
    import os
    import stat

    from gptkernels.checkpoint import atomic_write_bytes

    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "a.bin", lambda f: f.write(b"x"))
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o077)
        q = atomic_write_bytes(tmp_path / "b.bin", lambda f: f.write(b"x"))
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
    finally:
        os.umask(old)
