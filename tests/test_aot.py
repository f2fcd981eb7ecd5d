"""Ahead-of-time compile check (benchmarks/aot_check.py): no autotune config that the ops can select spills
registers or cannot launch on sm_90 or sm_80, proven on a machine without a GPU.

``test_aot_selectable_variants_fit`` compiles the CI subset (every config of every kernel once per arch at its
worst realistic key: for attention D = 128 with dropout, and each per-head-size register cap at its largest D;
see ``aot_check.attention_cases``) in two worker processes with ``TRITON_INTERPRET`` unset: 148 s of CPU, 75 s on
the 2 cores, with a cold Triton cache (2026-12-02 15:29, Triton 3.9; 155 s and 88 s before the cap cases were
added and single-config launches were compiled once per arch), about 30 s with a warm one. The full check over
every realistic key is ``python -m benchmarks.aot_check --full`` (28 minutes cold for attention alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import aot_check

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_missing() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001 - no triton, or a build without the NVIDIA backend
        return f"Triton's NVIDIA backend is not available: {e}"
    return None if path and Path(path).exists() else "ptxas not found"


def test_sass_counts_finds_loop_bodies():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   NOP ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/                   FFMA R3, R3, R4, R5 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
    """
    counts = aot_check.sass_counts(sass)
    assert counts["sass_instr"] == 6  # the NOP is not counted
    assert counts["loops"] == [3]  # IADD3, FFMA, BRA; the trailing self-branch (end of kernel) is no loop


def test_failures_lists_spills_overflows_errors_and_uncovered_kernels():
    ok = dict(kernel="k", config={"BLOCK_M": 64}, specialization={}, pointers=["*fp16"], n_regs=128, n_spills=0)
    ok |= dict(spill_bytes=0, shared=1024, reasons=[], launchable=True, fails=False)
    spill = ok | dict(n_spills=10, spill_bytes=40, fails=True)
    big = ok | dict(shared=300000, launchable=False, reasons=["shared 300000 B > 232448"], fails=True)
    result = dict(arch="sm_90", variants=[ok, spill, big], errors=[{"case": "c", "error": "PTXASError: x\ny"}])
    result["not_launched"] = ["_new_kernel"]
    lines = aot_check.failures(result)
    assert len(lines) == 4, lines
    assert "spills 40 B/thread" in lines[0] and "shared 300000 B > 232448" in lines[1]
    assert "ERROR c: PTXASError: x" in lines[2] and "_new_kernel" in lines[3]
    assert len(aot_check.failures(result, check_coverage=False)) == 3


def test_only_selects_kernels_and_tiles():
    import triton

    only = [aot_check.parse_only("dkdv:16x16"), aot_check.parse_only("_attn_fwd_kernel:128x64x8x3")]
    tile = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2)
    assert aot_check._config_matches("_attn_bwd_dkdv_kernel", tile, only)
    assert not aot_check._config_matches("_attn_bwd_dq_kernel", tile, only)
    fa2 = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    assert aot_check._config_matches("_attn_fwd_kernel", fa2, only)
    assert not aot_check._config_matches("_attn_fwd_kernel", tile, only)
    assert aot_check.parse_only("layer_norm") == ("layer_norm", ())
    for bad in ("", "fwd:128", "fwd:axb", "fwd:1x2x3x4x5"):
        with pytest.raises(ValueError, match="--only"):
            aot_check.parse_only(bad)
    assert aot_check._parse_where("D=8,16") == ("D", [8, 16])
    assert aot_check._parse_where("dtype=float32,bfloat16") == ("dtype", ["float32", "bfloat16"])
    with pytest.raises(ValueError, match="--where"):
        aot_check._parse_where("D")


def test_ci_subset_keeps_every_config_at_its_worst_key():
    cases = aot_check.attention_cases(full=False)
    assert any(c["op"] == "attention" and c["D"] == 128 and c["dropout"] and c["Tq"] == 1024 for c in cases)
    assert any(c["op"] == "attention" and c["dtype"] == "float32" for c in cases)
    assert any(c["op"] == "attention" and c["Tq"] == 1 for c in cases)
    # The tiles dropped at D = 128 (limits by D in attention._CONFIGS), with and without dropout.
    d64 = {c["dropout"] for c in cases if c["op"] == "attention" and c["D"] == 64 and c["Tq"] == 1024}
    assert d64 == {False, True}
    # The largest D at which the tiles of attention._PTXAS_CHOOSES_REGISTERS keep maxnreg, with dropout.
    from gptkernels.ops.attention import _CONFIGS, _PTXAS_CHOOSES_REGISTERS

    capped = {(c["dtype"] == "float32", c["D"]) for c in cases if c["op"] == "attention" and c["dropout"]}
    for (kernel, tile), up_to in _PTXAS_CHOOSES_REGISTERS.items():
        fp32_only = _CONFIGS[kernel][tile][0] == 0
        assert not up_to or (fp32_only, up_to) in capped, (kernel, tile, up_to)
    full = aot_check.attention_cases(full=True)
    assert {c["D"] for c in full if c["op"] == "attention"} == set(aot_check.HEAD_DIMS)


