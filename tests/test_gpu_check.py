"""The GPU check's plan fits in 8 minutes and gives every benchmark target a budget, checked on the CPU through
``bash benchmarks/gpu_check.sh --dry-run``; and its pieces (test split, the final JSON) behave."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_plan

ROOT = Path(__file__).resolve().parents[1]

# The ops that the report's targets (benchmarks/report.py: evaluate_targets) judge: each needs target cases.
TARGET_OPS = ("ceiling", "attention", "layer_norm", "bias_gelu", "cross_entropy", "sampling", "train_step")


@pytest.fixture(scope="module")
def dry_run() -> str:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_dry_run_plan_fits_in_8_minutes(dry_run):
    phases = dict(re.findall(r"^phase (\w+)\s+(\d+) s", dry_run, re.M))
    assert set(phases) == set(gpu_plan.BUDGETS), phases
    assert sum(int(s) for s in phases.values()) <= 480
    assert "plan: fits in 480 s" in dry_run
    # every phase's command is shown, and nothing ran
    for phase in ("wheels", "install", "env", "precompile", "tests_rest", "bench", "report"):
        assert f"=== {phase} (limit" in dry_run or phase == "wheels", phase
    assert "DRY RUN" in dry_run


@pytest.mark.slow
def test_dry_run_lists_every_benchmark_target_with_a_budget(dry_run):
    planned = dict(re.findall(r"^  target (\S+)  budget ([\d.]+) s", dry_run, re.M))
    targets = [c for c in gpu_plan.collect_bench() if c["target"]]
    missing = [c["id"] for c in targets if c["id"] not in planned]
    assert not missing, f"targets without a budget in the dry run: {missing}"
    assert all(float(b) > 0 for b in planned.values())
    for op in TARGET_OPS:
        assert any(op in node for node in planned), f"no target case for {op}"
    # the first pass tests every op's file
    for path in gpu_plan.OP_TESTS:
        m = re.search(rf"^  {re.escape(path)}: (\d+) quick cases", dry_run, re.M)
        assert m and int(m.group(1)) > 0, path


def test_split_ids_takes_one_case_per_test_function():
    ids = ["t.py::a[1]", "t.py::a[2]", "t.py::b", "t.py::c[x]", "t.py::a[3]", "t.py::c[y]"]
    quick, rest = gpu_plan.split_ids(ids)
    assert quick == ["t.py::a[1]", "t.py::b", "t.py::c[x]"]
    assert rest == ["t.py::a[2]", "t.py::a[3]", "t.py::c[y]"]


def test_schedule_pays_each_warmup_once():
    cases = [
        dict(id="a", target=True, cost=1.0, warmup=[("k", 5.0), ("t1", 1.0)]),
        dict(id="b", target=True, cost=1.0, warmup=[("k", 5.0), ("t2", 1.0)]),
        dict(id="c", target=True, cost=2.0, warmup=[]),
    ]
    out = gpu_plan.schedule(cases)
    assert [c["warm"] for c in out] == [6.0, 1.0, 0.0]
    assert out[-1]["end"] == 6.0 + 1.0 + 1.0 + 1.0 + 2.0


def test_finish_gives_every_target_a_number_or_a_reason(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    summary = "install: ok (40s)\ntests_quick test_attention: FAILED exit 1 (x)\nbench: FAILED exit 124 (215s)\n"
    (work / "summary.txt").write_text(summary)
    (work / "tests_quick_test_attention.log").write_text("....\n2 failed, 14 passed, 1 skipped in 12.3s\n")
    cases = {
        "benchmarks/test_x.py::test_x[a]": {"target": True, "outcome": "passed", "reason": None},
        "benchmarks/test_x.py::test_x[b]": {"target": True, "outcome": "skipped", "reason": "time budget: ..."},
        "benchmarks/test_x.py::test_x[c]": {"target": True, "outcome": "not run", "reason": "not reached: ..."},
        "benchmarks/test_x.py::test_x[d]": {"target": False, "outcome": "passed", "reason": None},
    }
    (work / "outcomes.json").write_text(json.dumps({"cases": cases}))
    bench = {"benchmarks": [{"fullname": "benchmarks/test_x.py::test_x[a]", "stats": {"median": 0.001}}]}
    (out / "bench.json").write_text(json.dumps(bench))
    result = gpu_plan.finish(out, work)
    assert json.loads((out / "gpu_check.json").read_text()) == result
    assert [(p["phase"], p["status"]) for p in result["phases"]] == [
        ("install", "ok"),
        ("tests_quick test_attention", "failed"),
        ("bench", "failed"),
    ]
    assert result["tests"]["tests_quick_test_attention"] == {"failed": 2, "passed": 14, "skipped": 1}
    by_id = {t["id"].split("[")[1][0]: t for t in result["targets"]}
    assert set(by_id) == {"a", "b", "c"}
    assert by_id["a"]["median_s"] == 0.001 and "reason" not in by_id["a"]
    assert by_id["b"]["reason"].startswith("time budget") and by_id["c"]["reason"].startswith("not reached")
