"""Registry of named methods, shared by the CLI (``--method``) and the benchmark runner.

Each entry builds the list of stages for a budget. Method modules are imported only when named, so a
missing optional dependency of one method never breaks the others. To add a method, add one line here
(see docs/adding-a-method.md).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import InputError
from .stages import Stage


@dataclass(frozen=True)
class MethodSpec:
    """``factory`` is "module:callable"; the callable takes (budget, **options) and returns a list of stages."""

    factory: str
    summary: str
    needs_budget: bool = True
    options: tuple[str, ...] = field(default_factory=tuple)


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec("ctxopt.methods:_full", "the whole context, no compression", needs_budget=False),
    "truncate": MethodSpec("ctxopt.methods:_truncate", "keep the start and end of the context"),
    "rag": MethodSpec("ctxopt.methods:_rag", "top chunks of the context by embedder similarity", options=("chunk_tokens",)),
    "gemfilter": MethodSpec("ctxopt.compressors.gemfilter:gemfilter_stages", "keep the tokens an early layer's last "
                            "query scores highest (GemFilter)", options=("layer", "kernel", "keep_question")),
    "specpc": MethodSpec("ctxopt.compressors.specpc:specpc_stages", "keep the tokens a draft model attends to (SpecPC)",
                         options=("draft", "window", "first_layer", "kernel", "lookahead", "keep_question",
                                  "cross_tokenizer")),
    "rapid": MethodSpec("ctxopt.speculative.rapid:rapid", "speculative decoding with a drafter on retrieved chunks "
                        "(budget = drafter context tokens)", needs_budget=False,
                        options=("drafter", "gamma", "eta", "chunk_tokens", "threshold")),
    "snapkv": MethodSpec("ctxopt.compressors.snapkv:snapkv_stages", "KV cache pruned per head by the prompt's last queries (SnapKV)", options=("window", "kernel")),
    "speckv": MethodSpec("ctxopt.compressors.speckv:speckv_stages", "KV cache pruned per head by a draft answer's attention (SpecKV)", options=("draft", "window", "kernel", "lookahead")),
    "speckv-pc": MethodSpec("ctxopt.compressors.speckv:speckv_pc_stages", "SpecPC prompt compression, then SpecKV on the same draft answer", options=("draft", "window", "kernel", "lookahead")),
}


def register(name: str, spec: MethodSpec) -> None:
    METHODS[name] = spec


def build_stages(method: str, budget: int | float | None = None, **options) -> list[Stage]:
    """The stages of ``method`` at ``budget`` (tokens, or a ratio in (0, 1])."""
    spec = METHODS.get(method)
    if spec is None:
        raise InputError(f"Unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}.")
    if spec.needs_budget and budget is None:
        raise InputError(f"Method {method!r} needs a budget (--budget N tokens, or a ratio such as 0.25).")
    module, _, attribute = spec.factory.partition(":")
    factory: Callable[..., list[Stage]] = getattr(importlib.import_module(module), attribute)
    return factory(budget, **{k: v for k, v in options.items() if v is not None})


def _full(budget=None, **_) -> list[Stage]:
    return []


def _truncate(budget, **_) -> list[Stage]:
    from .stages import Truncate

    return [Truncate(budget)]


def _rag(budget, chunk_tokens: int = 128, **_) -> list[Stage]:
    from .compressors.rag import RAGChunks

    if not isinstance(budget, int):
        raise InputError("rag takes its budget as a token count.")
    return [RAGChunks(budget=budget, chunk_tokens=chunk_tokens)]
