"""The results page's tables and plots, generated from one data file, so that page and data cannot drift.

benchmarks/results/best.csv holds one row per measured configuration, read off benchmarks/JOURNAL.md: the
rows with role ``best`` are each method's current best rows (the tables of benchmarks/RESULTS.md), the rows
with role ``curve`` are further budgets of the same runs, drawn in the plots only. Every row names its
journal section, its command, its sample count and its device.

    python benchmarks/plot_results.py                 # writes benchmarks/plots/*.png
    python benchmarks/plot_results.py --tables        # prints the page's generated blocks (markdown)
    python benchmarks/plot_results.py --update-page   # rewrites those blocks inside benchmarks/RESULTS.md
    python benchmarks/plot_results.py --check         # exits 1 when the page's blocks differ from the data
    python benchmarks/plot_results.py --out DIR       # the PNGs into DIR instead

Only the standard library and matplotlib (Agg backend); the plots are written only when asked for them or
when no table option is given.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSV_PATH = HERE / "results" / "best.csv"
PAGE_PATH = HERE / "RESULTS.md"
PLOTS_DIR = HERE / "plots"
JOURNAL = "JOURNAL.md"  # links are relative to the page

# method key (the CSV's `method`, the CLI's --method) -> its section heading on the page, in page order
METHODS = OrderedDict([
    ("full", "Full context"),
    ("truncate", "Truncation"),
    ("rag", "RAG"),
    ("snapkv", "SnapKV"),
    ("gemfilter", "GemFilter"),
    ("specpc", "SpecPC"),
    ("speckv", "SpecKV"),
    ("speckv-pc", "SpecKV-PC"),
    ("rapid", "RAPID"),
    ("refrag", "REFRAG"),
    ("color", "CoLoR"),
    ("extractive", "Extractive"),
])
MAIN_TASKS = ("ruler/niah_single_2", "ruler/qa_1", "hotpotqa")
MIN_FULL_ACC = 10.0  # a task the model cannot do with full context says nothing about what a method keeps
FIELDS = ["method", "setting", "role", "task", "length", "model", "helper", "budget", "n", "metric", "acc",
          "acc_full", "kept_tokens", "in_tokens", "compression", "ttft_ratio", "ttft_s", "kv_mb", "kv_full_mb",
          "decode_speedup", "device", "date", "section", "command", "note"]
DEVICES = {"cpu": "CPU", "h200": "H200, random weights"}
COLORS = {"full": "#000000", "truncate": "#7f7f7f", "rag": "#8c564b", "snapkv": "#1f77b4", "gemfilter": "#ff7f0e",
          "specpc": "#2ca02c", "speckv": "#d62728", "speckv-pc": "#9467bd", "rapid": "#e377c2", "refrag": "#17becf",
          "color": "#bcbd22", "extractive": "#393b79"}


# ---------------------------------------------------------------------------------------------- data

def load_rows(path: Path = CSV_PATH) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != FIELDS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {FIELDS}")
        rows = list(reader)
    for i, row in enumerate(rows, start=2):
        if row["method"] not in METHODS:
            raise ValueError(f"{path}:{i}: unknown method {row['method']!r}")
        if row["role"] not in ("best", "curve"):
            raise ValueError(f"{path}:{i}: role must be best or curve, not {row['role']!r}")
        if row["device"] not in DEVICES:
            raise ValueError(f"{path}:{i}: device must be one of {sorted(DEVICES)}, not {row['device']!r}")
    return rows


def num(row: dict, key: str) -> float | None:
    value = row.get(key, "").strip()
    return float(value) if value else None


def compression(row: dict) -> float | None:
    """Prompt (or context) tokens in / positions kept; the recorded ratio where no counts were; else in / budget."""
    kept, total = num(row, "kept_tokens"), num(row, "in_tokens")
    if kept and total:
        return total / kept
    if num(row, "compression"):
        return num(row, "compression")
    budget = num(row, "budget")
    if total and budget and budget > 1:
        return total / budget
    return None


def kv_ratio(row: dict) -> float | None:
    kv, full = num(row, "kv_mb"), num(row, "kv_full_mb")
    return kv / full if kv and full else None


def relative_accuracy(row: dict) -> float | None:
    acc, full = num(row, "acc"), num(row, "acc_full")
    if row["metric"] not in ("match", "f1") or acc is None or full is None or full < MIN_FULL_ACC:
        return None
    return acc / full


def context_tokens(row: dict) -> float | None:
    return num(row, "in_tokens") or num(row, "length")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# -------------------------------------------------------------------------------------------- tables

def _g(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


def _length(row: dict) -> str:
    n = num(row, "length")
    if not n or row["task"] == "hotpotqa":
        return ""
    return f"{n / 1024:g}K" if n >= 1024 else f"{n:g}"


def _task(row: dict) -> str:
    task = row["task"].removeprefix("ruler/")
    length = _length(row)
    return f"{task} {length}" if length else task


def _acc(row: dict) -> str:
    acc, full = num(row, "acc"), num(row, "acc_full")
    if row["metric"] == "none" or acc is None:
        return "speed only"
    if row["metric"] == "gap":
        return f"{_g(acc)}% of gap"
    prefix = "F1 " if row["metric"] == "f1" else ""
    return f"{prefix}{_g(acc)} ({_g(full)})" if full is not None else f"{prefix}{_g(acc)}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def _compression(row: dict) -> str:
    c = compression(row)
    if c is None:
        return "–"
    return f"{c:.0f}x" if c >= 10 else f"{c:.1f}x"


def _kv(row: dict) -> str:
    r = kv_ratio(row)
    if r is None:
        return "–"
    return f"{r:.2f}" if r >= 0.5 else f"1/{1 / r:.0f}"


def _decode(row: dict) -> str:
    d = num(row, "decode_speedup")
    return "–" if d is None else f"{d:.2f}x"


def _budget(row: dict) -> str:
    parts = [p for p in (row["budget"], row["setting"]) if p]
    return ", ".join(parts) if parts else "–"


def _model(row: dict) -> str:
    return f"{row['model']} + {row['helper']}" if row["helper"] else row["model"]


def command_ids(rows: list[dict]) -> dict[str, str]:
    """c1, c2, ... for each distinct command of the page's rows, in page order."""
    ids: dict[str, str] = {}
    for method in METHODS:
        for row in rows:
            if row["method"] == method and row["role"] == "best" and row["command"] not in ids:
                ids[row["command"]] = f"c{len(ids) + 1}"
    return ids