def test_attention_register_cap_follows_the_head_size():
    """aot_check --full found 8 spills (8-24 B a thread) on three tiles that spill at small D without maxnreg and at
    large D with it: the prune function (what the autotuner and this check compile) gives each head size its cap."""
    import torch

    from gptkernels.ops._triton import VERSION as TRITON_VERSION
    from gptkernels.ops.attention import _configs, _prune_tiles, _tile, selectable_configs
    from gptkernels.ops.utils import max_registers

    def cap(kernel, tile, d, dtype, dropout):
        (config,) = [c for c in selectable_configs(kernel, d, dtype, dropout) if _tile(c) == tile]
        return config.maxnreg

    fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
    assert cap("fwd", (128, 64, 8, 3), 8, fp16, True) == max_registers(8) == 255  # sm_80: 8 B at 128 registers
    assert cap("fwd", (128, 64, 8, 3), 128, bf16, False) is None  # sm_80: 40 B at 255
    assert cap("fwd", (64, 64, 4, 3), 32, bf16, True) == 255  # sm_80: 8 B at 96
    assert cap("fwd", (64, 64, 4, 3), 64, fp16, False) is None  # sm_80: 8 B at 255
    # With the 8-bit dropout RNG, dropout at D = 64 spilled 8 B on this tile at 255 registers (Triton 3.6, sm_80).
    assert (64, 64, 4, 3) not in {_tile(c) for c in selectable_configs("fwd", 64, fp16, True)}
    assert cap("dkdv", (16, 16, 4, 2), 16, fp32, False) == 255  # sm_90: 24 B at 64
    assert cap("dkdv", (16, 16, 4, 2), 32, fp32, True) == 255  # sm_80: 8 B at 72
    assert cap("dkdv", (16, 16, 4, 2), 128, fp32, True) is None  # sm_80 40 B, sm_90 56 B at 255
    # D = 64 with dropout (sm_90): Triton 3.9 spills 16 B at 255 and none uncapped, Triton 3.6 8 B uncapped.
    assert cap("dkdv", (16, 16, 4, 2), 64, fp32, True) == (255 if TRITON_VERSION <= (3, 6) else None)
    assert cap("dq", (64, 64, 4, 3), 64, fp16, False) is None  # sm_80: 8 B at 255
    # No cap keeps dkdv's 16 x 64 from spilling at D = 128 with dropout with Triton 3.6 (sm_80, 255 registers).
    assert (16, 64, 4, 2) not in {_tile(c) for c in selectable_configs("dkdv", 128, fp16, True)}
    # Nor at D = 48 (8 B, sm_80, the 8-bit dropout RNG), which no head-size limit separates from D = 64.
    assert (16, 64, 4, 2) not in {_tile(c) for c in selectable_configs("dkdv", 64, fp16, True)}
    assert (16, 64, 4, 2) in {_tile(c) for c in selectable_configs("dkdv", 32, fp16, True)}
    # The autotuner's own list (the caps of D = 64) is left alone: the prune hands out copies.
    configs = _configs("dkdv")
    listed = [c.maxnreg for c in configs]
    prune = _prune_tiles("dkdv")["early_config_prune"]
    big = dict(BLOCK_D=128, DROPOUT=True, T_Q_BUCKET=1024, T_K_BUCKET=1024, ATOMIC_DQ=False)
    (kept,) = prune(configs, {"Q": torch.empty(1)}, **big)
    assert kept.maxnreg is None and [c.maxnreg for c in configs] == listed and 255 in listed


@pytest.mark.slow
def test_aot_selectable_variants_fit(tmp_path):
    reason = _ptxas_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "benchmarks.aot_check", "--out", str(tmp_path), "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    results = {arch: tmp_path / f"aot_sm{arch}.json" for arch in (90, 80)}
    assert all(p.exists() for p in results.values()), proc.stdout[-3000:] + proc.stderr[-3000:]
    bad = []
    for arch, path in results.items():
        result = json.loads(path.read_text())
        assert result["variants"], f"sm_{arch}: nothing compiled"
        # Every autotune config must be compiled for some key: a config no key selects is dead weight or a
        # sign that the prune function lost it.
        for kernel, configs in result["autotune"].items():
            assert any(c["selectable"] for c in configs), f"sm_{arch} {kernel}: no config selectable"
        bad += aot_check.failures(result)
    assert not bad, f"{len(bad)} selectable variants spill, cannot launch or did not compile:\n" + "\n".join(bad)
    assert proc.returncode == 0, proc.stdout[-3000:]
