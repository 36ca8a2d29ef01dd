"""Registry of named methods, shared by the CLI (``--method``) and the benchmark runner.

Each entry builds the list of stages for a budget. Method modules are imported only when named, so a
missing optional dependency of one method never breaks the others. To add a method, add one line here
(see docs/adding-a-method.md).
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import InputError
from .stages import Stage


@dataclass(frozen=True)
class MethodSpec:
    """``factory`` is "module:callable"; the callable takes (budget, **options) and returns a list of stages.

    ``needs_budget``: the method cannot run without one. ``takes_budget``: it uses one when given (RAPID's
    drafter context) and otherwise runs at its own default.
    """

    factory: str
    summary: str
    needs_budget: bool = True
    takes_budget: bool = True
    options: tuple[str, ...] = field(default_factory=tuple)
    parts: tuple[str, ...] = ()  # the registered methods a composed method runs in turn


COMPOSE = "+"
DRAFT_OPTIONS = ("draft", "drafter")  # the option names a draft-based method takes its second model by


def draft_option(spec: MethodSpec) -> str | None:
    """The option this method takes its draft model by, or None if it takes none."""
    return next((name for name in DRAFT_OPTIONS if name in spec.options), None)


def parse_options(items: list[str], flag: str = "--option") -> dict:
    """``KEY=VALUE`` strings -> {key: value}; a value is read as JSON (numbers, true/false/null, lists)
    when it parses as JSON and is kept as a string otherwise (``draft=tinyllama``)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{flag} takes KEY=VALUE; got {item!r}.")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


class MethodRegistry(dict):
    """Registered methods by name. A name joining registered names with "+" (``color+specpc+speckv``) is their
    composition: the stages of each, in turn, built at the same budget with the same options."""

    def __missing__(self, name: str) -> MethodSpec:
        parts = tuple(name.split(COMPOSE))
        if len(parts) < 2 or not all(dict.__contains__(self, part) for part in parts):
            raise KeyError(name)
        specs = [self[part] for part in parts]
        return MethodSpec(
            "ctxopt.methods:build_stages", " then ".join(parts), needs_budget=any(s.needs_budget for s in specs),
            takes_budget=any(s.takes_budget for s in specs),
            options=tuple(dict.fromkeys(o for s in specs for o in s.options)), parts=parts,
        )

    def get(self, name: str, default: MethodSpec | None = None) -> MethodSpec | None:
        try:
            return self[name]
        except KeyError:
            return default


METHODS: MethodRegistry = MethodRegistry({
    "full": MethodSpec("ctxopt.methods:_full", "the whole context, no compression", needs_budget=False,
                       takes_budget=False),
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
    "snapkv": MethodSpec("ctxopt.compressors.snapkv:snapkv_stages", "KV cache pruned per head by the prompt's last queries (SnapKV)", options=("window", "kernel", "pooling")),
    "speckv": MethodSpec("ctxopt.compressors.speckv:speckv_stages", "KV cache pruned per head by a draft answer's attention (SpecKV)", options=("draft", "window", "kernel", "lookahead")),
    "speckv-pc": MethodSpec("ctxopt.compressors.speckv:speckv_pc_stages", "SpecPC prompt compression, then SpecKV on the same draft answer", options=("draft", "window", "kernel", "lookahead")),
    "refrag": MethodSpec("ctxopt.compressors.refrag:refrag_stages", "one trained embedding per k-token context chunk "
                         "(REFRAG; default adapter SmolLM2 + MiniLM, k=16)", needs_budget=False, takes_budget=False,
                         options=("adapter", "chunk_tokens", "expand", "policy", "cache")),
    "color": MethodSpec("ctxopt.compressors.color:color_stages", "each passage rewritten shorter by a trained "
                        "compressor LM (CoLoR; default SmolLM2 + packaged LoRA)", needs_budget=False, takes_budget=False,
                        options=("compressor", "adapter", "max_new_tokens", "fallback", "batch_size")),
    "extractive": MethodSpec("ctxopt.compressors.extractive:extractive_stages", "in each passage, the sentences "
                             "most similar to the question (budget per passage: ratio or tokens)"),
})


def register(name: str, spec: MethodSpec) -> None:
    METHODS[name] = spec


def build_stages(method: str, budget: int | float | None = None, **options) -> list[Stage]:
    """The stages of ``method`` at ``budget`` (tokens, or a ratio in (0, 1]). An option the method does not
    take is an error (a misspelt knob must not be ignored); a composed method hands each part the options
    that part takes."""
    spec = METHODS.get(method)
    if spec is None:
        raise InputError(f"Unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}.")
    if spec.needs_budget and budget is None:
        raise InputError(f"Method {method!r} needs a budget (--budget N tokens, or a ratio such as 0.25).")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        takes = f"it takes: {', '.join(spec.options)}" if spec.options else "it takes none"
        raise InputError(f"Method {method!r} has no option {', '.join(map(repr, unknown))}; {takes}.")
    if spec.parts:
        return [stage for part in spec.parts
                for stage in build_stages(part, budget, **options_for(METHODS[part], options))]
    module, _, attribute = spec.factory.partition(":")
    factory: Callable[..., list[Stage]] = getattr(importlib.import_module(module), attribute)
    return factory(budget, **{k: v for k, v in options.items() if v is not None})


def options_for(spec: MethodSpec, options: dict) -> dict:
    """The subset of ``options`` that ``spec``'s method takes."""
    return {name: value for name, value in options.items() if name in spec.options}


def _full(budget=None) -> list[Stage]:
    return []


def _truncate(budget) -> list[Stage]:
    from .stages import Truncate

    return [Truncate(budget)]


def _rag(budget, chunk_tokens: int = 128) -> list[Stage]:
    from .compressors.rag import RAGChunks

    if not isinstance(budget, int):
        raise InputError("rag takes its budget as a token count.")
    return [RAGChunks(budget=budget, chunk_tokens=chunk_tokens)]
