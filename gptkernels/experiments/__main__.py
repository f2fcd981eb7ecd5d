"""``python -m gptkernels.experiments RUN.yaml``: train every run of an experiment, then write its results.

    python -m gptkernels.experiments experiments/model_size.yaml              # into runs/model-size/
    python -m gptkernels.experiments experiments/shift.yaml --parallel 2 --out runs/shift
    python -m gptkernels.experiments experiments/model_size.yaml --report-only   # tables and pictures again

Re-running skips finished runs and resumes interrupted ones. Exit status: 0 all runs done, 1 a run failed (its
``train.log`` says why; the others still ran), 2 bad experiment file or options.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli import OneLineErrorParser, cli_main
from .report import write_report
from .runner import RunResult, run_experiment
from .spec import load_experiment


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m gptkernels.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="experiment file (YAML or JSON): name, base, grid and/or runs")
    p.add_argument("--out", help="the experiment's folder (default: runs/<name>)")
    p.add_argument("--parallel", type=int, default=1, help="training processes at once (default: 1)")
    p.add_argument("--wandb", action="store_true", help="log every run to W&B in one group (WANDB_MODE=offline works)")
    p.add_argument("--report-only", action="store_true", help="train nothing: tables and pictures of finished runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parallel < 1:
        raise ValueError(f"--parallel must be a positive integer, got {args.parallel}")
    exp = load_experiment(args.experiment)
    out = Path(args.out or Path("runs") / exp.name)
    print(f"experiment {exp.name}: {len(exp.runs)} runs in {out}/ ({args.parallel} at a time)", flush=True)
    if args.report_only:
        results = []
        for run in exp.runs:
            folder = out / run.name
            if (folder / "result.json").exists():
                results.append(RunResult(**json.loads((folder / "result.json").read_text(encoding="utf-8"))))
            else:
                results.append(RunResult(run.name, run.varied, "missing", error="not run yet"))
    else:

        def said(r: RunResult) -> None:
            if r.status == "done":
                print(f"  {r.name}: val loss {r.val_loss:.4f} after {r.tokens:,} tokens", file=sys.stderr, flush=True)
            else:
                print(f"  {r.name}: FAILED ({r.error}); see {out / r.name / 'train.log'}", file=sys.stderr, flush=True)

        results = run_experiment(
            exp, out, parallel=args.parallel, wandb=args.wandb, progress=not args.no_progress, on_result=said
        )
    report = write_report(results, out, exp.name)
    print(report["table"], end="")
    if report["fit"] is not None:
        f = report["fit"]
        print(f"power law: L(N) = {f['a']:.4g} * N^-{f['alpha']:.4f} + {f['c']:.4f}")
    print("results: " + ", ".join(str(p) for p in report["files"].values()))
    return 0 if all(r.status == "done" for r in results) else 1


if __name__ == "__main__":
    cli_main(main)
