"""A small benchmark: every method answers the same questions over the same corpus, given whole as context;
prints, per method, the answers correct, prompt tokens, KV positions, TTFT and its ratio to full context's,
says why where a method is slower than full context or loses an answer, and plots accuracy and TTFT.

    python examples/compare_methods.py                                   # the bundled demo corpus and questions
    python examples/compare_methods.py --methods full,gemfilter,snapkv --budget 256 --plot /tmp/methods.png
    python examples/compare_methods.py my_docs/ --questions my_questions.json

A questions file is a JSON list of {"question": ..., "answers": [...]}; an answer counts as correct when it
contains one of the gold answers (normalised). The bundled corpus is ~700 tokens: short enough that on a CPU
only the methods that prefill fewer tokens without a pass over the whole prompt (truncate, rag) can answer
sooner than full context; the table's notes say which and why. For long contexts see long_document_qa.py;
for full benchmarks (RULER, HotpotQA, needle), ``ctxopt bench``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path

from ctxopt.bench.compare import MethodRow, method_notes, method_row, method_table
from ctxopt.cli import parse_budget
from ctxopt.methods import budget_for, build_stages
from ctxopt.models import LoadedModel
from ctxopt.models.registry import EXAMPLE_MODEL
from ctxopt.pipeline import Pipeline
from ctxopt.retrievers import iter_corpus
from ctxopt.types import Passage

DEMO = resources.files("ctxopt") / "data" / "demo"
DEFAULT_METHODS = "full,truncate,rag,extractive,gemfilter,snapkv"
DEFAULT_BUDGET = "384"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="corpus folder (default: the bundled demo corpus)")
    parser.add_argument("--questions", help="JSON questions file (default: the demo questions)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated")
    parser.add_argument("--budget", default=DEFAULT_BUDGET, help="tokens (384) or a ratio (0.5), each method but full")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--plot", default=str(Path(tempfile.gettempdir()) / "ctxopt-examples" / "compare_methods.png"),
                        help="where to save the plot ('' for none; default: the system's temporary folder)")
    parser.add_argument("--model", default=EXAMPLE_MODEL, help="registry name, model folder or .gguf file")
    return parser.parse_args(argv)


def load_inputs(args: argparse.Namespace) -> tuple[list[Passage], list[dict]]:
    """The corpus as one passage per document, and the questions with their gold answers."""
    if args.folder and not args.questions:
        sys.exit("give --questions for your own folder")
    with resources.as_file(DEMO / "corpus") as demo:
        corpus = iter_corpus(args.folder or demo)
        documents = [Passage("".join(text for _, text in d.pieces), source=d.source) for d in corpus]
    source = Path(args.questions) if args.questions else DEMO / "questions.json"
    return documents, json.loads(source.read_text(encoding="utf-8"))


def plot(rows: list[MethodRow], path: str) -> None:
    """Accuracy and median TTFT by method, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib); no plot")
        return
    names = [r.method for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [sum(r.correct) / len(r.correct) for r in rows])
    left.set(title="accuracy", ylim=(0, 1))
    right.bar(names, [r.ttft for r in rows])
    right.set(title="median TTFT (s)")
    for axes in (left, right):
        axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot saved to {path}")


def main(argv: list[str] | None = None, lm: LoadedModel | None = None) -> int:
    args = parse_args(argv)
    documents, items = load_inputs(args)
    budget = parse_budget(args.budget)
    model = lm or args.model
    golds = [item["answers"] for item in items]
    rows = []
    for method in args.methods.split(","):
        stages = build_stages(method, budget_for(method, budget))
        pipe = Pipeline(model, stages=stages, max_new_tokens=args.max_new_tokens)
        answers = [pipe.ask(item["question"], context=documents) for item in items]
        rows.append(method_row(method, answers, golds))
        print(f"{method}: {[a.text[:40] for a in answers]}")
    print(f"\nmodel {pipe.lm.name}, {len(items)} questions over {len(documents)} documents, budget {args.budget} "
          "for each method but full (medians over questions):\n" + method_table(rows))
    for note in method_notes(rows):
        print("- " + note)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
