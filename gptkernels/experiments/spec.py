"""An experiment file: a named grid of training runs, each a set of ``python -m gptkernels.train`` options.

The file (YAML or JSON) has three keys::

    name: model-size              # the experiment's name (folder name and W&B group)
    base:                         # options every run shares: any option of ``python -m gptkernels.train``
      data: builtin
      max_steps: 200
    grid:                         # optional: every combination of these values is one run
      n_layers: [1, 2, 4]
      emb_dim: [32, 64]
    runs:                         # optional: explicit runs, each a name and its options (combined with the grid)
      - {name: small, emb_dim: 32}

A run's options are ``base``, then its ``runs`` entry, then its grid values (the later wins). Each run's name
is its ``runs`` name and/or its grid values (``n_layers=2,emb_dim=64``), unique in the experiment; the name is
also its folder under the experiment's output folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

from ..cli import read_structured_file

# Options that belong to the runner, not to a run: it sets them for every run itself.
RUNNER_OPTIONS = ("out_dir", "resume", "overwrite", "config")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of an experiment."""

    name: str  # unique in the experiment; also its folder name
    options: dict[str, Any]  # options of ``python -m gptkernels.train`` (underscored keys), runner options excluded
    varied: dict[str, Any]  # the options that make this run differ from the base (its row in the results table)


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    runs: list[Run]
    base: dict[str, Any]


def _key(k: Any, where: str) -> str:
    key = str(k).replace("-", "_")
    if key in RUNNER_OPTIONS:
        raise ValueError(f"{where}: {k!r} is set by the experiment runner for each run; remove it")
    return key


def _options(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of training options to values, got {type(raw).__name__}")
    return {_key(k, where): v for k, v in raw.items()}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(_fmt(x) for x in v)
    return str(v)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", name).strip("_") or "run"


def parse_experiment(raw: dict[str, Any], default_name: str = "experiment") -> Experiment:
    """An :class:`Experiment` from the file's mapping (see the module docstring), checked."""
    if not isinstance(raw, dict):
        raise ValueError("an experiment file must be a mapping with 'base', 'grid' and/or 'runs'")
    unknown = set(raw) - {"name", "base", "grid", "runs", "description"}
    if unknown:
        raise ValueError(f"unknown experiment keys {sorted(unknown)}; expected name, description, base, grid, runs")
    name = _safe_name(str(raw.get("name") or default_name))
    base = _options(raw.get("base"), "base")
    grid = _options(raw.get("grid"), "grid")
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid: {k} must be a non-empty list of values, got {values!r}")
    explicit = raw.get("runs") or []
    if not isinstance(explicit, list):
        raise ValueError("runs must be a list of mappings, each with a 'name' and training options")
    entries: list[tuple[str | None, dict[str, Any]]] = []
    for i, r in enumerate(explicit):
        if not isinstance(r, dict):
            raise ValueError(f"runs[{i}] must be a mapping, got {r!r}")
        r = dict(r)
        run_name = r.pop("name", None)
        entries.append((None if run_name is None else str(run_name), _options(r, f"runs[{i}]")))
    if not entries:
        entries = [(None, {})]
    runs: list[Run] = []
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    for run_name, run_options in entries:
        for combo in combos:
            parts = ([run_name] if run_name else []) + [f"{k}={_fmt(v)}" for k, v in combo.items()]
            label = _safe_name(",".join(parts) or "base")
            runs.append(Run(label, {**base, **run_options, **combo}, {**run_options, **combo}))
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two runs would share the name(s) {dupes}: give each entry of 'runs' its own name")
    return Experiment(name, runs, base)


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file (YAML or JSON)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no experiment file {p}")
    try:
        raw = read_structured_file(p)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    try:
        return parse_experiment(raw, default_name=p.stem)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
