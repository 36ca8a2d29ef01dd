"""A small benchmark: every method answers the same questions over the same corpus, given whole as context;
prints accuracy, prompt tokens and TTFT by method and plots accuracy and TTFT (with matplotlib).

    python examples/compare_methods.py                                   # the bundled demo corpus and questions
    python examples/compare_methods.py --methods full,gemfilter,snapkv --budget 256 --plot methods.png
    python examples/compare_methods.py my_docs/ --questions my_questions.json

A questions file is a JSON list of {"question": ..., "answers": [...]}; an answer counts as correct when it
contains one of the gold answers (normalised). For full benchmarks (RULER, HotpotQA, needle), use
``ctxopt bench``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from importlib import resources
from pathlib import Path

from ctxopt.bench.metrics import normalize_answer
from ctxopt.cli import parse_budget
from ctxopt.methods import build_stages
from ctxopt.models import LoadedModel
from ctxopt.pipeline import Pipeline
from ctxopt.retrievers import iter_corpus
from ctxopt.types import Answer, Passage

DEMO = resources.files("ctxopt") / "data" / "demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="corpus folder (default: the bundled demo corpus)")
    parser.add_argument("--questions", help="JSON questions file (default: the demo questions)")
    parser.add_argument("--methods", default="full,truncate,rag,gemfilter,snapkv,speckv", help="comma-separated")
    parser.add_argument("--budget", default="256", help="tokens (256) or a ratio (0.5) for each method but full")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--plot", default="compare_methods.png", help="where to save the plot ('' for none)")
    parser.add_argument("--model", default="smollm2-135m", help="registry name, model folder or .gguf file")
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


def kv_positions(answer: Answer) -> int:
    """Cache positions the decoder started from: the output of the last stage before decoding."""
    return [r for r in answer.stats.stages if not r.stage.startswith("decode")][-1].tokens_out


def contains(text: str, answers: list[str]) -> bool:
    return any(normalize_answer(gold) in normalize_answer(text) for gold in answers)


def plot(rows: list[dict], path: str) -> None:
    """Accuracy and median TTFT by method, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib); no plot")
        return
    names = [r["method"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [r["accuracy"] for r in rows])
    left.set(title="accuracy", ylim=(0, 1))
    right.bar(names, [r["ttft"] for r in rows])
    right.set(title="median TTFT (s)")
    for axes in (left, right):
        axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot saved to {path}")


def main(argv: list[str] | None = None, lm: LoadedModel | None = None) -> int:
    args = parse_args(argv)
    documents, items = load_inputs(args)
    budget = parse_budget(args.budget)
    model = lm or args.model
    rows = []
    for method in args.methods.split(","):
        pipe = Pipeline(model, stages=build_stages(method, budget), max_new_tokens=args.max_new_tokens)
        answers = [pipe.ask(item["question"], context=documents) for item in items]
        correct = [contains(a.text, item["answers"]) for a, item in zip(answers, items)]
        row = {
            "method": method,
            "accuracy": sum(correct) / len(items),
            "tokens": statistics.median(len(a.prompt) for a in answers),
            "kv": statistics.median(kv_positions(a) for a in answers),
            "ttft": statistics.median(a.stats.ttft_seconds for a in answers),
        }
        rows.append(row)
        print(f"{method:10s} accuracy {row['accuracy']:.2f}  prompt tokens {row['tokens']:6.0f}  KV positions "
              f"{row['kv']:6.0f}  TTFT {row['ttft']:.2f}s  answers {[a.text[:40] for a in answers]}")
    baseline = next((r for r in rows if r["method"] == "full"), None)
    if baseline:
        for row in rows:
            if row is not baseline:
                print(f"{row['method']} saved {baseline['tokens'] - row['tokens']:.0f} prompt tokens and "
                      f"{baseline['kv'] - row['kv']:.0f} KV positions per question; TTFT {row['ttft']:.2f}s vs "
                      f"{baseline['ttft']:.2f}s, accuracy {row['accuracy']:.2f} vs {baseline['accuracy']:.2f} "
                      "with full context")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
