"""ctxopt: make long contexts cheap to process and hand the generator a short KV cache.

``ctxopt.compress_prompt(context, question, method=..., budget=...)`` compresses a context without generating
(see ``ctxopt.compress``); ``ctxopt.pipeline.Pipeline`` answers over it. Both are imported on first use, so
``import ctxopt`` (and the ``ctxopt`` command's start) stays light.
"""
__version__ = "0.1.0"

_LAZY = {"compress_prompt": "compress", "CompressedPrompt": "compress", "Pipeline": "pipeline"}
__all__ = ["CompressedPrompt", "Pipeline", "__version__", "compress_prompt"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ctxopt' has no attribute {name!r}")
