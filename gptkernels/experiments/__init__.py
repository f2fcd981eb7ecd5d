"""Experiments: grids of training runs, resumable, with a results table and pictures (``python -m
gptkernels.experiments RUN.yaml``). See :mod:`gptkernels.experiments.spec` for the file format."""

from .report import write_report
from .runner import RunResult, fit_power_law, run_experiment
from .spec import Experiment, Run, load_experiment, parse_experiment

__all__ = [
    "Experiment",
    "Run",
    "RunResult",
    "fit_power_law",
    "load_experiment",
    "parse_experiment",
    "run_experiment",
    "write_report",
]
