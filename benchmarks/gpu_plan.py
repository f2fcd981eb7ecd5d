"""The GPU check's plan: its phases and their time budgets, the tests it runs first, the benchmark targets and
what each costs (compilation and autotuning included), and the final JSON.

``bash benchmarks/gpu_check.sh`` reads its budgets from here and ``--dry-run`` prints this plan, so the plan
that is checked on the CPU (tests/test_gpu_check.py) is the one that runs on the GPU.

    python -m benchmarks.gpu_plan budgets              # shell assignments: BUDGET_install=90 ...
    python -m benchmarks.gpu_plan plan                 # phases, budgets, tests and targets; exit 1 if over 480 s
    python -m benchmarks.gpu_plan split-tests DIR FILE...   # DIR/<file>.quick.txt: one case per test function
    python -m benchmarks.gpu_plan finish OUT WORK      # OUT/gpu_check.json: phases, tests, every target's figure

Nothing here imports torch or gptkernels at module level: ``budgets`` runs before the install.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_SOFT_MARGIN_S = 20  # the bench phase's cases stop starting this long before its limit
TOTAL_S = 480  # the whole check, under the 10 minutes a device command may run (8 minutes, with room to spare)

# (phase, seconds, what it does). The tests get their budgets as a hard limit; the benchmarks get whatever the
# earlier phases left of TOTAL_S minus the report's and the margin's, at least their own budget.
PHASES = (
    ("install", 80, "carried wheels (pip --no-index), then pip install -e . (builds the sampling op for this GPU)"),
    ("env", 15, "nvidia-smi and the versions of python, torch, triton, the GPU, nvcc and the sampling op"),
    ("precompile", 40, "Triton's cache filled with the benchmarks' kernels by the AOT tool, 16 processes"),
    ("tests_quick", 60, "each op's test file, one case per test function, the five files side by side"),
    ("tests_rest", 45, "every other unit test on CUDA (pytest-xdist -n 8 when installed)"),
    ("bench", 215, "the benchmark targets first, compile/autotune warm-up before each timed region"),
    ("report", 15, "report.md, the pictures and gpu_check.json"),
    ("margin", 10, "process start-up and rounding"),
)
BUDGETS = {name: seconds for name, seconds, _ in PHASES}

# Each op's unit tests, cheapest first; the quick pass runs them side by side.
OP_TESTS = (
    "tests/test_sampling.py",
    "tests/test_cross_entropy.py",
    "tests/test_layer_norm.py",
    "tests/test_bias_gelu.py",
    "tests/test_attention.py",
)


# ---------------------------------------------------------------------------------------------------------
# Tests: one case per test function first
# ---------------------------------------------------------------------------------------------------------


def split_ids(ids: list[str]) -> tuple[list[str], list[str]]:
    """(quick, rest): the first parametrisation of each test function, and all the others."""
    quick, rest, seen = [], [], set()
    for node in ids:
        function = node.split("[", 1)[0]
        (rest if function in seen else quick).append(node)
        seen.add(function)
    return quick, rest


def collect_ids(paths: list[str]) -> list[str]:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if "::" in line and not line.startswith(" ")]


# ---------------------------------------------------------------------------------------------------------
# Benchmarks: the targets in run order, with their costs
# ---------------------------------------------------------------------------------------------------------


def collect_bench() -> list[dict]:
    """Every benchmark case in run order: id, tier, cost (seconds to time it) and warm-up (key, seconds) that
    the first case with that key pays (compilation and autotuning), from the modules' hooks."""
    import pytest

    from benchmarks import conftest, harness

    found: list[dict] = []

    class Collector:
        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(self, config, items):
            for item in items:
                found.append(
                    dict(
                        id=item.nodeid,
                        tier=conftest._priority(item),
                        target=conftest._priority(item) <= harness.TIER_TARGET,
                        cost=conftest._cost(item),
                        warmup=conftest._warmup(item),
                    )
                )

    import contextlib
    import io

    args = ["benchmarks/", "--collect-only", "-q", "-p", "no:cacheprovider", "--benchmark-only"]
    with contextlib.redirect_stdout(io.StringIO()) as listing:
        code = pytest.main(args, plugins=[Collector()])
    if code not in (0, 5) or not found:
        print(listing.getvalue()[-3000:], file=sys.stderr)
        raise RuntimeError(f"collecting the benchmarks failed (pytest exit {code})")
    found.sort(key=lambda c: c["tier"])  # conftest sorts by tier, stably
    return found


def schedule(cases: list[dict]) -> list[dict]:
    """Add ``start`` and ``end`` (seconds into the bench phase) to each case, each warm-up key paid once."""
    t, paid = 0.0, set()
    for c in cases:
        warm = sum(seconds for key, seconds in c["warmup"] if key not in paid)
        paid.update(key for key, _ in c["warmup"])
        c["start"], c["warm"] = t, warm
        t += warm + c["cost"]
        c["end"] = t
    return cases


# ---------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------


