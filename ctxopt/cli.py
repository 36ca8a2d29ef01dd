"""The ``ctxopt`` command: index a folder, ask a question, run the demo, list methods."""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from .checks import parse_budget  # also the public name scripts import: ctxopt.cli.parse_budget
from .errors import CtxoptError, InputError

DEMO_FOLDER = "data/demo"


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="registry name, local folder, .gguf file or hub id")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: bf16 on cuda, fp32 on cpu; with --engine, bf16 on "
                             "a cpu with native bf16)")


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="full", help="compression method (see `ctxopt methods`)")
    parser.add_argument("--budget", default=None, help="tokens to keep (512) or a ratio (0.25)")
    parser.add_argument("--draft", default=None, help="draft model of a draft-based method (specpc, speckv, rapid)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra method option, e.g. --option layer=12 (repeatable)")


def _method_options(args) -> dict:
    """--option items, plus --draft as the method's ``draft`` option; REFRAG asked over an --index that holds
    precomputed chunk embeddings (``ctxopt index --refrag``) reads them unless --option cache=... says otherwise."""
    from .compressors.refrag.cache import CACHE_FILE
    from .methods import command_line_options

    options = command_line_options(args.method, args.option, args.draft)
    index = getattr(args, "index", None)
    if index and "refrag" in args.method.split("+") and "cache" not in options and (Path(index) / CACHE_FILE).is_file():
        options["cache"] = str(index)
    return options


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ctxopt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print ctxopt's version and exit")
    commands = parser.add_subparsers(dest="command", required=True,
                                     help="what to do; `ctxopt COMMAND --help` lists a command's options")

    index = commands.add_parser("index", help="chunk, embed and index a folder of documents")
    index.add_argument("folder", help="folder of .txt/.md/.jsonl documents")
    index.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    index.add_argument("--chunk-tokens", type=int, default=200, help="passage length in embedder tokens (default: 200)")
    index.add_argument("--overlap", type=int, default=40, help="tokens shared by consecutive passages (default: 40)")
    index.add_argument("--embedder", default=None, help="sentence-transformers model (default: all-minilm-l6-v2)")
    index.add_argument("--refrag", nargs="?", const="default", metavar="ADAPTER",
                       help="also precompute REFRAG chunk embeddings into the index (the default adapter, or a folder)")
    index.add_argument("--compress", default=None, metavar="METHOD",
                       help="pre-compress every passage: color, color:COMPRESSOR, extractive or extractive:RATIO "
                            "(query-free); the index serves the compressed texts")
    index.add_argument("--compress-option", action="append", default=[], metavar="KEY=VALUE",
                       help="CoLoR knob for --compress color: max_new_tokens, passage_tokens, adapter, batch_size, "
                            "compressor_engine=URL (the compressor on a serving engine), compressor_engine_model "
                            "(repeatable)")
    index.add_argument("--add", action="store_true",
                       help="update the index at --out: compute new and changed documents only, drop deleted ones")
    index.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray: a local cluster, or the cluster at ADDRESS (give --ray after FOLDER)")
    index.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per CPU of the cluster)")
    index.add_argument("--shard-size", type=int, default=128, help="passages per unit of work (default: 128)")
    index.add_argument("--approx-threshold", type=int, default=50_000,
                       help="passages above which the index is approximate (IVF, recall measured; default: 50000)")

    ask = commands.add_parser("ask", help="answer a question over a corpus, an index or a file")
    ask.add_argument("question", help="the question to answer (quote it)")
    source = ask.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="folder of .txt/.md/.jsonl documents (indexed in memory)")
    source.add_argument("--index", help="index folder written by `ctxopt index`")
    source.add_argument("--file", help="one long document, given whole as context")
    ask.add_argument("-k", type=int, default=4, help="passages to retrieve")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)")
    ask.add_argument("--truncate", action="store_true", help="truncate a context longer than the model's positions")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--json", action="store_true", help="print answer, sources and stats as JSON")
    add_engine_options(ask)
    _add_model_options(ask)
    _add_method_options(ask)

    demo = commands.add_parser("demo", help="answer a few questions over the bundled demo corpus, offline")
    _add_model_options(demo)
    demo.set_defaults(model=None)  # cmd_demo: the examples' model, models.registry.EXAMPLE_MODEL
    _add_method_options(demo)

    commands.add_parser("methods", help="list the available methods")

    from .training import add_train_parser

    add_train_parser(commands)

    try:
        from .bench.cli import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(commands)

    from .server.cli import add_serve_parser  # imports nothing heavy; the server's packages load in cmd_serve

    add_serve_parser(commands)
    return parser


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", default=None, metavar="URL",
                        help="answer through an OpenAI-compatible server serving --model "
                             "(e.g. http://127.0.0.1:8000/v1); ctxopt compresses, the engine generates")
    parser.add_argument("--engine-model", default=None, metavar="NAME",
                        help="the engine's name for the model (default: the one model it serves)")