HEADER = ("| task | model | budget | n | acc (full) | compression | TTFT/full | KV/full | decode | device | run "
          "| note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def method_table(rows: list[dict], method: str, ids: dict[str, str] | None = None) -> str:
    ids = ids if ids is not None else command_ids(rows)
    lines = [HEADER]
    for row in rows:
        if row["method"] != method or row["role"] != "best":
            continue
        run = f"[{row['date']}]({JOURNAL}#{slug(row['section'])}) {ids[row['command']]}"
        cells = [_task(row), _model(row), _budget(row), row["n"], _acc(row), _compression(row),
                 _ratio(num(row, "ttft_ratio")), _kv(row), _decode(row), DEVICES[row["device"]], run, row["note"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def commands_block(rows: list[dict]) -> str:
    return "\n".join(f"- {cid}: `{cmd}`" for cmd, cid in command_ids(rows).items())


def generated_blocks(rows: list[dict]) -> "OrderedDict[str, str]":
    """Every block of the page that the data writes: one table per method, then the command list."""
    ids = command_ids(rows)
    blocks: OrderedDict[str, str] = OrderedDict((m, method_table(rows, m, ids)) for m in METHODS)
    blocks["commands"] = commands_block(rows)
    return blocks


BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)\n?<!-- /generated -->", re.S)


def page_blocks(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}


def update_page(text: str, blocks: dict[str, str]) -> str:
    missing = set(blocks) - set(page_blocks(text))
    if missing:
        raise ValueError(f"the page has no generated block for {sorted(missing)}")
    return BLOCK.sub(lambda m: m.group(1) + blocks[m.group("name")] + "\n<!-- /generated -->", text)


def print_tables(rows: list[dict]) -> str:
    out = []
    for name, body in generated_blocks(rows).items():
        title = METHODS.get(name, "Commands")
        out.append(f"## {title}\n\n<!-- generated:{name} -->\n{body}\n<!-- /generated -->\n")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _offset(method: str) -> float:
    """-1 .. 1 by the method's place on the page: a small shift that keeps coinciding series apart."""
    if method == "full":
        return 0.0
    keys = list(METHODS)[1:]
    return 2 * keys.index(method) / (len(keys) - 1) - 1


def _log2_axis(axis, unit: str) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    axis.axes.set_xscale("log", base=2)
    axis.set_minor_locator(NullLocator())
    if unit == "tokens":
        axis.set_major_locator(FixedLocator([2 ** k for k in range(10, 18)]))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}K"))
    else:
        axis.set_major_locator(FixedLocator([2 ** k for k in range(0, 8)]))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))


