"""``ctxopt bench``: run the benchmark, ``ctxopt bench report DIR``: tabulate and plot it,
``ctxopt bench dump-samples``: write the samples as JSONL for runners outside ctxopt (kvpress)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..checks import parse_budget
from ..errors import InputError


def _list(text: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in _list(text)]
    except ValueError:
        raise InputError(f"{what} takes comma-separated integers (2048,4096); got {text!r}.") from None


def _add_sample_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", help="comma-separated: ruler/<task> (e.g. ruler/niah_single_2,ruler/vt), "
                        "hotpotqa, needle, needle/hard")
    parser.add_argument("--length", default="4096", help="comma-separated context lengths in tokens (default 4096)")
    parser.add_argument("--samples", type=int, default=10, help="samples per task and length (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample draw (default 0)")
    parser.add_argument("--model", default="smollm2-135m", help="registry name, local folder, .gguf file or hub id")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: bf16 on cuda, fp32 on cpu; with --engine, bf16 on "
                             "a cpu with native bf16)")


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` (with its ``report`` and ``dump-samples`` subcommands) to the ctxopt command."""
    bench = commands.add_parser(
        "bench", help="benchmark methods on RULER / HotpotQA / needle samples (see also `bench report DIR`)",
        description="Run every method x budget on the same seeded samples; write predictions.csv and "
                    "metrics.json per configuration under --out. Subcommands: report, dump-samples.",
    )
    _add_sample_options(bench)
    bench.add_argument("--methods", default="full", help="comma-separated methods (see `ctxopt methods`)")
    bench.add_argument("--budget", default="", help="comma-separated budgets: tokens (512) or ratios (0.25)")
    bench.add_argument("--draft", default=None,
                       help="draft model for draft-based methods (loaded once); 'self': the model drafts for itself")
    bench.add_argument("--out", default="bench-out", help="results folder (default bench-out)")
    bench.add_argument("--repeats", type=int, default=1, help="runs per sample; timings are their median")
    bench.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's tokens_to_generate")
    bench.add_argument("--no-full", action="store_true", help="do not run the full-context baseline (no ratios)")
    bench.add_argument("--overwrite", action="store_true", help="redo configurations whose metrics.json exists")
    bench.add_argument("--share-prefill", action="store_true",
                       help="prefill each sample's prompt once for every configuration that reads it with the "
                            "same attention capture (full and snapkv at each budget), and run each selection pass "
                            "(gemfilter's early layers, the specpc/speckv draft) once for all budgets; each TTFT "
                            "still counts those passes' measured time")
    bench.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="method option, passed to each method that takes it, e.g. --option layer=12 (repeatable; "
                            "`ctxopt methods` lists the options)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument("--engine", default=None, metavar="URL",
                       help="generate through an OpenAI-compatible server serving --model; its own full-context "
                            "run is the `full` row every ratio is taken against")
    bench.add_argument("--engine-model", default=None, metavar="NAME",
                       help="the engine's name for the model (default: the one model it serves)")
    bench.set_defaults(handler=cmd_bench)

    sub = bench.add_subparsers(dest="bench_command", metavar="{report,dump-samples}",
                               help="report: tabulate a results folder; dump-samples: write the samples as JSONL")
    report = sub.add_parser("report", help="print the results table, write DIR/report.md and PNG plots")
    report.add_argument("folder", help="the --out folder of `ctxopt bench`")
    report.add_argument("--no-plots", action="store_true", help="write the table only, no PNG plots")
    report.set_defaults(handler=cmd_report)

    dump = sub.add_parser("dump-samples", help="write the benchmark samples as JSONL (for benchmarks/peers)")
    _add_sample_options(dump)
    dump.add_argument("--out", required=True, help="JSONL file to write")
    dump.set_defaults(handler=cmd_dump_samples)


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from ..methods import parse_options
    from .runner import run_benchmark

    if not args.task:
        raise InputError("ctxopt bench needs --task (e.g. --task ruler/niah_single_2,hotpotqa), "
                         "or a subcommand: `ctxopt bench report DIR`, `ctxopt bench dump-samples ...`.")
    results = run_benchmark(
        _list(args.task), _ints(args.length, "--length"), _list(args.methods),
        [parse_budget(b) for b in _list(args.budget)], args.out,
        model=args.model, draft=args.draft, samples=args.samples, repeats=args.repeats, seed=args.seed,
        max_new_tokens=args.max_new_tokens, include_full=not args.no_full, overwrite=args.overwrite,
        share_prefill=args.share_prefill, engine=args.engine, engine_model=args.engine_model,
        options=parse_options(args.option), device=args.device, dtype=args.dtype, progress=not args.no_progress,
        command=shlex.join(["ctxopt", *sys.argv[1:]]),
    )
    failed = sum(m["n_errors"] for m in results)
    print(f"{len(results)} configurations in {args.out} ({failed} sample errors); "
          f"table: ctxopt bench report {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    if not Path(args.folder).is_dir():
        raise InputError(f"{args.folder} is not a folder: pass the --out folder of `ctxopt bench`.")
    try:
        print(report(args.folder, plots=not args.no_plots))
    except FileNotFoundError as error:
        raise InputError(str(error)) from None
    return 0


def cmd_dump_samples(args: argparse.Namespace) -> int:
    from ..models import load_model
    from .runner import dump_samples

    if not args.task:
        raise InputError("dump-samples needs --task (e.g. --task ruler/niah_single_2,hotpotqa).")
    tokenizer = load_model(args.model, args.device, args.dtype).tokenizer
    count = dump_samples(_list(args.task), _ints(args.length, "--length"), args.samples, args.seed, tokenizer, args.out)
    print(f"wrote {count} samples to {args.out}")
    return 0