def _pipeline(args, retriever=None):
    from .methods import build_stages
    from .pipeline import Pipeline

    stages = build_stages(args.method, parse_budget(args.budget), **_method_options(args))
    return Pipeline(
        args.model,
        retriever=retriever,
        stages=stages,
        k=getattr(args, "k", 4),
        max_new_tokens=getattr(args, "max_new_tokens", 64),
        truncate=getattr(args, "truncate", False),
        device=args.device,
        dtype=args.dtype,
        engine=getattr(args, "engine", None),
        engine_model=getattr(args, "engine_model", None),
    )


def _print_answer(answer, as_json: bool, streamed: bool) -> None:
    if as_json:
        print(json.dumps({
            "answer": answer.text,
            "sources": [{"source": p.source, "span": list(p.span), "score": p.score, "id": p.id}
                        for p in answer.sources],
            "stats": answer.stats.to_dict(),
        }, indent=2))
        return
    if not streamed:
        print(answer.text)
    print("\nsources:")
    for passage in answer.sources:
        score = f" score={passage.score:.3f}" if passage.score is not None else ""
        print(f"  {passage.source} chars {passage.span[0]}-{passage.span[1]}{score}")
    print(f"cost: {answer.stats.summary()}")


def cmd_index(args) -> int:
    """Build, resume or update (--add) an index, in this process or on Ray (docs/indexing.md)."""
    from .methods import parse_options
    from .retrievers.embeddings import DEFAULT_EMBEDDER
    from .retrievers.jobs import REFRAG_FILE, Compression, LocalExecutor, WorkerSpec, index_corpus, parts_folder

    if args.compress_option and not args.compress:
        raise InputError("--compress-option needs --compress color.")
    if args.ray is None and args.workers not in (None, 1):
        raise InputError("--workers needs --ray (without it the build runs in this process).")
    options = parse_options(args.compress_option, "--compress-option")
    compression = Compression.parse(args.compress, options) if args.compress else None
    spec = WorkerSpec(args.embedder or DEFAULT_EMBEDDER, compression, args.refrag)
    if args.ray is not None:
        from .retrievers.ray_jobs import RayExecutor

        executor = RayExecutor(spec, workers=args.workers, address=None if args.ray == "local" else args.ray)
    else:
        executor = LocalExecutor(spec)
    try:
        report = index_corpus(args.folder, args.out, executor=executor, chunk_tokens=args.chunk_tokens,
                              overlap=args.overlap, add=args.add, shard_size=args.shard_size,
                              approx_threshold=args.approx_threshold)
    except KeyboardInterrupt:
        if parts_folder(args.out).is_dir():
            print(f"ctxopt: finished shards kept in {parts_folder(args.out)}; rerun the same command to resume",
                  file=sys.stderr)
        raise
    finally:
        executor.close()
    print(f"indexed {report.passages} passages from {args.folder} into {args.out} in {report.seconds:.1f}s: "
          f"{report.computed} computed, {report.from_parts} from an interrupted build, {report.from_index} kept, "
          f"{report.dropped} dropped ({report.executor}, {report.workers} worker(s))")
    if report.computed:
        print("passages per worker-second: " + ", ".join(f"{k} {v:.1f}" for k, v in report.rates().items()))
    approximate = report.store.info.get("approximate")
    if approximate:
        kept = "; exact index kept, as only a full scan reaches the target" if approximate.get("kept_exact") else ""
        print(f"approximate index (IVF, {approximate['nlist']} cells, nprobe {approximate['nprobe']}): "
              f"recall@{approximate['k']} {approximate['recall']:.3f} against exact search "
              f"({approximate['queries']} passages as queries){kept}")
    if args.refrag:
        print(f"REFRAG chunk embeddings in {Path(args.out) / REFRAG_FILE}")
    return 0