def plan_text(cases: list[dict] | None, tests: dict[str, tuple[list[str], list[str]]] | None) -> tuple[str, bool]:
    lines = [f"gpu_check plan: {len(PHASES)} phases, {sum(BUDGETS.values())} s of {TOTAL_S} s", ""]
    for name, seconds, what in PHASES:
        lines.append(f"phase {name:<12} {seconds:>4} s  {what}")
    ok = sum(BUDGETS.values()) <= TOTAL_S
    if tests:
        lines += ["", "tests_quick (each file limited to the phase's budget, side by side):"]
        for path, (quick, rest) in tests.items():
            lines.append(f"  {path}: {len(quick)} quick cases, {len(rest)} more in tests_rest")
            lines += [f"    quick {node}" for node in quick]
    if cases is not None:
        targets = [c for c in cases if c["target"]]
        bench = BUDGETS["bench"] - BENCH_SOFT_MARGIN_S
        end = max((c["end"] for c in targets), default=0.0)
        fits = end <= bench
        ok = ok and fits
        lines += [
            "",
            f"bench targets: {len(targets)} cases, planned {end:.0f} s of the {bench} s that the bench phase "
            f"starts cases in "
            f"({'fits' if fits else 'DOES NOT FIT'}); {len(cases) - len(targets)} other cases follow while time "
            "is left",
        ]
        for c in targets:
            warm = f" + warm-up {c['warm']:.0f} s" if c["warm"] else ""
            lines.append(f"  target {c['id']}  budget {c['cost']:.1f} s{warm}  (at {c['start']:.0f} s)")
    lines += ["", f"plan: {'fits' if ok else 'DOES NOT FIT'} in {TOTAL_S} s"]
    return "\n".join(lines), ok


# ---------------------------------------------------------------------------------------------------------
# Finish: one JSON with every phase, test file and target
# ---------------------------------------------------------------------------------------------------------


def _pytest_counts(log: Path) -> dict[str, int]:
    """The counts of pytest's last summary line in ``log`` ("3 failed, 10 passed, 2 skipped in 4.2s")."""
    if not log.exists():
        return {}
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        if re.search(r"\b(passed|failed|error|skipped|deselected)\b.* in [\d.]+s", line):
            counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", line)}
    return counts


def finish(out: Path, work: Path) -> dict:
    """Write ``out/gpu_check.json`` from the run's working files in ``work`` (summary.txt, outcomes.json,
    tests_*.log) and ``out/bench.json``."""
    phases = []
    summary = work / "summary.txt"
    if summary.exists():
        for line in summary.read_text().splitlines():
            m = re.match(r"(\w+(?: \w+)?): (ok|FAILED|SKIPPED)(.*)", line)
            if m:
                phases.append({"phase": m.group(1), "status": m.group(2).lower(), "detail": m.group(3).strip()})
    tests = {p.stem: _pytest_counts(p) for p in sorted(work.glob("tests_*.log"))}
    outcomes = json.loads((work / "outcomes.json").read_text()) if (work / "outcomes.json").exists() else {}
    medians = {}
    if (out / "bench.json").exists():
        for b in json.loads((out / "bench.json").read_text()).get("benchmarks", []):
            medians[b.get("fullname") or b.get("name")] = (b.get("stats") or {}).get("median")
    targets = []
    for node, o in outcomes.get("cases", {}).items():
        if not o.get("target"):
            continue
        median = medians.get(node)
        entry = {"id": node, "median_s": median}
        if median is None:
            entry["reason"] = o.get("reason") or o.get("outcome") or "not run"
        targets.append(entry)
    result = {"phases": phases, "tests": tests, "targets": targets}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "plan"
    if command == "budgets":
        print(" ".join(f"BUDGET_{name}={seconds}" for name, seconds, _ in PHASES) + f" BUDGET_total={TOTAL_S}")
        return 0
    if command == "split-tests":
        out = Path(argv[1])
        out.mkdir(parents=True, exist_ok=True)
        ids = collect_ids(argv[2:])
        for path in argv[2:]:
            quick, rest = split_ids([n for n in ids if n.startswith(path + "::")])
            stem = Path(path).stem
            (out / f"{stem}.quick.txt").write_text("".join(f"{n}\n" for n in quick))
            (out / f"{stem}.rest.txt").write_text("".join(f"{n}\n" for n in rest))
        return 0
    if command == "finish":
        result = finish(Path(argv[1]), Path(argv[2]))
        missing = [t for t in result["targets"] if t["median_s"] is None]
        print(f"gpu_check.json: {len(result['targets'])} targets, {len(missing)} without a number (reasons listed)")
        return 0
    if command == "plan":
        ids = collect_ids(list(OP_TESTS))
        tests = {path: split_ids([n for n in ids if n.startswith(path + "::")]) for path in OP_TESTS}
        text, ok = plan_text(schedule(collect_bench()), tests)
        print(text)
        return 0 if ok else 1
    print(f"gpu_plan: unknown command {command!r} (budgets, plan, split-tests, finish)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
