"""``ctxopt serve``: an OpenAI-compatible gateway that compresses the context of every chat request and answers
it with ctxopt's own generator or forwards it to a serving engine (vLLM). See docs/serve.md.

- ``create_app(config)``: the FastAPI app (routes in ``app``, the model, pipelines, admission and jobs in
  ``gateway``, the wire format in ``schema``, Prometheus metrics in ``metrics``);
- ``serve(config, host, port)``: run it under uvicorn in the foreground, draining on SIGTERM;
- ``BackgroundServer(app)``: run it on a thread (tests, load runs);
- ``add_serve_parser`` / ``cmd_serve``: the ``serve`` subcommand (``cli``).

The names are imported on first use, so ``import ctxopt.server.cli`` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "create_app": "app",
    "ServeConfig": "gateway",
    "Gateway": "gateway",
    "serve": "running",
    "BackgroundServer": "running",
    "add_serve_parser": "cli",
    "cmd_serve": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
