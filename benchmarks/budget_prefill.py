"""What each method prefills at one budget (issue 28: one meaning of a budget), on the same held-out prompts.

For each sample (RULER task at a length, drawn with a seed) and each method at each budget, it prints the prompt
tokens the generator prefills: passage and token stages (truncate, rag, extractive) by running ``compress``;
RAPID's drafter prompt by running its retrieval and framing (the target prefills the whole prompt); GemFilter,
SpecPC (token stages) and SnapKV, SpecKV, SpecKV-PC (cache stages) by their stage's budget rule, which keeps
exactly that many (tests/test_budget.py checks it), so no model pass is spent on them. A budget the tree refuses
prints the error. It runs on any ctxopt tree (the one on PYTHONPATH), so the same command gives the before and
after rows:

    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/before python benchmarks/budget_prefill.py   # an older checkout
    OMP_NUM_THREADS=1 python benchmarks/budget_prefill.py
"""
from __future__ import annotations

import argparse
import inspect
import statistics

from ctxopt.bench.datasets import load_task
from ctxopt.bench.runner import ask_inputs
from ctxopt.errors import InputError
from ctxopt.methods import build_stages
from ctxopt.models import load_model
from ctxopt.pipeline import Pipeline, as_passages
from ctxopt.prompting import reframe_prompt
from ctxopt.stages import resolve_budget

RUN = ("truncate", "rag", "extractive")  # passage and token stages run through compress
RULE = ("gemfilter", "specpc", "snapkv", "speckv", "speckv-pc")  # keep exactly min(budget tokens, prompt)


def drafter_prompt(pipe: Pipeline, prompt) -> int:
    """RAPID: the tokens of the drafter's prompt (its retrieval and the target's frame), no model pass."""
    run = pipe._run_for(prompt, {})
    stage = pipe.generator.decoder
    takes_tokenizer = "tokenizer" in inspect.signature(stage.draft_passages).parameters  # the older signature
    args = (prompt.question, prompt.passages) + ((pipe.lm.tokenizer,) if takes_tokenizer else ()) + (run,)
    return len(reframe_prompt(pipe.lm.tokenizer, prompt, stage.draft_passages(*args)))


def prefilled(lm, method: str, budget, sample) -> int | str:
    question, context, answer_prefix, instruction = ask_inputs(sample)
    try:
        stages = build_stages(method, budget)
        pipe = Pipeline(lm, stages=stages if method in RUN + ("rapid",) else [], instruction=instruction)
        if method in RULE:  # the whole prompt (no passage stage before them), resolved by the budget rule
            n = len(pipe.build_prompt(question, as_passages(context), answer_prefix))
            return resolve_budget(stages[-1].budget, n)  # speckv-pc: its SpecKV, after SpecPC's >= 2048
        prompt = pipe.compress(question, context, answer_prefix=answer_prefix)
        return drafter_prompt(pipe, prompt) if method == "rapid" else len(prompt)
    except InputError as error:
        return f"refused: {error}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="ruler/qa_1", help="bench task (default ruler/qa_1)")
    parser.add_argument("--length", type=int, default=4096, help="context length in tokens (default 4096)")
    parser.add_argument("--samples", type=int, default=3, help="held-out samples (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="sample seed (default 1)")
    parser.add_argument("--model", default="smollm2-135m", help="model whose tokenizer and template count")
    parser.add_argument("--budgets", default="0.25,1024", help="comma-separated budgets (default 0.25,1024)")
    args = parser.parse_args()
    lm = load_model(args.model)
    samples = load_task(args.task, args.length, lm.tokenizer, args.samples, args.seed)
    budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    full = [len(Pipeline(lm, instruction=ask_inputs(s)[3]).build_prompt(
        ask_inputs(s)[0], as_passages(ask_inputs(s)[1]), ask_inputs(s)[2])) for s in samples]
    print(f"{args.task} {args.length}, {args.model}, seed {args.seed}: full prompts {full} tokens")
    for method in RUN + ("rapid",) + RULE:
        for budget in budgets:
            counts = [prefilled(lm, method, budget, s) for s in samples]
            numbers = [c for c in counts if isinstance(c, int)]
            shown = f"{counts} mean {statistics.mean(numbers):.0f}" if len(numbers) == len(counts) else counts[0]
            print(f"{method:11s} {budget!s:>6s}: {shown}")


if __name__ == "__main__":
    main()
