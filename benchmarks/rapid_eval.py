"""RAPID's accuracy and decode speed on benchmark tasks: an eta x gamma sweep from ONE target prefill per sample.

    python benchmarks/rapid_eval.py --model qwen2.5-coder-1.5b --drafters self,qwen2.5-coder-0.5b \\
        --tasks ruler/qa_1,hotpotqa --length 8192 --samples 3 --etas 0 5 20 --gammas 4 10 --out runs/rapid

Why a script beside ``ctxopt bench``: every RAPID configuration shares the target's prefill of the long
prompt, which is most of the cost on a CPU (minutes per 8K prompt for a 1.5B model). ``ctxopt bench
--methods rapid`` prefills again per configuration; here each sample is prefilled once and every row decodes
from a copy of that cache, so the rows differ only in their decoder:

- ``target``: the target's own greedy decoding of the full prompt (the reference);
- ``drafter-rag [D]``: drafter D alone, greedy, on its retrieval prompt (the chunks RAPID gives it), i.e. RAG;
- ``rapid [D] eta=E gamma=G``: RAPID with drafter D (``self``: the target drafts for itself).

Per drafter the retrieval and the prefill of its short prompt run once and are shared by its rows, each of
which runs ``RAPID.speculate`` (``RAPID.decode`` is ``prepare_drafter`` then ``speculate``).
Samples, prompts and scores are the bench's (``ctxopt.bench``: same seeded samples, instruction, answer
prefix, metric). Per row: score, tokens, decode seconds; for drafter rows also retrieval and drafter-prefill
seconds, and for RAPID the acceptance rate, tokens per target forward, and whether the output equals the
target's. ``decode tok/s`` is tokens over the decoding loop; ``stage`` adds the retrieval and the drafter's
prefill. Speedups are paired by sample against the target row's decode tok/s, median over samples.
Rows go to ``OUT/rows.csv`` as they finish; the summary table to ``OUT/summary.md``.

``--forward-costs`` also times, on the first sample's prefilled cache, one target forward of 1, 2, 5 and 11
new tokens (what a RAPID round's verification costs next to a plain decode step), with transformers' SDPA
and with ctxopt's GROUPED_SDPA, medians of 3, into ``OUT/forward_costs.md``.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ctxopt.bench.costs import forward_costs, forward_costs_table
from ctxopt.bench.datasets import load_task
from ctxopt.bench.metrics import score
from ctxopt.bench.runner import ask_inputs, sample_max_new_tokens
from ctxopt.cache import cache_length
from ctxopt.decoding import GenerationConfig, decode, prefill
from ctxopt.models import load_model
from ctxopt.pipeline import Pipeline, as_passages
from ctxopt.retrievers.embeddings import load_embedder
from ctxopt.speculative.rapid import RAPID
from ctxopt.stages import Run
from ctxopt.types import Stats

COLUMNS = ("task", "sample_id", "row", "score", "tokens", "decode_s", "stage_s", "prefill_s", "prompt_tokens",
           "draft_prompt_tokens", "retrieval_s", "draft_prefill_s", "acceptance", "tokens_per_forward",
           "same_as_target", "prediction")


def sample_rows(lm, drafters, embedder, sample, etas, gammas, rag_tokens, max_new_tokens, costs_to=None):
    """Every row of one sample, all decoding from one prefill of the target; per drafter, one retrieval and
    one prefill of its short prompt, shared by its rows (``RAPID.decode`` does both per call; the rows add
    their measured seconds to ``stage_s`` the same way)."""
    question, context, answer_prefix, instruction = ask_inputs(sample)
    pipe = Pipeline(lm, instruction=instruction, embedder=lambda: embedder)
    passages = as_passages(context)
    prompt = pipe.build_prompt(question, passages, answer_prefix)
    config = GenerationConfig(max_new_tokens=sample_max_new_tokens(sample, max_new_tokens))
    tick = time.perf_counter()
    state = prefill(lm.model, prompt.input_ids, chunk_size=pipe.prefill_chunk, room=config.max_new_tokens)
    prefill_s = time.perf_counter() - tick
    base = dict(task=sample.task, sample_id=sample.id, prefill_s=prefill_s, prompt_tokens=len(prompt))
    if costs_to is not None:
        costs_to.write_text(forward_costs_table(forward_costs(lm, state), cache_length(state.cache)) + "\n",
                            encoding="utf-8")
        print(costs_to.read_text(encoding="utf-8"))

    def row(name, result, **extra):
        text = result.text.strip()
        return {**base, "row": name, **score(sample, text), "tokens": len(result.token_ids), "prediction": text,
                "decode_s": result.seconds, **extra}

    target = decode(lm.model, lm.tokenizer, state.copy(), config, lm.eos_token_ids)
    yield row("target", target, stage_s=target.seconds)

    for label, drafter in drafters.items():
        run = Run(lm, question, config, Stats(), embedder=lambda: embedder)
        draft_prompt, draft_state, retrieval_s, draft_prefill_s = RAPID(rag_tokens=rag_tokens).prepare_drafter(
            drafter, prompt, run)
        ready = retrieval_s + draft_prefill_s
        shared = dict(draft_prompt_tokens=len(draft_prompt), retrieval_s=retrieval_s, draft_prefill_s=draft_prefill_s)
        alone = decode(drafter.model, drafter.tokenizer, draft_state.copy(), config, drafter.eos_token_ids)
        yield row(f"drafter-rag [{label}]", alone, stage_s=alone.seconds + ready, **shared)
        for eta in etas:
            for gamma in gammas:
                result = RAPID(draft=drafter, gamma=gamma, eta=eta, rag_tokens=rag_tokens).speculate(
                    lm, state.copy(), drafter, draft_state.copy(), config)
                yield row(f"rapid [{label}] eta={eta:g} gamma={gamma}", result, stage_s=result.seconds + ready,
                          acceptance=result.extra["acceptance_rate"],
                          tokens_per_forward=result.extra["tokens_per_target_forward"],
                          same_as_target=result.token_ids == target.token_ids, **shared)


def summarise(rows: list[dict]) -> str:
    """One line per task x row name: mean score, median tok/s and paired speedups over the target row."""
    target = {(r["task"], r["sample_id"]): r for r in rows if r["row"] == "target"}
    lines = ["| task | row | n | score | decode tok/s | decode speedup | stage speedup | accept | tok/fwd "
             "| same as target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["row"]), []).append(r)

    def rate(r, key):
        return r["tokens"] / r[key] if r[key] > 0 and r["tokens"] else float("nan")

    def med(values):
        values = [v for v in values if v == v]
        return statistics.median(values) if values else float("nan")

    def cell(value, unit=""):
        return "-" if value != value else f"{value:.2f}{unit}"

    for (task, name), group in groups.items():
        pairs = [(r, target[(task, r["sample_id"])]) for r in group]
        same = [r["same_as_target"] for r in group if r.get("same_as_target") not in (None, "")]
        lines.append(
            f"| {task} | {name} | {len(group)} | {100 * statistics.mean(r['score'] for r in group):.1f} "
            f"| {cell(med(rate(r, 'decode_s') for r in group))} "
            f"| {cell(med(rate(r, 'decode_s') / rate(t, 'decode_s') for r, t in pairs), 'x')} "
            f"| {cell(med(rate(r, 'stage_s') / rate(t, 'decode_s') for r, t in pairs), 'x')} "
            f"| {cell(med(r.get('acceptance', float('nan')) for r in group))} "
            f"| {cell(med(r.get('tokens_per_forward', float('nan')) for r in group))} "
            f"| {f'{sum(same)}/{len(same)}' if same else '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafters", default="self",
                        help="comma-separated drafter models; 'self' is the target itself (self-speculation)")
    parser.add_argument("--tasks", default="ruler/qa_1,hotpotqa", help="comma-separated bench task specs")
    parser.add_argument("--length", type=int, default=8192, help="RULER context length in target tokens")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--etas", type=float, nargs="+", default=[0.0, 5.0, 20.0])
    parser.add_argument("--gammas", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--rag-tokens", type=int, default=1024, help="the drafter's context (RAPID's rag_tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's tokens_to_generate")
    parser.add_argument("--forward-costs", action="store_true", help="time k-token target forwards once (see above)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/rapid-eval")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    drafters = {name: lm if name == "self" else load_model(name, lm.device, lm.dtype)
                for name in args.drafters.split(",")}
    for drafter in drafters.values():
        RAPID(draft=drafter).resolve_drafter(lm)  # refuse a drafter with another vocabulary before any work
    embedder = load_embedder()
    rows: list[dict] = []
    with open(out / "rows.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for task in args.tasks.split(","):
            samples = load_task(task, args.length, lm.tokenizer, args.samples, args.seed)
            for sample in tqdm(samples, desc=task, unit="sample"):
                costs_to = out / "forward_costs.md" if args.forward_costs and not rows else None
                for row in sample_rows(lm, drafters, embedder, sample, args.etas, args.gammas, args.rag_tokens,
                                       args.max_new_tokens, costs_to):
                    rows.append(row)
                    writer.writerow(row)
                    handle.flush()
    header = (f"`{shlex.join([Path(sys.executable).name, *sys.argv])}` — target {lm.name}, "
              f"torch threads {torch.get_num_threads()}\n\n")
    table = summarise(rows)
    (out / "summary.md").write_text(header + table + "\n", encoding="utf-8")
    print(header + table)


if __name__ == "__main__":
    main()
