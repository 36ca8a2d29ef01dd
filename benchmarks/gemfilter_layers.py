"""Screen GemFilter's selection layer on a model: needle recall per layer and budget, from one forward per sample.

For each benchmark sample (the same seeded samples and prompts as ``ctxopt bench``), one forward of the whole
model captures every layer's last-query scores; for each layer and budget, GemFilter's kept tokens are checked
for the gold answer (``ctxopt.bench.layers.needle_recall``, run per sample: the table is the mean over
samples of each sample's fraction of answers kept, so a 4-answer niah_multivalue sample weighs as much as a
1-answer one). Nothing is decoded, so all layers of a 1.5B model cost one prefill per sample; confirm the best
layers' accuracy afterwards with ``ctxopt bench --methods gemfilter --option layer=N``.

    python benchmarks/gemfilter_layers.py --model qwen2.5-coder-1.5b --task ruler/niah_single_2 --length 4096 \\
        --samples 4 --budget 512,1024 --out runs/gemfilter-layers-qwen.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="ruler/niah_single_2", help="comma-separated bench tasks")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", default="512,1024", help="comma-separated token budgets")
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args()

    from tqdm import tqdm

    from ctxopt.bench.datasets import load_task
    from ctxopt.bench.layers import needle_recall
    from ctxopt.bench.runner import ask_inputs
    from ctxopt.compressors.gemfilter import default_layer
    from ctxopt.models import load_model
    from ctxopt.pipeline import Pipeline, as_passages

    lm = load_model(args.model)
    budgets = [int(b) for b in args.budget.split(",")]
    prompts, answers = [], []
    for task in args.task.split(","):
        for sample in load_task(task, args.length, lm.tokenizer, args.samples, args.seed):
            question, context, answer_prefix, instruction = ask_inputs(sample)
            pipe = Pipeline(lm, instruction=instruction)
            prompts.append(pipe.build_prompt(question, as_passages(context), answer_prefix))
            answers.append(sample.answers)
    began = time.perf_counter()
    recall: dict[int, dict[int, float]] = {budget: {} for budget in budgets}
    for prompt, gold in tqdm(list(zip(prompts, answers)), desc="samples", unit="sample"):
        one = needle_recall(lm, [prompt], [gold], budgets, kernel=args.kernel)
        for budget in budgets:
            for layer, value in one[budget].items():
                recall[budget].setdefault(layer, []).append(value)
    table = {budget: {layer: sum(v) / len(v) for layer, v in by_layer.items()} for budget, by_layer in recall.items()}
    result = {
        "model": args.model, "tasks": args.task, "length": args.length, "samples": len(prompts),
        "default_layer": default_layer(lm.config), "seconds": time.perf_counter() - began, "recall": table,
    }
    print("| layer | " + " | ".join(f"recall @ {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for layer in range(lm.num_layers):
        marker = " (default)" if layer == result["default_layer"] else ""
        print(f"| {layer}{marker} | " + " | ".join(f"{table[b][layer]:.2f}" for b in budgets) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
