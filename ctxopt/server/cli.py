"""``ctxopt serve``: the command-line face of the gateway. ``add_serve_parser(commands)`` adds the subcommand to
ctxopt's parser (its handler is ``cmd_serve``); ``python -m ctxopt.server`` runs the same command on its own.
Only argparse is imported here: the server's dependencies load when the command runs."""
from __future__ import annotations

import argparse
import os
import sys

API_KEY_VARIABLE = "CTXOPT_API_KEY"
ENGINE_API_KEY_VARIABLE = "CTXOPT_ENGINE_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DESCRIPTION = (
    "Serve POST /v1/chat/completions (streamed or not), GET /v1/models, /health and /metrics; each request's "
    "context (its documents field, else --index, else the messages before the question) is compressed with "
    "--method and answered by ctxopt's generator or by --engine. See docs/serve.md."
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", default=None, metavar="URL",
                        help="OpenAI-compatible engine serving the same model, e.g. http://127.0.0.1:8000/v1 "
                             "(default: ctxopt's own generator, one request at a time)")
    parser.add_argument("--engine-model", default=None, help="the engine's served model name (default: its only one)")
    parser.add_argument("--model", default="smollm2-135m", help="registry name, local folder, .gguf file or hub id")
    parser.add_argument("--served-name", default=None, help="the model name clients use (default: the model's name)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16")
    parser.add_argument("--method", default="full", help="default compression method (see `ctxopt methods`)")
    parser.add_argument("--budget", default=None, help="default budget: tokens to keep (512) or a ratio (0.25)")
    parser.add_argument("--draft", default=None, help="draft model of a draft-based method (specpc, speckv, rapid)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="method option, e.g. --option layer=12 (repeatable)")
    parser.add_argument("--index", default=None, metavar="FOLDER",
                        help="index written by `ctxopt index`: context for requests that carry none")
    parser.add_argument("-k", type=int, default=4, help="passages to retrieve from --index (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length when a request sets none")
    parser.add_argument("--truncate", action="store_true", help="truncate a context longer than the model's positions")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=None,
                        help=f"key clients must send as a Bearer token (default: ${API_KEY_VARIABLE}; none: open)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait for a worker; more get 429 (default 16)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="generations in flight at once (default 16): with --engine, requests streaming from it; "
                             "without, requests decoding together in one batch")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (default 4 MiB)")
    parser.add_argument("--drain-seconds", type=float, default=30.0,
                        help="on SIGTERM, how long requests in flight may take to finish (default 30)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``ctxopt serve`` to the ctxopt command's subcommands."""
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible gateway that compresses every request's context", description=DESCRIPTION
    )
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)


def require_server_packages() -> None:
    """Refuse with the install line when the gateway's packages (the ``serve`` extra) are missing."""
    import importlib.util

    from ..errors import InputError

    missing = [name for module, name in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                         ("prometheus_client", "prometheus-client"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise InputError(f"ctxopt serve needs {', '.join(missing)}: pip install 'ctxopt[serve]'.")


def config_from_args(args: argparse.Namespace):
    from ..checks import parse_budget
    from ..methods import command_line_options
    from .gateway import ServeConfig

    options = command_line_options(args.method, args.option, args.draft)
    return ServeConfig(
        model=args.model, served_name=args.served_name, method=args.method, budget=parse_budget(args.budget),
        options=options, index=args.index, k=args.k, engine=args.engine, engine_model=args.engine_model,
        engine_api_key=os.environ.get(ENGINE_API_KEY_VARIABLE) or None, max_new_tokens=args.max_new_tokens,
        truncate=args.truncate, device=args.device, dtype=args.dtype,
        api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None, max_queue=args.max_queue,
        concurrency=args.concurrency, request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
        drain_seconds=args.drain_seconds,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    require_server_packages()
    from ..errors import InputError
    from .running import serve

    config = config_from_args(args)
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535; got {args.port}.")
    if args.host not in LOOPBACK and config.api_key is None:
        print(f"ctxopt serve: warning: listening on {args.host} without an API key; anyone who can reach it may "
              f"use it (set ${API_KEY_VARIABLE} or --api-key).", file=sys.stderr)
    serve(config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ctxopt.server``: ``ctxopt serve`` without the rest of the ctxopt command."""
    from ..errors import CtxoptError

    parser = argparse.ArgumentParser(prog="python -m ctxopt.server", description=DESCRIPTION)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except CtxoptError as error:
        print(f"ctxopt serve: error: {error}", file=sys.stderr)
        return 2
