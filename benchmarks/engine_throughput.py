"""Throughput through a serving engine: N concurrent requests over N distinct long contexts, full context
against each engine-capable method, all in one run against the same engine.

Each request is one ``Pipeline.ask`` with ``engine=``: ctxopt's compression (its own model passes) runs under
one lock, as in ``CtxoptChatModel`` and ``ctxopt serve`` (ctxopt-side passes are serialised, in the dtype an
engine's ctxopt side loads in: bfloat16 on a CPU that multiplies it natively), and the
generation requests go to the engine concurrently, where continuous batching serves them together. A method
row therefore pays its compression passes one after another, then the engine's shorter prefills in a batch.
Reported per row: requests/s over the wall time of the whole batch, p50/p95 latency of a request (submit to
last token), mean score, and the ratio of requests/s to the full row.

Start the engine first (prefix caching off, so that no row reuses another's KV of the same context):

    bash scripts/serve_engine.sh smollm2-135m 8011 --no-enable-prefix-caching &
    OMP_NUM_THREADS=1 python benchmarks/engine_throughput.py --engine http://127.0.0.1:8011/v1 \\
        --task ruler/niah_single_2 --length 4096 --requests 16 --methods full,extractive,gemfilter,truncate \\
        --budget 0.25 --out runs/engine-throughput.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="ruler/niah_single_2")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests, one distinct context each")
    parser.add_argument("--methods", default="full,extractive,gemfilter,truncate")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=1, help="sample seed (1: not the accuracy run's samples)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from ctxopt.bench.datasets import load_task
    from ctxopt.bench.metrics import score
    from ctxopt.bench.runner import ask_inputs, sample_max_new_tokens
    from ctxopt.methods import build_stages
    from ctxopt.models import load_model
    from ctxopt.pipeline import Pipeline

    lm = load_model(args.model, prefill_only=True)  # the ctxopt side of an engine, as Pipeline(engine=) loads it
    samples = load_task(args.task, args.length, lm.tokenizer, args.requests, args.seed)
    lock = threading.Lock()
    rows = []
    for method in args.methods.split(","):
        budget = None if method == "full" else args.budget
        instruction = ask_inputs(samples[0])[3]
        pipe = Pipeline(lm, stages=build_stages(method, budget), engine=args.engine, instruction=instruction)

        def one(sample):
            question, context, answer_prefix, _ = ask_inputs(sample)
            began = time.perf_counter()
            generation = {"max_new_tokens": sample_max_new_tokens(sample)}
            with lock:  # ctxopt-side passes, one at a time
                prompt = pipe.compress(question, context, answer_prefix=answer_prefix, **generation)
            answer = pipe.generate(prompt, **generation)
            return time.perf_counter() - began, score(sample, answer.text)["score"], len(answer.prompt)

        pipe.compress(*ask_inputs(samples[0])[:2])  # load what the method needs (drafts, embedder) untimed
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(samples)) as pool:
            results = list(pool.map(one, samples))
        wall = time.perf_counter() - began
        latencies = [r[0] for r in results]
        row = {
            "method": method, "budget": budget, "requests": len(samples), "wall_s": wall,
            "requests_per_s": len(samples) / wall, "p50_s": statistics.median(latencies),
            "p95_s": percentile(latencies, 0.95), "score": statistics.mean(r[1] for r in results),
            "prompt_tokens": statistics.mean(r[2] for r in results),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    full = next((r for r in rows if r["method"] == "full"), None)
    print("\n| method | budget | requests | prompt tokens | wall s | req/s | x full | p50 s | p95 s | score |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['requests_per_s'] / full['requests_per_s']:.2f}x" if full else "-"
        print(f"| {r['method']} | {r['budget'] or '-'} | {r['requests']} | {r['prompt_tokens']:.0f} "
              f"| {r['wall_s']:.1f} | {r['requests_per_s']:.3f} | {ratio} | {r['p50_s']:.1f} | {r['p95_s']:.1f} "
              f"| {r['score']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
