"""Pool pages of ``color_eval.py`` answer runs and compare methods question by question.

Each ``--run LABEL=FILE[,FILE...]:METHOD`` names one row: the method's rows from each file (pages of questions,
e.g. ``--offset 0`` and ``--offset 20``), pooled. Rows are paired by question id with ``--reference``'s; the
difference in mean F1 gets a 95% paired bootstrap interval (questions resampled with replacement, seeded).

    E=runs/color-eval; python benchmarks/color_pool.py --reference untrained \\
        --run untrained=$E/answer-20-base-qwen05.json,$E/answer-20o20-base-qwen05.json:color-untrained \\
        --run trained=$E/answer-20-trained.json,$E/answer-20o20-trained.json:color
"""
from __future__ import annotations

import argparse
import json
import statistics

from ctxopt.bench.report import bootstrap_interval


def pooled_rows(spec: str) -> tuple[str, dict[str, dict]]:
    """LABEL=FILE[,FILE...]:METHOD -> (label, rows by question id)."""
    label, rest = spec.split("=", 1)
    files, method = rest.rsplit(":", 1)
    rows = {}
    for path in files.split(","):
        with open(path, encoding="utf-8") as handle:
            for row in json.load(handle)["results"][method]["rows"]:
                rows[row["id"]] = row
    return label, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="LABEL=FILE[,FILE...]:METHOD")
    parser.add_argument("--reference", required=True, help="the label the others are paired with")
    args = parser.parse_args()
    runs = dict(pooled_rows(spec) for spec in args.run)
    if args.reference not in runs:
        parser.error(f"--reference {args.reference!r} is not one of the labels {sorted(runs)}")
    reference = runs[args.reference]
    print("| row | questions | ratio | F1 | EM | in-context retrieval | F1 - reference (95% CI) |")
    print("|---|---|---|---|---|---|---|")
    for label, rows in runs.items():
        shared = [q for q in rows if q in reference]
        if len(shared) != len(rows) or len(shared) != len(reference):
            parser.error(f"{label} and {args.reference} cover different questions")

        def mean(key: str) -> float:
            return statistics.mean(rows[q][key] for q in shared)

        ratio = sum(rows[q]["tokens_in"] for q in shared) / sum(rows[q]["tokens_out"] for q in shared)
        cell = "-"
        if label != args.reference:
            differences = [rows[q]["f1"] - reference[q]["f1"] for q in shared]
            low, high = bootstrap_interval(differences)
            cell = f"{statistics.mean(differences):+.3f} ({low:+.3f}, {high:+.3f})"
        print(f"| {label} | {len(shared)} | {ratio:.2f}x | {mean('f1'):.3f} | {mean('em'):.2f} | "
              f"{mean('retrieval_hit'):.2f} | {cell} |")


if __name__ == "__main__":
    main()
