"""float32 against bfloat16 on this CPU: a prefill, a decode step, and the selections of SpecPC and GemFilter.

    OMP_NUM_THREADS=1 python benchmarks/cpu_dtype.py prefill --model smollm2-135m --tokens 2048
    OMP_NUM_THREADS=1 python benchmarks/cpu_dtype.py prefill --model qwen2.5-coder-0.5b --tokens 4096
    OMP_NUM_THREADS=1 python benchmarks/cpu_dtype.py select --method specpc --samples 4    # RULER-4K qa_2, 8x
    OMP_NUM_THREADS=1 python benchmarks/cpu_dtype.py select --method gemfilter --samples 4
    OMP_NUM_THREADS=1 python benchmarks/decode_speed.py --only batch1 --dtype bfloat16     # the decode step

``prefill``: CPU seconds of one prefill of ``--tokens`` random ids in each dtype (median of 3 interleaved runs,
after a short warm-up). ``select``: ``Pipeline.compress`` of RULER-4K qa_2 samples with Qwen2.5-Coder-0.5B as the
target (SpecPC with the SmolLM2-135M draft, GemFilter at Qwen's layer), at 8x, in each dtype: CPU seconds and the
share of float32's kept positions that bfloat16 keeps too. These chose ``ctxopt.models.policy``'s CPU dtype for a
model that only reads prompts (the ctxopt side of a serving engine).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctxopt.models import load_model  # noqa: E402

DTYPES = ("float32", "bfloat16")


def bench_prefill(model: str, tokens: int, runs: int = 3) -> None:
    from ctxopt.decoding import prefill

    lms = {dtype: load_model(model, "cpu", dtype, progress=False) for dtype in DTYPES}
    ids = torch.randint(1000, 20000, (tokens,), generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    for lm in lms.values():
        prefill(lm.model, ids[:128])
    for _ in range(runs):
        for dtype, lm in lms.items():
            began = time.process_time()
            prefill(lm.model, ids)
            seconds[dtype].append(time.process_time() - began)
    for dtype in DTYPES:
        print(f"{model} prefill {tokens} tokens, {dtype}: {statistics.median(seconds[dtype]):.2f} CPU-s "
              f"(runs {', '.join(f'{s:.2f}' for s in seconds[dtype])})", flush=True)


def bench_select(method: str, samples: int, budget: float = 0.125) -> None:
    from ctxopt.bench.datasets import load_task
    from ctxopt.bench.runner import as_passages, ask_inputs
    from ctxopt.methods import build_stages
    from ctxopt.pipeline import Pipeline

    lms = {dtype: load_model("qwen2.5-coder-0.5b", "cpu", dtype, progress=False) for dtype in DTYPES}
    options = {"draft": "smollm2-135m"} if method == "specpc" else {}
    for sample in load_task("ruler/qa_2", 4096, lms["float32"].tokenizer, samples=samples):
        question, context, prefix, instruction = ask_inputs(sample)
        kept, seconds = {}, {}
        for dtype, lm in lms.items():
            pipe = Pipeline(lm, stages=build_stages(method, budget, **options), instruction=instruction)
            began = time.process_time()
            prompt = pipe.compress(question, as_passages(context), answer_prefix=prefix)
            seconds[dtype] = time.process_time() - began
            kept[dtype] = set(prompt.positions.tolist())
        same = len(kept["float32"] & kept["bfloat16"]) / max(1, len(kept["float32"]))
        print(f"{method} {sample.id}: float32 {seconds['float32']:.1f} CPU-s, bfloat16 {seconds['bfloat16']:.1f}; "
              f"{len(kept['float32'])} kept, {same:.3f} of them kept in bfloat16 too", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["prefill", "select"])
    parser.add_argument("--model", default="smollm2-135m", help="prefill: the model")
    parser.add_argument("--tokens", type=int, default=2048, help="prefill: prompt length")
    parser.add_argument("--method", default="specpc", choices=["specpc", "gemfilter"], help="select: the method")
    parser.add_argument("--samples", type=int, default=4, help="select: RULER-4K qa_2 samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "prefill":
        bench_prefill(args.model, args.tokens)
    else:
        bench_select(args.method, args.samples)


if __name__ == "__main__":
    main()