MODEL_MARKERS = {"Qwen2.5-Coder-1.5B": "o", "SmolLM2-135M": "s", "Qwen2.5-Coder-0.5B": "^"}


def accuracy_vs_compression(rows: list[dict], path: Path) -> Path:
    """Accuracy relative to full context on the same samples against compression, one facet per main task."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    facets: OrderedDict[tuple, list[dict]] = OrderedDict()
    for task in MAIN_TASKS:
        pts = [r for r in rows if r["task"] == task and relative_accuracy(r) is not None and compression(r)]
        for length in sorted({_length(r) for r in pts}, key=lambda s: float(s[:-1] or 0) if s else 0):
            facets[(task, length)] = [r for r in pts if _length(r) == length]
    ncols = min(3, len(facets)) or 1
    nrows = max(1, math.ceil(len(facets) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    used_methods, used_models = [], []
    for ax, ((task, length), pts) in zip(axes.flat, facets.items()):
        series: OrderedDict[tuple, list[dict]] = OrderedDict()
        for r in pts:
            series.setdefault((r["method"], r["setting"], r["model"], r["helper"]), []).append(r)
        for (method, setting, model, _), rs in series.items():
            rs.sort(key=compression)
            lift = _offset(method) * 0.08  # methods that score alike would hide each other's lines
            xs, ys = [compression(r) for r in rs], [relative_accuracy(r) + lift for r in rs]
            ax.plot(xs, ys, color=COLORS[method], marker=MODEL_MARKERS.get(model, "D"), markersize=5,
                    linestyle="--" if setting else "-", linewidth=1.0, alpha=0.9)
            if setting:
                ax.annotate(setting, (xs[-1], ys[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            used_methods += [method] if method not in used_methods else []
            used_models += [model] if model not in used_models else []
        ns = sorted({int(num(r, "n")) for r in pts})
        n_text = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]}"
        name = task.removeprefix("ruler/") + (f", {length}" if length else "")
        ax.set_title(f"{name} ({n_text} per point)", fontsize=10)
        ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle=":")
        _log2_axis(ax.xaxis, "x")
        ax.set_ylim(-0.15, 1.45)
        ax.set_xlabel("compression (prompt tokens / kept)")
        ax.set_ylabel("accuracy / full context's")
        ax.grid(True, which="major", alpha=0.3)
    spare = list(axes.flat)[len(facets):]
    for ax in spare:
        ax.axis("off")
    handles = [Line2D([], [], color=COLORS[m], linewidth=2, label=METHODS[m]) for m in METHODS if m in used_methods]
    handles += [Line2D([], [], color="#444444", marker=MODEL_MARKERS.get(m, "D"), linestyle="", label=m)
                for m in used_models]
    handles.append(Line2D([], [], color="#444444", linestyle="--", label="variant (labelled)"))
    if spare:
        spare[0].legend(handles=handles, loc="center", fontsize=8, frameon=False, ncol=2)
    else:
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Accuracy kept against compression on the same samples, CPU runs (1-60 samples per point: "
                 "indicative only; lines offset slightly so that equal ones stay visible)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 if spare else 0.84, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ttft_vs_length(rows: list[dict], path: Path) -> Path:
    """TTFT as a fraction of full context's against context length; CPU hollow circles, H200 filled squares."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    pts = [r for r in rows if r["method"] != "full" and num(r, "ttft_ratio") and context_tokens(r)]
    fig, ax = plt.subplots(figsize=(9.5, 5.6))
    used = []
    series: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in pts:
        series.setdefault((r["method"], r["setting"], r["device"]), []).append(r)
    for (method, setting, device), rs in series.items():
        rs.sort(key=context_tokens)
        color = COLORS[method]
        if device == "h200":
            xs, ys = [context_tokens(r) for r in rs], [num(r, "ttft_ratio") for r in rs]
            ax.plot(xs, ys, color=color, marker="D", markersize=5, linestyle="--" if setting else "-", linewidth=1.3)
            if setting:
                ax.annotate(setting, (xs[-1], ys[-1]), fontsize=7, xytext=(4, -3), textcoords="offset points")
        else:  # each method a little apart along x, so that the CPU rows of one length do not pile up
            for r in rs:
                x = context_tokens(r) * 2 ** (_offset(method) * 0.16)
                ax.scatter([x], [num(r, "ttft_ratio")], facecolors="none", edgecolors=color,
                           marker=MODEL_MARKERS.get(r["model"], "D"), s=30, linewidths=1.2)
        used += [method] if method not in used else []
    ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle=":")
    _log2_axis(ax.xaxis, "tokens")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("context length (prompt tokens)")
    ax.set_ylabel("TTFT / full context's TTFT")
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=COLORS[m], linewidth=2, label=METHODS[m]) for m in METHODS if m in used]
    handles += [Line2D([], [], color="#444444", marker=MODEL_MARKERS[m], markerfacecolor="none", linestyle="",
                       label=f"CPU, {m}") for m in MODEL_MARKERS]
    handles += [Line2D([], [], color="#444444", marker="D", linestyle="-",
                       label="H200, Llama-3.1-8B shapes (random weights)"),
                Line2D([], [], color="#444444", linestyle="--", label="variant (labelled)")]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.06, 0.5), fontsize=8, frameon=False)
    ax.set_title("Time to first token relative to full context (below 1 = faster)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(rows: list[dict], out: Path = PLOTS_DIR) -> list[Path]:
    return [accuracy_vs_compression(rows, out / "accuracy_vs_compression.png"),
            ttft_vs_length(rows, out / "ttft_vs_length.png")]


# ----------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=CSV_PATH)
    parser.add_argument("--page", type=Path, default=PAGE_PATH)
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default benchmarks/plots)")
    parser.add_argument("--tables", action="store_true", help="print the page's generated blocks")
    parser.add_argument("--update-page", action="store_true", help="rewrite the generated blocks of the page")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page's blocks differ from the data")
    args = parser.parse_args(argv)
    rows = load_rows(args.csv)
    if args.tables:
        print(print_tables(rows))
    if args.update_page:
        args.page.write_text(update_page(args.page.read_text(), generated_blocks(rows)))
    if args.check:
        stale = [n for n, b in generated_blocks(rows).items() if page_blocks(args.page.read_text()).get(n) != b]
        if stale:
            print(f"{args.page}: blocks differ from {args.csv}: {', '.join(stale)} "
                  "(run benchmarks/plot_results.py --update-page)", file=sys.stderr)
            return 1
    if args.out is not None or not (args.tables or args.update_page or args.check):
        for p in write_plots(rows, args.out or PLOTS_DIR):
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
