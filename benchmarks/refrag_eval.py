"""REFRAG measurements: the paper's Table-1 log-perplexity and the TTFT ratio to a full prefill.

    python benchmarks/refrag_eval.py logppl --context 1024 --continuation 256 --samples 8 --chunk-tokens 8,16,32
    python benchmarks/refrag_eval.py ttft --lengths 2048,4096 --repeats 2

logppl: held-out Paul Graham essays (never trained on, see ctxopt.training.refrag); per window of s + o tokens,
the mean negative log-likelihood (nats per token) of continuation tokens 2..o given: the full s-token context,
REFRAG at each k (s/k chunk embeddings, optionally with a fraction expanded by the heuristic), and no context
(the continuation alone; its first token has nothing to condition on, hence tokens 2..o everywhere). Every
sequence opens with the token every ctxopt prompt opens with (the chat template's first), as at inference and in
training; ``--no-lead`` drops it (the earlier protocol).
``--control`` adds the expanded chunks' tokens alone (compressed chunks dropped): what the chunk embeddings add.
ttft: a chat prompt around a held-out essay context of each length; seconds of the full prefill versus the
REFRAG stage's prefill without a cache (encode + project + prefill) and with precomputed chunk embeddings.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from ctxopt.compressors.refrag import REFRAG, ChunkCache, load_adapter
from ctxopt.compressors.refrag.layout import expansion_count, surprisal_scores
from ctxopt.decoding import GenerationConfig, prefill
from ctxopt.models import load_model
from ctxopt.prompting import build_prompt
from ctxopt.stages import Run
from ctxopt.training.refrag import (
    Window,
    compressed_inputs,
    continuation_nll,
    load_documents,
    prompt_start_ids,
    tokenize_documents,
)
from ctxopt.types import Passage, Stats


def heldout_windows(tokenizer, length: int, samples: int) -> list[tuple[list[int], str, list[tuple[int, int]]]]:
    """Up to ``samples`` non-overlapping windows of ``length`` tokens: the first window of every held-out essay,
    then the second of those long enough, and so on. Each is (ids, essay text, character offsets)."""
    docs = tokenize_documents(tokenizer, load_documents("builtin", "heldout"))
    out = []
    for start in itertools.count(0, length):
        fitting = [d for d in docs if len(d.ids) >= start + length]
        if not fitting:
            return out
        for d in fitting:
            out.append((d.ids[start : start + length], d.text, d.offsets[start : start + length]))
            if len(out) == samples:
                return out
    return out


def compressed_window(ids, text, offsets, context: int, k: int) -> Window:
    chunks = context // k
    return Window([text[offsets[c * k][0] : offsets[c * k + k - 1][1]] for c in range(chunks)],
                  [ids[c * k : c * k + k] for c in range(chunks)], ids[context:])


def cmd_logppl(args) -> dict:
    lm = load_model(args.model)
    decoder = lm.model
    embed = decoder.get_input_embeddings()
    windows = heldout_windows(lm.tokenizer, args.context + args.continuation, args.samples)
    results: dict[str, list[float]] = {"full": [], "none": []}
    adapters = {int(k): load_adapter(folder) for k, folder in (item.split("=") for item in args.adapters.split(","))}
    lead = [] if args.no_lead else prompt_start_ids(lm.tokenizer)

    def nll_after_lead(ids: list[int], targets: torch.Tensor) -> float:
        """NLL of continuation tokens 2..o, the last tokens of ``lead + ids``."""
        sequence = embed(torch.tensor(lead + ids, dtype=torch.long)).unsqueeze(0)
        return float(continuation_nll(decoder, sequence, targets, skip_first=1))

    with torch.inference_mode():
        for ids, text, offsets in windows:
            targets = torch.tensor(ids[args.context :]).unsqueeze(0)
            results["full"].append(nll_after_lead(ids, targets))
            cont = ids[args.context :]
            if lead:
                results["none"].append(nll_after_lead(cont, targets))
            else:  # the first token predicts the second
                embedded = embed(torch.tensor(cont)).unsqueeze(0)
                results["none"].append(float(continuation_nll(decoder, embedded, targets[:, 1:])))
            for k, adapter in adapters.items():
                window = compressed_window(ids, text, offsets, args.context, k)
                for expand in args.expand:
                    count = expansion_count(expand, len(window.texts))
                    scores = surprisal_scores([torch.tensor(c) for c in window.chunk_ids])
                    expanded = set(scores.topk(count).indices.tolist()) if count else set()
                    embeds, window_targets = compressed_inputs(adapter, decoder, [window], [expanded], lead_ids=lead)
                    nll = float(continuation_nll(decoder, embeds, window_targets, skip_first=1))
                    results.setdefault(f"refrag k={k} expand={expand}", []).append(nll)
                    if args.control and count:
                        kept = [t for c in sorted(expanded) for t in window.chunk_ids[c]] + window.continuation
                        nll = nll_after_lead(kept, window_targets)
                        results.setdefault(f"expanded tokens only k={k} expand={expand}", []).append(nll)
            print(json.dumps({name: round(values[-1], 4) for name, values in results.items()}), flush=True)
    summary = {name: round(statistics.mean(values), 4) for name, values in results.items()}
    gap = summary["none"] - summary["full"]
    closed = {name: round((summary["none"] - value) / gap, 3) for name, value in summary.items()
              if name not in ("full", "none")}
    report = {"samples": len(windows), "context": args.context, "continuation": args.continuation,
              "mean_nll": summary, "gap_closed": closed}
    print(json.dumps(report, indent=1))
    return report


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def cmd_ttft(args) -> dict:
    lm = load_model(args.model)
    adapter = load_adapter(args.adapter)
    docs = load_documents("builtin", "heldout")
    text = "\n\n".join(docs)
    encoded = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for length in args.lengths:
        passage = Passage(text[: encoded["offset_mapping"][length - 1][1]], source="heldout-essays")
        prompt = build_prompt(lm.tokenizer, "What is the essay about?", [passage])
        run = Run(lm=lm, question="What is the essay about?", config=GenerationConfig(max_new_tokens=1), stats=Stats())
        full = _median_seconds(lambda: prefill(lm.model, prompt.input_ids), args.repeats)
        uncached_stage = REFRAG(adapter=adapter)
        uncached = _median_seconds(lambda: uncached_stage.prefill(prompt, run), args.repeats)
        cache = ChunkCache.build([passage], adapter, lm.tokenizer)
        cached_stage = REFRAG(adapter=adapter, cache=cache)
        cached = _median_seconds(lambda: cached_stage.prefill(prompt, run), args.repeats)
        extra = run.figures
        row = {"prompt_tokens": len(prompt), "decoder_positions": extra.get("decoder_positions"),
               "cached_chunks": extra.get("cached_chunks"), "chunks": extra.get("chunks"),
               "full_s": round(full, 3), "refrag_uncached_s": round(uncached, 3), "refrag_cached_s": round(cached, 3),
               "ratio_uncached": round(uncached / full, 3), "ratio_cached": round(cached / full, 3),
               "speedup_uncached": round(full / uncached, 2), "speedup_cached": round(full / cached, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows}


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    logppl = commands.add_parser("logppl")
    logppl.add_argument("--model", default="smollm2-135m")
    logppl.add_argument("--adapters", default="16=ctxopt/adapters/refrag-smollm2-minilm-k16",
                        help="k=adapter folder pairs, comma-separated")
    logppl.add_argument("--context", type=int, default=1024)
    logppl.add_argument("--continuation", type=int, default=256)
    logppl.add_argument("--samples", type=int, default=8)
    logppl.add_argument("--expand", type=lambda v: [float(x) for x in v.split(",")], default=[0.0])
    logppl.add_argument("--no-lead", action="store_true",
                        help="start every sequence at the context (the adapter's first chunk embedding at position 0), "
                        "as this script did before 2026-11-29; default: the token every ctxopt prompt opens with first")
    logppl.add_argument("--control", action="store_true",
                        help="also score the expanded chunks' tokens alone, the compressed chunks dropped")
    ttft = commands.add_parser("ttft")
    ttft.add_argument("--model", default="smollm2-135m")
    ttft.add_argument("--adapter", default="ctxopt/adapters/refrag-smollm2-minilm-k16")
    ttft.add_argument("--lengths", type=lambda v: [int(x) for x in v.split(",")], default=[2048, 4096])
    ttft.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    (cmd_logppl if args.command == "logppl" else cmd_ttft)(args)


if __name__ == "__main__":
    main()
