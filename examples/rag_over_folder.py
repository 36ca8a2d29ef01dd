"""RAG over a folder: index it, ask questions, and compare with putting the whole folder in the prompt.

    python examples/rag_over_folder.py                                  # the bundled demo corpus and its questions
    python examples/rag_over_folder.py my_docs/ -q "Who founded the town?" -k 3
    python examples/rag_over_folder.py --method extractive --budget 0.5 # compress the retrieved passages too

Prints each answer with its sources, then per row (retrieval, the whole folder) the answers correct, prompt
tokens, TTFT and its ratio to the whole folder's. Runs offline: the model (Qwen2.5-Coder-0.5B, the examples'
default, ctxopt/models/registry.py) and the embedder (MiniLM) come from PyPI packages.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from ctxopt.bench.compare import contains_answer, method_notes, method_row, method_table
from ctxopt.cli import parse_budget
from ctxopt.methods import build_stages
from ctxopt.models import LoadedModel
from ctxopt.models.registry import EXAMPLE_MODEL
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
    parser.add_argument("--model", default=EXAMPLE_MODEL, help="registry name, model folder or .gguf file")
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


def mark(text: str, answers: list[str]) -> str:
    """'[correct]' or '[expected ...]' against the gold answers; '' without them."""
    if not answers:
        return ""
    return "   [correct]" if contains_answer(text, answers) else f"   [expected {answers[0]}]"


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
    run_full = not args.no_full and all(len(full.build_prompt(i["question"], documents)) <= limit for i in items)

    retrieved, whole = [], []
    for item in items:
        question, answers = item["question"], item["answers"]
        answer = rag.ask(question)
        retrieved.append(answer)
        print(f"\nQ: {question}\nA: {answer.text}{mark(answer.text, answers)}")
        for passage in answer.sources:
            print(f"   source: {passage.source} chars {passage.span[0]}-{passage.span[1]} score={passage.score:.3f}")
        if run_full:
            whole.append(full.ask(question, context=documents))
            print(f"   whole folder: {whole[-1].text!r}{mark(whole[-1].text, answers)}")

    golds = [item["answers"] for item in items]
    label = f"rag k={args.k}" + ("" if args.method == "full" else f" + {args.method} {args.budget}")
    rows = ([method_row("full", whole, golds)] if run_full else []) + [method_row(label, retrieved, golds)]
    tokens = sum(len(a.prompt) for a in retrieved)
    full_tokens = sum(len(full.build_prompt(i["question"], documents)) for i in items)
    print(f"\n{len(items)} questions; rag = {args.k} retrieved passages, full = the whole folder in the prompt"
          + ("" if run_full else " (not run: " + ("--no-full" if args.no_full else "longer than the model's positions")
             + ")") + ":\n" + method_table(rows))
    for note in method_notes(rows):
        print("- " + note)
    print(f"saved {full_tokens - tokens} of {full_tokens} prompt tokens ({1 - tokens / full_tokens:.0%}) by sending "
          f"{args.k} retrieved passages instead of the whole folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
