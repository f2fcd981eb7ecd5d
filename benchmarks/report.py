"""Turn a pytest-benchmark JSON into a Markdown report and two pictures.

    python -m benchmarks.report RESULTS.json [--out DIR] [--strict]

The table has one row per case (a benchmark group) and provider: the median time, the speedup over the group's
baseline (the ``torch`` eager provider; the flash SDPA for attention lengths without an eager run; the cache-less
loop for generation; Hugging Face for the tokenizer), the case's figure (GB/s, TFLOP/s, tokens/s, peak memory),
its share of the ceiling measured in the same run, and the issue's targets with PASS/MISS. Misses are also listed
together at the end. Writes ``report.md``, ``speedup.png`` and, when attention was measured,
``attention_tflops.png`` into ``--out`` (default: the JSON's folder). ``--strict`` exits 1 when a target misses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Baseline of a group: the first of these providers present in it.
BASELINES = ("torch", "sdpa_flash", "no_cache", "hf_fast")
KERNEL = "gptkernels"


@dataclass
class Row:
    group: str
    provider: str
    median: float  # seconds per call
    extra: dict[str, Any]
    targets: list[tuple[bool, str]] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.extra.get(key, default)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def load_rows(data: dict[str, Any]) -> list[Row]:
    rows = []
    for b in data.get("benchmarks", []):
        stats = b.get("stats") or {}
        if "median" not in stats:
            continue
        extra = dict(b.get("extra_info") or {})
        provider = extra.get("provider") or (b.get("params") or {}).get("provider") or b.get("name", "?")
        rows.append(Row(b.get("group") or b.get("name", "?"), str(provider), float(stats["median"]), extra))
    return rows


def by_group(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.group].append(r)
    return dict(groups)


def baseline(rows: list[Row]) -> Row | None:
    providers = {r.provider: r for r in rows}
    for name in BASELINES:
        if name in providers:
            return providers[name]
    return None


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def figure(r: Row) -> str:
    parts = []
    if r.get("gbps") is not None:
        parts.append(f"{r.get('gbps'):.0f} GB/s")
    if r.get("tflops") is not None and r.get("roofline") == "tflops":
        parts.append(f"{r.get('tflops'):.1f} TFLOP/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r.get('mfu'):.1f}%")
    if r.get("tokens_per_s") is not None:
        parts.append(f"{fmt_count(r.get('tokens_per_s'))} tok/s")
    if r.get("mb_per_s") is not None:
        parts.append(f"{r.get('mb_per_s'):.1f} MB/s")
    if r.get("samples_per_s") is not None:
        parts.append(f"{fmt_count(r.get('samples_per_s'))} samples/s")
    if r.get("peak_mem_bytes") is not None:
        parts.append(f"peak +{fmt_bytes(r.get('peak_mem_bytes'))}")
    elif r.get("peak_mem_total_bytes") is not None:
        parts.append(f"peak {fmt_bytes(r.get('peak_mem_total_bytes'))}")
    if r.get("extension") is False:
        parts.append("no C++ extension: reference path")
    if r.get("same_ids_as_hf") is False:
        parts.append("ids differ from HF")
    return ", ".join(parts)


def pct_of_ceiling(r: Row) -> float | None:
    kind = r.get("roofline")
    if kind == "gbps" and r.get("gbps") and r.get("ceiling_gbps"):
        return r.get("gbps") / r.get("ceiling_gbps")
    if kind == "tflops" and r.get("tflops") and r.get("ceiling_tflops"):
        return r.get("tflops") / r.get("ceiling_tflops")
    return None


# ---------------------------------------------------------------------------------------------------------
# Targets from the issues
# ---------------------------------------------------------------------------------------------------------


def _find(rows: list[Row], provider: str, **match: Any) -> Row | None:
    for r in rows:
        if r.provider == provider and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ratio_target(row: Row, other: Row | None, at_least: float, what: str) -> None:
    if other is None:
        row.targets.append((False, f"{what} ≥ {at_least:g}×: nothing measured to compare with"))
        return
    ratio = other.median / row.median
    row.targets.append((ratio >= at_least, f"{what} ≥ {at_least:g}× ({ratio:.2f}×)"))


def evaluate_targets(rows: list[Row]) -> None:
    """Attach (passed, text) to the gptkernels rows that an issue sets a target for."""
    for r in rows:
        if r.provider not in (KERNEL, "triton"):
            continue
        op, mode = r.get("op"), r.get("mode")
        share = pct_of_ceiling(r)
        if r.provider == KERNEL and (
            (op in ("layer_norm", "add_layer_norm") and mode == "fwd+bwd") or op == "bias_gelu"
        ):
            if share is None:
                r.targets.append((False, "≥ 80% of copy bandwidth: no ceiling measured"))
            else:
                r.targets.append((share >= 0.8, f"≥ 80% of copy bandwidth ({100 * share:.0f}%)"))
        elif r.provider == KERNEL and op == "attention" and r.get("head_dim") == 64:
            if not 1024 <= (r.get("seq_len") or 0) <= 8192:
                continue
            key = dict(op="attention", seq_len=r.get("seq_len"), head_dim=64, dropout=r.get("dropout"))
            sdpa = _find(rows, "sdpa_flash", mode=mode, **key)
            if mode == "fwd":
                _ratio_target(r, sdpa, 1.0, "fwd vs sdpa_flash")
            elif mode == "fwd+bwd":
                gk_fwd, sdpa_fwd = _find(rows, KERNEL, mode="fwd", **key), _find(rows, "sdpa_flash", mode="fwd", **key)
                if sdpa is None or gk_fwd is None or sdpa_fwd is None:
                    r.targets.append((False, "bwd vs sdpa_flash ≥ 0.8×: fwd or sdpa_flash measurement missing"))
                else:
                    gk_bwd, sdpa_bwd = r.median - gk_fwd.median, sdpa.median - sdpa_fwd.median
                    ratio = sdpa_bwd / gk_bwd if gk_bwd > 0 else math.inf
                    r.targets.append((ratio >= 0.8, f"bwd vs sdpa_flash ≥ 0.8× ({ratio:.2f}×, bwd = fwd+bwd − fwd)"))
        elif r.provider == KERNEL and op == "linear_cross_entropy":
            eager = _find(rows, "torch", op=op, tokens=r.get("tokens"))
            if eager is None:
                r.targets.append((False, "vs eager: no eager measurement"))
                continue
            t = r.median / eager.median
            r.targets.append((t <= 1.1, f"time ≤ 1.1× eager ({t:.2f}×)"))
            mine, theirs = r.get("peak_mem_bytes"), eager.get("peak_mem_bytes")
            if mine is not None and theirs:
                m = mine / theirs
                r.targets.append((m <= 0.25, f"peak memory ≤ 0.25× eager ({m:.2f}×)"))
        elif r.provider == KERNEL and op == "host_overhead" and mode in ("fwd", "fwd+bwd"):
            keys = dict(op=op, mode=mode, measured_op=r.get("measured_op"), device_type=r.get("device_type"))
            torch_row = _find(rows, "torch", **keys)
            if r.get("vs_torch_interleaved") is not None:  # the two timed in alternating bursts (less noisy)
                t = r.get("vs_torch_interleaved")
                r.targets.append((t <= 2.0, f"host time ≤ 2× the PyTorch op's ({t:.2f}×, interleaved)"))
            elif torch_row is None:
                r.targets.append((False, "host time ≤ 2× the PyTorch op's: no PyTorch measurement"))
            else:
                t = r.median / torch_row.median
                r.targets.append((t <= 2.0, f"host time ≤ 2× the PyTorch op's ({t:.2f}×)"))
        elif r.provider == "triton" and op == "train_step":
            eager = _find(rows, "torch", op=op, model=r.get("model"))
            _ratio_target(r, eager, 1.0 + 1e-9, "faster than kernels=torch")
        elif r.provider == KERNEL and op == "sampling" and r.get("device_type") == "cpu":
            need = {"top_p": 20.0, "top_k": 3.0}.get(mode)
            if need is not None:
                chain = _find(rows, "torch", op=op, mode=mode, batch=r.get("batch"), device_type="cpu")
                _ratio_target(r, chain, need, "vs the PyTorch chain")


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def header(data: dict[str, Any]) -> list[str]:
    mi = data.get("machine_info") or {}
    gk = mi.get("gptkernels") or {}
    cpu = mi.get("cpu") or {}
    cpu_name = cpu.get("brand_raw") if isinstance(cpu, dict) else None
    commit = data.get("commit_info") or {}
    lines = ["# gptkernels benchmarks", ""]
    gpu = gk.get("gpu")
    if gpu:
        fmt = {"driver": "driver {}", "gpu_memory_gib": "{} GiB", "gpu_sms": "{} SMs", "gpu_l2_mib": "L2 {} MiB"}
        extra = ", ".join(f.format(gk[k]) for k, f in fmt.items() if gk.get(k) is not None)
        lines.append(f"- GPU: **{gpu}** ({extra})")
    else:
        lines.append("- GPU: none (CUDA cases skipped)")
    lines.append(
        f"- CPU: {cpu_name or gk.get('cpu') or mi.get('processor') or '?'}, {gk.get('cpu_threads', '?')} threads"
    )
    load, cpus = gk.get("load_avg_at_start"), gk.get("cpu_count")
    if load and cpus:
        busy = " (**busier than its CPUs: CPU timings are unreliable**)" if load[0] > cpus else ""
        omp = f"; OMP_NUM_THREADS={gk['omp_num_threads']}" if gk.get("omp_num_threads") else ""
        lines.append(f"- CPU load at start: {load[0]:.1f} on {cpus} CPUs{busy}{omp}")
    lines.append(f"- machine: {mi.get('node', '?')}, {gk.get('platform') or mi.get('system', '?')}")
    lines.append(f"- date: {data.get('datetime', '?')}")
    versions = ", ".join(
        f"{k} {gk[k]}" for k in ("torch", "torch_cuda", "triton", "transformers", "tiktoken") if gk.get(k) is not None
    )
    lines.append(f"- versions: {versions or '?'}; python {mi.get('python_version', '?')}")
    ext = gk.get("sampling_extension")
    if ext is not None:
        cuda = gk.get("sampling_cuda_extension")
        lines.append(f"- sampling extension built: {ext}" + (f" (with CUDA: {cuda})" if gk.get("gpu") else ""))
    if commit:
        dirty = " (uncommitted changes)" if commit.get("dirty") else ""
        lines.append(f"- commit: {str(commit.get('id', '?'))[:12]}{dirty} on {commit.get('branch', '?')}")
    ceilings = _ceilings(data)
    if ceilings:
        lines.append(
            f"- measured ceilings: copy {ceilings.get('ceiling_gbps', float('nan')):.0f} GB/s (read + write), "
            f"bf16 matmul {ceilings.get('ceiling_tflops', float('nan')):.0f} TFLOP/s"
        )
    return lines + [""]


def _ceilings(data: dict[str, Any]) -> dict[str, float]:
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info") or {}
        if "ceiling_gbps" in extra:
            return {k: extra[k] for k in ("ceiling_gbps", "ceiling_tflops") if k in extra}
    return {}


def table(rows: list[Row]) -> list[str]:
    groups = by_group(rows)
    out = [
        "| case | provider | median | × baseline | figure | % of ceiling | target |",
        "| --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for group in sorted(groups, key=_group_order):
        members = sorted(groups[group], key=lambda r: (r.provider != KERNEL, r.median))
        base = baseline(members)
        for r in members:
            if base is None or r is base:
                speed = "baseline" if r is base else "–"
            else:
                speed = f"{base.median / r.median:.2f}× vs {base.provider}"
            share = pct_of_ceiling(r)
            pct = f"{100 * share:.0f}%" if share is not None else ""
            target = "; ".join(("PASS " if ok else "**MISS** ") + text for ok, text in r.targets)
            provider = f"**{r.provider}**" if r.provider in (KERNEL, "triton") else r.provider
            out.append(f"| {group} | {provider} | {fmt_time(r.median)} | {speed} | {figure(r)} | {pct} | {target} |")
    return out


def _group_order(group: str) -> tuple:
    # ceiling first, then by op name, keeping numeric parts in numeric order
    import re

    key = [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", group)]
    return (group != "ceiling", key)


def summary(rows: list[Row]) -> list[str]:
    results = [(r, ok, text) for r in rows for ok, text in r.targets]
    if not results:
        return ["No target applies to the cases in this run.", ""]
    misses = [(r, text) for r, ok, text in results if not ok]
    lines = [f"## Targets: {len(results) - len(misses)} pass, {len(misses)} miss", ""]
    for r, text in misses:
        lines.append(f"- MISS {r.group} [{r.provider}]: {text}")
    return lines + [""]


def every_target(data: dict[str, Any], outcomes: dict[str, Any]) -> list[str]:
    """One line per benchmark target (``--bench-outcomes`` of benchmarks/conftest.py): its median, or the reason
    it has none (skipped for want of time or a GPU, failed, not reached)."""
    medians = {b.get("fullname"): (b.get("stats") or {}).get("median") for b in data.get("benchmarks", [])}
    cases = {k: v for k, v in (outcomes.get("cases") or {}).items() if v.get("target")}
    if not cases:
        return []
    measured = sum(1 for k in cases if medians.get(k) is not None)
    lines = [
        f"## Every target: {measured} of {len(cases)} measured",
        "",
        "| case | median or reason |",
        "| --- | --- |",
    ]
    for node, o in cases.items():
        median = medians.get(node)
        text = fmt_time(median) if median is not None else f"none: {o.get('reason') or o.get('outcome')}"
        lines.append(f"| {node.split('::', 1)[-1]} | {text} |")
    return lines + [""]


def render(data: dict[str, Any], rows: list[Row], outcomes: dict[str, Any] | None = None) -> str:
    evaluate_targets(rows)
    lines = header(data)
    lines += every_target(data, outcomes or {})
    lines += summary(rows)
    lines += ["## Results", ""] + table(rows) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------


def plot_speedups(rows: list[Row], path: Path) -> bool:
    """Horizontal bars: each provider's speedup over its group's baseline, one panel per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups = by_group(rows)
    panels: dict[str, list[tuple[str, list[tuple[str, float]]]]] = defaultdict(list)
    for group in sorted(groups, key=_group_order, reverse=True):  # barh draws bottom-up
        base = baseline(groups[group])
        if base is None:
            continue
        bars = [
            (r.provider, base.median / r.median)
            for r in sorted(groups[group], key=lambda r: r.provider)
            if r is not base
        ]
        if bars:
            op = str(groups[group][0].get("op") or group.split()[0])
            panels[op].append((f"{group}  (vs {base.provider})", bars[::-1]))
    if not panels:
        return False
    providers = sorted({p for entries in panels.values() for _, bars in entries for p, _ in bars})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    ops = sorted(panels)
    sizes = [sum(len(bars) for _, bars in panels[op]) + 2 for op in ops]
    fig, axes = plt.subplots(
        len(ops),
        1,
        figsize=(12, 0.17 * sum(sizes) + 1.2),
        gridspec_kw={"height_ratios": sizes},
        squeeze=False,
        layout="constrained",
    )
    for ax, op in zip(axes[:, 0], ops):
        y, ticks, labels = 0.0, [], []
        for label, bars in panels[op]:
            top = y + len(bars)
            for i, (p, s) in enumerate(bars):
                ax.barh(y + i + 0.5, s, height=0.9, color=colors[p])
                ax.text(s, y + i + 0.5, f" {s:.2f}×", va="center", fontsize=6)
            ticks.append((y + top) / 2)
            labels.append(label)
            y = top + 0.6
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_ylim(-0.3, y)
        ax.set_xscale("log")
        values = [s for _, bars in panels[op] for _, s in bars]
        ax.set_xlim(min(0.8, min(values) / 1.3), max(1.25, max(values) * 1.3))
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="x", which="major", alpha=0.3)
        ax.set_title(op, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("speedup over the case's baseline (log scale; > 1 is faster)")
    fig.legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in providers],
        labels=providers,
        loc="outside upper right",
        fontsize=8,
        ncol=min(len(providers), 6),
    )
    fig.suptitle("gptkernels benchmarks: speedup per case", x=0.02, ha="left")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_attention(rows: list[Row], path: Path) -> bool:
    att = [r for r in rows if r.get("op") == "attention" and r.get("tflops") is not None]
    if not att:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("fwd", "fwd+bwd") if any(r.get("mode") == m for r in att)]
    dims = sorted({r.get("head_dim") for r in att})
    providers = sorted({r.provider for r in att})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    fig, axes = plt.subplots(len(modes), len(dims), figsize=(5.5 * len(dims), 4 * len(modes)), squeeze=False)
    ceiling = next((r.get("ceiling_tflops") for r in att if r.get("ceiling_tflops")), None)
    for i, mode in enumerate(modes):
        for j, d in enumerate(dims):
            ax = axes[i][j]
            for p in providers:
                for dropout in sorted({r.get("dropout") for r in att}):
                    pts = sorted(
                        (r.get("seq_len"), r.get("tflops"))
                        for r in att
                        if r.provider == p
                        and r.get("mode") == mode
                        and r.get("head_dim") == d
                        and r.get("dropout") == dropout
                    )
                    if pts:
                        ax.plot(
                            [t for t, _ in pts],
                            [f for _, f in pts],
                            marker="o",
                            color=colors[p],
                            linestyle="-" if not dropout else "--",
                            label=f"{p}" + (f" dropout={dropout}" if dropout else ""),
                        )
            if ceiling:
                ax.axhline(ceiling, color="grey", linestyle=":", linewidth=1, label="bf16 matmul ceiling")
            ax.set_xscale("log", base=2)
            seq_lens = sorted({r.get("seq_len") for r in att})
            ax.set_xticks(seq_lens)
            ax.set_xticklabels([str(t) for t in seq_lens])
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("TFLOP/s (causal)")
            ax.set_title(f"attention {mode}, D={d}")
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Causal attention throughput, B=8 H=12 bf16 (dashed: dropout)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the JSON written by pytest --benchmark-json")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.md and the pictures")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target misses")
    parser.add_argument("--outcomes", type=Path, default=None, help="the --bench-outcomes JSON: list every target")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())
        outcomes = json.loads(args.outcomes.read_text()) if args.outcomes and args.outcomes.exists() else {}
    except (OSError, json.JSONDecodeError) as e:
        print(f"cannot read {args.results}: {e}", file=sys.stderr)
        return 2
    rows = load_rows(data)
    out = args.out if args.out is not None else args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    text = render(data, rows, outcomes)
    pictures = []
    if plot_speedups(rows, out / "speedup.png"):
        pictures.append("speedup.png")
    if plot_attention(rows, out / "attention_tflops.png"):
        pictures.append("attention_tflops.png")
    if pictures:
        text += "\n" + "\n".join(f"![{p}]({p})" for p in pictures) + "\n"
    (out / "report.md").write_text(text)
    print(text)
    print(f"wrote {out / 'report.md'}" + "".join(f", {out / p}" for p in pictures), file=sys.stderr)
    missed = any(not ok for r in rows for ok, _ in r.targets)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
