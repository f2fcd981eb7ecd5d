"""Experiments: the grid file, the runner (skip, resume, parallel), the power-law fit and the written results."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gptkernels.experiments import fit_power_law, load_experiment, parse_experiment, run_experiment, write_report

ROOT = Path(__file__).resolve().parents[1]

# A run that takes a few seconds on a 2-core CPU: a character model on a small text.
TINY = {
    "tokenizer": "char",
    "n_layers": 1,
    "n_heads": 2,
    "context_length": 32,
    "batch_size": 4,
    "max_steps": 6,
    "save_steps": 3,
    "eval_steps": 3,
    "sample_tokens": 0,
    "device": "cpu",
    "kernels": "torch",
    "seed": 7,
}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text((ROOT / "README.md").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return str(p)


def test_grid_is_the_product_of_its_values_after_the_explicit_runs():
    exp = parse_experiment(
        {
            "name": "x",
            "base": {"max_steps": 5, "learning-rate": 0.1},
            "runs": [{"name": "a", "emb_dim": 16}, {"name": "b", "emb_dim": 32}],
            "grid": {"seed": [1, 2], "shift": ["explicit", "implicit"]},
        }
    )
    assert len(exp.runs) == 8
    first = exp.runs[0]
    assert first.name == "a,seed=1,shift=explicit"
    assert first.options == {"max_steps": 5, "learning_rate": 0.1, "emb_dim": 16, "seed": 1, "shift": "explicit"}
    assert first.varied == {"emb_dim": 16, "seed": 1, "shift": "explicit"}
    assert len({r.name for r in exp.runs}) == 8


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"base": {"out_dir": "x"}}, "set by the experiment runner"),
        ({"grid": {"seed": 3}}, "non-empty list"),
        ({"grid": {"seed": []}}, "non-empty list"),
        ({"runs": [{"emb_dim": 16}, {"emb_dim": 16}]}, "share the name"),
        ({"bogus": 1}, "unknown experiment keys"),
        ({"runs": "a"}, "runs must be a list"),
    ],
)
def test_bad_experiment_files_are_refused_with_the_reason(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_experiment(raw)


def test_shipped_experiment_files_parse():
    files = sorted((ROOT / "experiments").glob("*.yaml"))
    assert {f.stem for f in files} >= {"example", "model_size", "shift", "tokenizer"}
    sizes = load_experiment(ROOT / "experiments" / "model_size.yaml")
    assert len(sizes.runs) >= 4
    assert {r.varied["tokenizer"] for r in load_experiment(ROOT / "experiments" / "tokenizer.yaml").runs} == {
        "gpt2",
        "byte",
        "bpe:2048",
    }


def test_power_law_fit_recovers_known_coefficients():
    n = [1e4, 3e4, 1e5, 3e5, 1e6, 3e6]
    loss = [50.0 * x**-0.3 + 2.0 for x in n]
    fit = fit_power_law(n, loss)
    assert fit is not None
    assert fit["alpha"] == pytest.approx(0.3, rel=0.02)
    assert fit["c"] == pytest.approx(2.0, abs=0.02)
    assert fit["a"] == pytest.approx(50.0, rel=0.1)
    assert fit_power_law([1, 2], [3.0, 2.0]) is None


def _experiment(text_file: str, sizes=(8, 16, 24)) -> dict:
    return {"name": "t", "base": {**TINY, "data": text_file}, "grid": {"emb_dim": list(sizes)}}


def test_runs_write_results_then_skip_and_resume(tmp_path, text_file):
    exp = parse_experiment(_experiment(text_file))
    out = tmp_path / "exp"
    results = run_experiment(exp, out, progress=False)
    assert [r.status for r in results] == ["done"] * 3, [r.error for r in results]
    assert [r.steps for r in results] == [6, 6, 6]
    assert results[0].parameters < results[1].parameters < results[2].parameters
    report = write_report(results, out, exp.name)
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [row["emb_dim"] for row in rows] == ["8", "16", "24"]
    assert float(rows[0]["val_loss"]) == pytest.approx(results[0].val_loss)
    assert (out / "val_loss.png").stat().st_size > 0 and (out / "scaling.png").stat().st_size > 0
    assert report["fit"] is not None and "Fitted power law" in (out / "results.md").read_text()

    # Re-running trains nothing: every run is done.
    logs = {r.name: (out / r.name / "train.log").read_text() for r in results}
    again = run_experiment(exp, out, progress=False)
    assert [r.val_loss for r in again] == [r.val_loss for r in results]
    assert {r.name: (out / r.name / "train.log").read_text() for r in results} == logs

    # A run killed after its step-3 checkpoint is resumed, and ends exactly where the uninterrupted run did.
    killed = out / results[1].name
    (killed / "result.json").unlink()
    (killed / "ckpt_000006.pt").unlink()
    resumed = run_experiment(exp, out, progress=False)
    commands = [line for line in (killed / "train.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and commands[-1].endswith("--resume")
    assert resumed[1].val_loss == results[1].val_loss
    assert resumed[1].steps == 6


def test_changed_options_in_an_existing_folder_are_refused(tmp_path, text_file):
    out = tmp_path / "exp"
    run_experiment(parse_experiment(_experiment(text_file, sizes=(8,))), out, progress=False)
    changed = _experiment(text_file, sizes=(8,))
    changed["base"]["max_steps"] = 4
    with pytest.raises(ValueError, match="max_steps differ"):
        run_experiment(parse_experiment(changed), out, progress=False)


def test_cli_runs_in_parallel_and_reports_a_failed_run(tmp_path, text_file):
    spec = {
        "name": "cli",
        "base": {**TINY, "data": text_file, "emb_dim": 8},
        "runs": [{"name": "ok"}, {"name": "bad", "data": str(tmp_path / "missing.txt")}],
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptkernels.experiments",
            str(path),
            "--out",
            str(tmp_path / "o"),
            "--parallel",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    result = json.loads((tmp_path / "o" / "ok" / "result.json").read_text())
    assert result["status"] == "done" and result["steps"] == 6
    assert not (tmp_path / "o" / "bad" / "result.json").exists()
    assert "bad: FAILED" in proc.stderr and "missing.txt" in proc.stderr
    assert "| ok |" in proc.stdout and "failed" in (tmp_path / "o" / "results.md").read_text()


def test_cli_bad_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: {resume: true}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gptkernels.experiments", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "set by the experiment runner" in proc.stderr
