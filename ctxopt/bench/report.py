"""The results folder: its layout, per-sample CSVs, aggregate JSONs, and the report built from them.

Layout (the kvpress convention, one folder per configuration)::

    OUT/<task>-<length>/<method>-<budget>/predictions.csv   one row per sample
    OUT/<task>-<length>/<method>-<budget>/metrics.json      aggregates, command line, model, machine

``/`` in a task name becomes ``_`` in its folder name ("ruler/vt" -> "ruler_vt-4096"); the true names are
inside metrics.json. A method run without a budget ("full") has budget folder label "none".

This module imports only the standard library (matplotlib lazily, for plots), so a script running in
another virtual environment (benchmarks/peers/kvpress_run.py) can load it by file path and write the same
layout without importing ctxopt.
"""
from __future__ import annotations

import csv
import json
import math
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

BASELINE = "full"
PREDICTIONS = "predictions.csv"
METRICS = "metrics.json"

# Per-sample columns, in CSV order; the task's score keys (besides "score") are inserted after "score".
ID_COLUMNS = ["sample_id", "question", "answers", "prediction", "score"]
NUMERIC_COLUMNS = [
    "ttft_s", "decode_tokens_per_s", "e2e_s", "peak_memory_bytes", "kv_bytes", "prefill_kv_bytes",
    "tokens_in", "tokens_prefilled", "tokens_kept", "new_tokens",
]
TAIL_COLUMNS = ["error"]
# Columns aggregated as medians over samples, and those also given as a ratio to the baseline pair by pair.
MEDIAN_COLUMNS = NUMERIC_COLUMNS
RATIO_COLUMNS = ["ttft_s", "e2e_s", "decode_tokens_per_s", "peak_memory_bytes", "kv_bytes"]


# -- layout ---------------------------------------------------------------------------------------------
def budget_label(budget: int | float | None) -> str:
    """A budget as used in folder names: "512", "0.25", or "none" for a method run without one."""
    return "none" if budget is None else f"{budget:g}" if isinstance(budget, float) else str(budget)


def task_dir(out: str | Path, task: str, length: int) -> Path:
    """``OUT/<task>-<length>`` with "/" in the task name replaced by "_"."""
    return Path(out) / f"{task.replace('/', '_')}-{length}"


def config_dir(out: str | Path, task: str, length: int, method: str, budget: int | float | None) -> Path:
    """``OUT/<task>-<length>/<method>-<budget>``."""
    return task_dir(out, task, length) / f"{method}-{budget_label(budget)}"


# -- per-sample CSV -------------------------------------------------------------------------------------
def columns(score_keys: Iterable[str]) -> list[str]:
    """CSV columns for a task whose metrics.score returns ``score_keys``."""
    extra = sorted(k for k in score_keys if k != "score")
    return ID_COLUMNS + extra + NUMERIC_COLUMNS + TAIL_COLUMNS


