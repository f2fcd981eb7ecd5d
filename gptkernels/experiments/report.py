"""An experiment's plain-file results: ``results.csv``, ``results.md`` and pictures a person can open.

- ``results.csv`` / ``results.md``: one row per run: what varied, parameters, tokens, wall time, final train and
  validation loss, perplexity and bits per byte;
- ``val_loss.png``: validation loss against tokens seen, every run on one plot (and train loss, dotted);
- ``scaling.png`` (when the parameter count varies over ≥ 3 runs): final validation loss against non-embedding
  parameters with the fitted power law ``L(N) = a · N^(−α) + c``, whose coefficients also go to ``fit.json``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .runner import RunResult, _read_jsonl, fit_power_law

COLUMNS = (
    ("parameters", "params", lambda v: f"{v / 1e6:.2f}M"),
    ("non_embedding_parameters", "non-emb params", lambda v: f"{v / 1e6:.3f}M"),
    ("tokens", "tokens", lambda v: f"{v:,}"),
    ("wall_s", "time", lambda v: f"{v:.0f} s"),
    ("train_loss", "train loss", lambda v: f"{v:.4f}"),
    ("val_loss", "val loss", lambda v: f"{v:.4f}"),
    ("val_ppl", "val ppl", lambda v: f"{v:,.1f}"),
    ("val_bpb", "val bits/byte", lambda v: f"{v:.4f}"),
)


def _varied_keys(results: list[RunResult]) -> list[str]:
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.varied if k not in keys]
    return keys


def write_csv(results: list[RunResult], path: Path) -> None:
    varied = _varied_keys(results)
    fields = ["run", *varied, "status", *(c[0] for c in COLUMNS), "tokenizer", "vocab_size", "steps", "error"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            d = r.to_dict()
            row = {"run": r.name, **{k: r.varied.get(k, "") for k in varied}}
            row.update({k: d.get(k) for k in fields if k not in row and k in d})
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def markdown_table(results: list[RunResult]) -> str:
    varied = _varied_keys(results)
    head = ["run", *varied, *(c[1] for c in COLUMNS)]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i <= len(varied) else "---:" for i in range(len(head))) + "|",
    ]
    for r in results:
        d = r.to_dict()
        cells = [r.name, *(str(r.varied.get(k, "")) for k in varied)]
        if r.status != "done":
            cells += [f"failed: {r.error}"] + [""] * (len(COLUMNS) - 1)
        else:
            cells += ["" if d[key] is None else fmt(d[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: list[RunResult], out: Path, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for i, r in enumerate(results):
        rows = _read_jsonl(out / r.name / "metrics.jsonl")
        color = f"C{i % 10}"
        ev = [(x["tokens"], x["val_loss"]) for x in rows if "val_loss" in x]
        tr = [(x["tokens"], x["train_loss"]) for x in rows if "train_loss" in x]
        if tr:
            ax.plot(*zip(*tr), color=color, alpha=0.35, linewidth=1, linestyle=":")
        if ev:
            ax.plot(*zip(*ev), color=color, marker="o", markersize=3, label=r.name)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token): validation solid, train dotted")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(results: list[RunResult], path: Path, title: str) -> dict[str, float] | None:
    """Final validation loss against non-embedding parameters, with the fitted power law; the fit, or None."""
    pts = [(r.non_embedding_parameters, r.val_loss) for r in results if r.status == "done" and r.val_loss]
    if len({p[0] for p in pts}) < 3:
        return None
    fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
    if fit is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    n = np.array([p[0] for p in pts], dtype=float)
    ax.scatter(n, [p[1] for p in pts], zorder=3, label="runs")
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
    ax.plot(
        grid,
        fit["a"] * grid ** -fit["alpha"] + fit["c"],
        "C1-",
        label=f"L(N) = {fit['a']:.3g}·N^(−{fit['alpha']:.3f}) + {fit['c']:.3f}",
    )
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fit


def write_report(results: list[RunResult], out: str | Path, name: str) -> dict[str, Any]:
    """Write results.csv, results.md, val_loss.png and (model size varying) scaling.png + fit.json into ``out``."""
    out = Path(out)
    write_csv(results, out / "results.csv")
    table = markdown_table(results)
    files = {"csv": out / "results.csv", "table": out / "results.md", "curves": out / "val_loss.png"}
    plot_curves(results, out, files["curves"], f"{name}: loss against tokens")
    fit = plot_scaling(results, out / "scaling.png", f"{name}: final loss against model size")
    text = f"# {name}\n\n{table}"
    if fit is not None:
        files["scaling"] = out / "scaling.png"
        (out / "fit.json").write_text(json.dumps(fit, indent=2) + "\n", encoding="utf-8")
        text += (
            f"\nFitted power law: L(N) = {fit['a']:.4g} · N^(−{fit['alpha']:.4f}) + {fit['c']:.4f} "
            f"(N: non-embedding parameters; rmse {fit['rmse']:.4f})\n"
        )
    (out / "results.md").write_text(text, encoding="utf-8")
    return {"files": files, "fit": fit, "table": table}
