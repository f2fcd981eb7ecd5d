"""Run an experiment's training runs, one ``python -m gptkernels.train`` process each, and collect their results.

Each run trains in its own folder ``<out>/<run name>/`` (the training command's ``--out-dir``) with its options
written to ``options.yaml`` there and its output to ``train.log``. A run that finished has ``result.json``; a run
that was interrupted has checkpoints and is resumed (``--resume``: the same losses as an uninterrupted run); a
run never started begins afresh. So re-running an experiment skips what is done and continues what is not.

Runs go one at a time, or ``parallel`` at once (each process then gets ``cores // parallel`` threads). One
progress bar counts the optimizer steps of the whole grid, read from every run's ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .spec import Experiment, Run

DEFAULT_MAX_STEPS = 300  # the training command's default --max-steps


@dataclasses.dataclass
class RunResult:
    """What one finished run reached: one row of the results table."""

    name: str
    varied: dict[str, Any]
    status: str  # "done", "failed" (exit status in `error`)
    parameters: int | None = None  # all parameters
    non_embedding_parameters: int | None = None  # without the token and position embeddings (Kaplan's N)
    steps: int | None = None
    tokens: int | None = None
    wall_s: float | None = None
    train_loss: float | None = None  # mean of the last logged train losses
    val_loss: float | None = None
    val_ppl: float | None = None
    val_bpb: float | None = None  # bits per byte: comparable between tokenizers
    tokenizer: str | None = None
    vocab_size: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return rows


def summarize_run(folder: Path, run: Run, wall_s: float | None) -> RunResult:
    """The :class:`RunResult` of a finished run, from the files the training command wrote."""
    info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    rows = _read_jsonl(folder / "metrics.jsonl")
    evals = [r for r in rows if "val_loss" in r]
    trains = [r for r in rows if "train_loss" in r]
    model = info.get("model", {})
    emb = model.get("emb_dim", 0) * (model.get("vocab_size", 0) + model.get("context_length", 0))
    params = info.get("parameters")
    last = evals[-1] if evals else {}
    tail = trains[-5:]
    return RunResult(
        name=run.name,
        varied=run.varied,
        status="done",
        parameters=params,
        non_embedding_parameters=params - emb if params is not None else None,
        steps=(trains[-1]["step"] if trains else last.get("step")),
        tokens=last.get("tokens") or (trains[-1]["tokens"] if trains else None),
        wall_s=wall_s,
        train_loss=sum(r["train_loss"] for r in tail) / len(tail) if tail else None,
        val_loss=last.get("val_loss"),
        val_ppl=last.get("val_ppl"),
        val_bpb=last.get("val_bpb"),
        tokenizer=str(run.options.get("tokenizer", "gpt2")),
        vocab_size=model.get("vocab_size"),
    )


def _total_steps(folder: Path, run: Run) -> int:
    """The run's planned optimizer steps: from run.json once training started, else its --max-steps."""
    try:
        return int(json.loads((folder / "run.json").read_text(encoding="utf-8"))["schedule"]["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        steps = run.options.get("max_steps", DEFAULT_MAX_STEPS)
        return int(steps) if steps else DEFAULT_MAX_STEPS


def _steps_done(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return 0
    try:
        with open(path, "rb") as f:  # only the end of the file: it grows with every logged step
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, AttributeError, ValueError):
            continue
    return 0


def run_state(folder: Path, run: Run) -> str:
    """``done`` (result.json for these options), ``resume`` (has checkpoints) or ``new``.

    A folder whose finished or started run had other options is an error: its results would be mislabelled.
    """
    import yaml

    saved = folder / "options.yaml"
    if saved.exists():
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        if old != run.options:
            changed = sorted(k for k in set(old) | set(run.options) if old.get(k) != run.options.get(k))
            raise ValueError(
                f"run {run.name!r} in {folder} was started with other options ({', '.join(changed)} differ): "
                "use another --out folder, or delete that run's folder to run it again"
            )
    if (folder / "result.json").exists():
        return "done"
    if any(folder.glob("ckpt_*.pt")):
        return "resume"
    return "new"


def _command(folder: Path, state: str) -> list[str]:
    cmd = [sys.executable, "-m", "gptkernels.train", "--config", str(folder / "options.yaml"), "--out-dir", str(folder)]
    if state == "resume":
        cmd.append("--resume")
    elif (folder / "run.json").exists() or (folder / "metrics.jsonl").exists():
        cmd.append("--overwrite")  # started but killed before its first checkpoint: nothing to resume from
    return cmd


def _run_one(
    exp: Experiment, run: Run, out: Path, threads: int, wandb: bool, env: dict[str, str]
) -> tuple[RunResult, bool]:
    """Train one run to its end (or reuse its result); returns the result and whether it was trained now."""
    import yaml

    folder = out / run.name
    state = run_state(folder, run)
    if state == "done":
        return RunResult(**json.loads((folder / "result.json").read_text(encoding="utf-8"))), False
    folder.mkdir(parents=True, exist_ok=True)
    options = dict(run.options)
    if wandb:
        options.setdefault("wandb", True)
        options.setdefault("wandb_run_name", f"{exp.name}/{run.name}")
    (folder / "options.yaml").write_text(yaml.safe_dump(run.options, sort_keys=True), encoding="utf-8")
    config = folder / ".runner_options.yaml"  # what the process reads: the run's options plus the runner's
    config.write_text(yaml.safe_dump(options, sort_keys=True), encoding="utf-8")
    cmd = _command(folder, state)
    cmd[cmd.index("--config") + 1] = str(config)
    run_env = {**os.environ, **env, "OMP_NUM_THREADS": str(threads)}
    if wandb:
        run_env.setdefault("WANDB_RUN_GROUP", exp.name)
    wall_file = folder / "wall_s.txt"  # wall time of all the run's processes, an interrupted part included
    wall = float(wall_file.read_text()) if wall_file.exists() else 0.0
    start = time.perf_counter()
    try:
        with open(folder / "train.log", "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, stdin=subprocess.DEVNULL)
    finally:
        wall += time.perf_counter() - start
        wall_file.write_text(f"{wall:.1f}\n")
    if code != 0:
        tail = (folder / "train.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        return RunResult(run.name, run.varied, "failed", error=f"exit {code}: {' '.join(tail)}"), True
    result = summarize_run(folder, run, round(wall, 1))
    data = json.dumps(result.to_dict(), indent=2)
    tmp = folder / "result.json.tmp"
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, folder / "result.json")
    return result, True


def run_experiment(
    exp: Experiment,
    out: str | Path,
    *,
    parallel: int = 1,
    wandb: bool = False,
    progress: bool = True,
    env: dict[str, str] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Train every run of ``exp`` under ``out`` (skipping finished runs, resuming interrupted ones).

    Args:
        exp: the experiment (:func:`gptkernels.experiments.load_experiment`).
        out: the experiment's folder; each run trains in ``out/<run name>``.
        parallel: how many training processes at once.
        wandb: log every run to Weights & Biases, grouped by the experiment's name (``WANDB_MODE=offline`` works).
        progress: show one progress bar over the optimizer steps of all runs.
        env: extra environment variables for the training processes.
        on_result: called with each run's result as it finishes.
    Returns:
        One :class:`RunResult` per run, in the experiment's order.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be a positive integer, got {parallel}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for run in exp.runs:  # refuse a folder of another experiment before anything runs
        run_state(out / run.name, run)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // parallel)
    results: dict[str, RunResult] = {}
    totals = {r.name: _total_steps(out / r.name, r) for r in exp.runs}
    stop = threading.Event()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(totals.values()), desc=exp.name, unit="step", dynamic_ncols=True, file=sys.stderr)

    def refresh() -> None:
        done = 0
        for r in exp.runs:
            folder = out / r.name
            totals[r.name] = _total_steps(folder, r)
            done += totals[r.name] if r.name in results else min(_steps_done(folder), totals[r.name])
        if bar is not None:
            bar.total = sum(totals.values())
            bar.n = done
            finished = sum(1 for r in results.values() if r.status == "done")
            bar.set_postfix_str(f"runs {finished}/{len(exp.runs)} done", refresh=False)
            bar.refresh()

    def watch() -> None:
        while not stop.wait(1.0):
            refresh()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {pool.submit(_run_one, exp, r, out, threads, wandb, env or {}): r for r in exp.runs}
            for fut, r in futures.items():
                result, _ = fut.result()
                results[r.name] = result
                if on_result is not None:
                    on_result(result)
    finally:
        stop.set()
        watcher.join()
        refresh()
        if bar is not None:
            bar.close()
    return [results[r.name] for r in exp.runs]


def fit_power_law(n: list[float], loss: list[float]) -> dict[str, float] | None:
    """Fit ``L(N) = a · N^(−alpha) + c`` (Kaplan et al.) by least squares; None with fewer than 3 points.

    For each candidate irreducible loss ``c`` below the smallest loss, ``log(L − c)`` is linear in ``log N``;
    the ``c`` with the smallest squared error in ``L`` wins (a 1-D search, refined around the best value).
    """
    import numpy as np

    pts = [(float(a), float(b)) for a, b in zip(n, loss) if a and a > 0 and b is not None and math.isfinite(b)]
    if len(pts) < 3:
        return None
    x = np.log(np.array([p[0] for p in pts]))
    y = np.array([p[1] for p in pts])

    def fit(c: float) -> tuple[float, float, float]:
        slope, intercept = np.polyfit(x, np.log(y - c), 1)
        pred = np.exp(intercept) * np.exp(slope * x) + c
        return float(((pred - y) ** 2).sum()), float(np.exp(intercept)), float(-slope)

    lo, hi = 0.0, float(y.min()) - 1e-6
    best = min((fit(c), c) for c in np.linspace(lo, hi, 200))
    for _ in range(3):  # refine around the best c
        step = (hi - lo) / 200
        lo, hi = max(0.0, best[1] - 2 * step), min(float(y.min()) - 1e-6, best[1] + 2 * step)
        best = min([best] + [(fit(c), c) for c in np.linspace(lo, hi, 100)])
    (sse, a, alpha), c = best
    return {"a": a, "alpha": alpha, "c": float(c), "rmse": math.sqrt(sse / len(pts))}