def write_predictions(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows (dicts keyed by column; ``answers`` a list) as CSV; missing values are left empty."""
    score_keys = {k for row in rows for k in row if k not in ID_COLUMNS + NUMERIC_COLUMNS + TAIL_COLUMNS}
    header = columns(score_keys)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for row in rows:
            record = {k: ("" if row.get(k) is None else row[k]) for k in header}
            record["answers"] = json.dumps(list(row.get("answers") or []), ensure_ascii=False)
            writer.writerow(record)


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read a predictions.csv back: numbers as floats, ``answers`` as a list, empty cells as None."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value == "":
                    row[key] = None
                elif key == "answers":
                    row[key] = json.loads(value)
                elif key in ("sample_id", "question", "prediction", "error"):
                    row[key] = value
                else:
                    row[key] = float(value)
            rows.append(row)
    return rows


# -- aggregates -----------------------------------------------------------------------------------------
def _median(values: Iterable[Any]) -> float | None:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.median(kept) if kept else None


def paired_ratio(rows: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]], column: str) -> float | None:
    """Median over samples of ``row[column] / baseline_row[column]``, pairing rows by sample id.

    Samples missing from either side, with an error, or with a zero or missing baseline value are skipped.
    """
    base = {r["sample_id"]: r.get(column) for r in baseline if not r.get("error")}
    ratios = [
        float(r[column]) / float(base[r["sample_id"]])
        for r in rows
        if not r.get("error") and r.get(column) is not None and base.get(r["sample_id"])
    ]
    return statistics.median(ratios) if ratios else None


def bootstrap_interval(differences: Sequence[float], draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``differences`` under resampling with replacement (seeded)."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(differences, k=len(differences))) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def paired_difference(
    rows: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]] | None, column: str = "score"
) -> dict[str, Any] | None:
    """The mean per-sample difference ``row[column] - baseline_row[column]`` over the samples both ran (paired
    by sample id; an errored row scores 0 as in ``aggregate``), with its 95% paired bootstrap interval."""
    if not baseline:
        return None
    base = {r["sample_id"]: float(r.get(column) or 0.0) for r in baseline}
    differences = [float(r.get(column) or 0.0) - base[r["sample_id"]] for r in rows if r["sample_id"] in base]
    if not differences:
        return None
    low, high = bootstrap_interval(differences)
    return {"mean": statistics.fmean(differences), "low": low, "high": high, "n": len(differences)}


def aggregate(rows: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """Aggregates of one configuration's rows.

    Steps: mean of every score column over all samples (a sample that errored scores 0); median of every
    numeric column over the samples that ran; pair-by-pair ratios to ``baseline`` rows (None without one).
    """
    ok = [r for r in rows if not r.get("error")]
    score_keys = sorted({k for r in ok for k in r if k not in ID_COLUMNS + NUMERIC_COLUMNS + TAIL_COLUMNS} | {"score"})
    scores = {k: (sum(float(r.get(k) or 0.0) for r in rows) / len(rows) if rows else None) for k in score_keys}
    return {
        "n": len(rows),
        "n_errors": len(rows) - len(ok),
        "accuracy": scores["score"],
        "scores": scores,
        "medians": {c: _median(r.get(c) for r in ok) for c in MEDIAN_COLUMNS},
        "peak_memory_bytes_max": max((r["peak_memory_bytes"] for r in ok if r.get("peak_memory_bytes")), default=None),
        "ratios_to_full": paired_ratios(rows, baseline),
        "score_vs_full": paired_difference(rows, baseline),
    }


def paired_ratios(
    rows: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]] | None
) -> dict[str, Any] | None:
    """``paired_ratio`` for every column of RATIO_COLUMNS; None without baseline rows."""
    return None if baseline is None else {c: paired_ratio(rows, baseline, c) for c in RATIO_COLUMNS}


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> None:
    """Write metrics.json (written last: its presence marks the configuration as done)."""
    Path(path).write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def write_config(folder: Path, rows: Sequence[Mapping[str, Any]], baseline_rows: Sequence[Mapping[str, Any]] | None,
                 info: Mapping[str, Any]) -> dict[str, Any]:
    """Write one configuration: predictions.csv, then metrics.json = ``info`` + the aggregates. Returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_predictions(folder / PREDICTIONS, rows)
    metrics = {**info, **aggregate(rows, baseline_rows)}
    write_metrics(folder / METRICS, metrics)
    return metrics


def baseline_rows(out: str | Path, task: str, length: int, method: str = BASELINE) -> list[dict[str, Any]] | None:
    """The rows of the baseline configuration ("full", no budget) of a task and length, if it has run."""
    path = config_dir(out, task, length, method, None) / PREDICTIONS
    return read_predictions(path) if path.exists() else None


# -- report ---------------------------------------------------------------------------------------------
def load_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every ``*/*/metrics.json`` under ``folder``, sorted by task, length, method, budget.

    Ratios to the baseline are paired again from the predictions on disk, so a configuration run before its
    baseline (or a baseline copied in from another run of the same samples) still gets them; the baseline is
    ``metrics["baseline"]`` where a runner recorded one (kvpress rows: "kvpress-full"), else "full".
    """
    results, baselines = [], {}
    for path in Path(folder).glob(f"*/*/{METRICS}"):
        metrics = json.loads(path.read_text(encoding="utf-8"))
        base = config_dir(folder, metrics["task"], metrics["length"], metrics.get("baseline", BASELINE), None)
        if base not in baselines:  # read each baseline once, not once per configuration
            baselines[base] = read_predictions(base / PREDICTIONS) if (base / PREDICTIONS).exists() else None
        if baselines[base] is not None and (path.parent / PREDICTIONS).exists():
            predictions = read_predictions(path.parent / PREDICTIONS)
            metrics["ratios_to_full"] = paired_ratios(predictions, baselines[base])
            metrics["score_vs_full"] = paired_difference(predictions, baselines[base])
        results.append(metrics)

    def key(m: Mapping[str, Any]) -> tuple:
        budget = m.get("budget")
        return (m["task"], m["length"], m["method"] != BASELINE, m["method"], -1 if budget is None else budget)

    return sorted(results, key=key)


HEADER = ["task", "length", "method", "budget", "n", "err", "acc %", "TTFT s", "TTFT/full", "decode tok/s",
          "peak MB", "KV MB", "prefill KV MB", "acc - full [95% CI]", "kept/in tokens"]


def _number(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _difference(paired: Mapping[str, Any] | None) -> str:
    """"+1.2[-3.4,+5.6]": the paired score difference to full context and its interval, in points (no spaces,
    so the plain table still splits on whitespace)."""
    if not paired:
        return "-"
    return f"{100 * paired['mean']:+.1f}[{100 * paired['low']:+.1f},{100 * paired['high']:+.1f}]"


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def table_rows(results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One list of cell strings per configuration, in HEADER order."""
    rows = []
    for m in results:
        med, ratios = m["medians"], m.get("ratios_to_full") or {}
        kept, total = med.get("tokens_kept"), med.get("tokens_in")
        rows.append([
            m["task"], str(m["length"]), m["method"], budget_label(m.get("budget")), str(m["n"]), str(m["n_errors"]),
            _number(None if m["accuracy"] is None else 100 * m["accuracy"], 1),
            _number(med.get("ttft_s"), 3), _number(ratios.get("ttft_s"), 2),
            _number(med.get("decode_tokens_per_s"), 1), _mb(m.get("peak_memory_bytes_max")),
            _mb(med.get("kv_bytes")), _mb(med.get("prefill_kv_bytes")), _difference(m.get("score_vs_full")),
            "-" if kept is None or total is None else f"{kept:.0f}/{total:.0f}",
        ])
    return rows


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table with aligned columns."""
    rows = [HEADER] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The same table in GitHub markdown, for benchmarks/RESULTS.md."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def describe_run(results: Sequence[Mapping[str, Any]]) -> str:
    """One line per distinct (model, device, dtype, machine) the results came from."""
    seen = []
    for m in results:
        machine = m.get("machine") or {}
        line = (f"model {m.get('model')}, {machine.get('device')} {machine.get('dtype')}, "
                f"{machine.get('cpu_count')} CPUs, {machine.get('gpu') or 'no GPU'}, torch {machine.get('torch')}, "
                f"transformers {machine.get('transformers')}, repeats {m.get('repeats')}, seed {m.get('seed')}")
        if line not in seen:
            seen.append(line)
    return "\n".join(seen)


def save_plots(results: Sequence[Mapping[str, Any]], folder: Path) -> list[Path]:
    """PNG plots under ``folder``: accuracy vs budget per task, TTFT vs length per task (one line per method).

    Methods without a budget (the baseline) are drawn as dashed horizontal lines on the accuracy plot.
    Raises ImportError when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({m["task"] for m in results}):
        mine = [m for m in results if m["task"] == task and m["accuracy"] is not None]
        lengths = sorted({m["length"] for m in mine})
        fig, ax = plt.subplots(figsize=(6, 4))
        for length in lengths:
            suffix = f" @{length}" if len(lengths) > 1 else ""
            for method in sorted({m["method"] for m in mine if m["length"] == length}):
                points = sorted((m["budget"], 100 * m["accuracy"]) for m in mine
                                if m["length"] == length and m["method"] == method and m.get("budget") is not None)
                flat = [100 * m["accuracy"] for m in mine
                        if m["length"] == length and m["method"] == method and m.get("budget") is None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=method + suffix)
                for value in flat:
                    ax.axhline(value, linestyle="--", color="grey", label=method + suffix)
        ax.set(title=f"{task}: accuracy vs budget", xlabel="budget (tokens)", ylabel="accuracy %", ylim=(-5, 105))
        ax.legend(fontsize="small")
        written.append(_save(fig, folder / f"accuracy-{task.replace('/', '_')}.png"))

        timed = [m for m in results if m["task"] == task and m["medians"].get("ttft_s") is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in sorted({(m["method"], budget_label(m.get("budget"))) for m in timed}):
            points = sorted((m["length"], m["medians"]["ttft_s"]) for m in timed
                            if (m["method"], budget_label(m.get("budget"))) == label)
            ax.plot(*zip(*points), marker="o", label="-".join(label))
        ax.set(title=f"{task}: TTFT vs context length", xlabel="context length (tokens)", ylabel="TTFT median (s)")
        ax.legend(fontsize="small")
        written.append(_save(fig, folder / f"ttft-{task.replace('/', '_')}.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def report(folder: str | Path, plots: bool = True) -> str:
    """Steps: load every metrics.json under ``folder``; write ``folder/report.md``; save plots under
    ``folder/plots`` (a note instead when matplotlib is missing). Returns the text to print."""
    folder = Path(folder)
    results = load_results(folder)
    if not results:
        raise FileNotFoundError(f"no */*/{METRICS} under {folder}: run `ctxopt bench ... --out {folder}` first")
    text = format_table(results)
    source = describe_run(results)
    (folder / "report.md").write_text(f"{source}\n\n{markdown_table(results)}\n", encoding="utf-8")
    lines = [text, "", source, f"markdown table: {folder / 'report.md'}"]
    if plots:
        try:
            written = save_plots(results, folder / "plots")
        except ImportError:
            lines.append("plots need matplotlib: pip install matplotlib")
        else:
            lines.append("plots: " + ", ".join(str(p) for p in written))
    return "\n".join(lines)