def load_index(folder: str):
    """The index at ``folder``; its load errors also say how to (re)build it from the command line."""
    from .errors import IndexLoadError
    from .retrievers import FaissStore

    try:
        return FaissStore.load(folder)
    except IndexLoadError as error:
        raise IndexLoadError(
            f"{error}. From the command line, `ctxopt index DOCS_FOLDER --out {folder}` (re)builds it."
        ) from error


def cmd_ask(args) -> int:
    from .models.policy import configure_threads
    from .retrievers import build_index

    configure_threads(announce=True)  # before the embedder runs, not only at the generator's load
    context, retriever = None, None
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise InputError(f"--file {path} does not exist or is not a file.")
        try:
            context = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"--file {path} is not UTF-8 text.") from None
        from .types import Passage

        context = Passage(text=context, source=str(path))
    elif args.index:
        retriever = load_index(args.index)
    else:
        retriever = build_index(args.corpus, progress=False)
    pipe = _pipeline(args, retriever)
    on_text = (lambda piece: print(piece, end="", flush=True)) if args.stream and not args.json else None
    answer = pipe.ask(args.question, context=context, on_text=on_text)
    if on_text:
        print()
    _print_answer(answer, args.json, streamed=on_text is not None)
    return 0


def demo_questions() -> list[dict]:
    return json.loads((resources.files("ctxopt") / DEMO_FOLDER / "questions.json").read_text())


def cmd_demo(args) -> int:
    from .bench.metrics import normalize_answer
    from .models.policy import configure_threads
    from .models.registry import EXAMPLE_MODEL
    from .retrievers import build_index

    began = time.perf_counter()
    args.model = args.model or EXAMPLE_MODEL
    configure_threads(announce=True)  # before the corpus is embedded, not only at the generator's load
    with resources.as_file(resources.files("ctxopt") / DEMO_FOLDER / "corpus") as folder:
        store = build_index(folder, progress=False)
    args.k, args.max_new_tokens = 2, 32
    pipe = _pipeline(args, store)
    print(f"ctxopt demo: {len(store)} passages from the bundled Eldermoor corpus; model {args.model}; "
          f"method {args.method}")
    correct = 0
    for item in demo_questions():
        answer = pipe.ask(item["question"])
        ok = any(normalize_answer(gold) in normalize_answer(answer.text) for gold in item["answers"])
        correct += ok
        print(f"\nQ: {item['question']}\nA: {answer.text}   [{'correct' if ok else 'expected ' + item['answers'][0]}]")
        print("sources: " + ", ".join(p.source for p in answer.sources))
        print(f"cost: {answer.stats.summary()}")
    print(f"\n{correct}/{len(demo_questions())} correct in {time.perf_counter() - began:.1f}s")
    return 0 if correct == len(demo_questions()) else 1


def cmd_methods(args) -> int:
    from .methods import METHODS

    for name, spec in sorted(METHODS.items()):
        budget = "--budget" if spec.needs_budget else "--budget optional" if spec.takes_budget else "no budget"
        options = f"; --option {', '.join(spec.options)}" if spec.options else ""
        print(f"{name:12s} {spec.summary} ({budget}{options})")
    return 0


COMMANDS = {"index": cmd_index, "ask": cmd_ask, "demo": cmd_demo, "methods": cmd_methods}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    try:
        return handler(args)
    except CtxoptError as error:
        print(f"ctxopt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctxopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
