"""Registry of named methods, shared by the CLI (``--method``), the LangChain components and the benchmark.

An entry names a stage class (or, for a method that is a composition, a function returning stages), a one-line
summary and whether the method needs, takes or ignores a budget. Its options and their defaults are not written
here: they are the class's constructor parameters (its dataclass fields), read when asked, so a knob is declared
once. A field marked ``field(metadata={"option": False})`` is for Python callers only (a live object, not a
command-line value). Method modules are imported only when named, so a missing optional dependency of one
method never breaks the others. Adding a method: docs/adding-a-method.md.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from .errors import InputError
from .stages import Stage

COMPOSE = "+"
BUDGET = "budget"
DRAFT = "draft"  # the one option name a draft-based method takes its second model by


@dataclass(frozen=True)
class MethodSpec:
    """``target`` is "module:attribute" (imported when first used) or the object itself: a Stage class (built as
    ``Class(budget=..., **options)``) or a function ``(budget, **options) -> Stage | list[Stage]`` for a
    composition. ``needs_budget``: the method cannot run without one.
    ``takes_budget``: it uses one when given (RAPID's drafter context) and otherwise runs at its own default.
    ``parts``: the registered methods a composed method ("color+specpc") runs in turn."""

    target: str | Callable[..., Stage | list[Stage]] | None
    summary: str
    needs_budget: bool = True
    takes_budget: bool = True
    parts: tuple[str, ...] = ()

    def load(self) -> Callable[..., Stage | list[Stage]] | None:
        """The stage class or composition function (imported now), or None for a method with no stages."""
        if self.target is None or not isinstance(self.target, str):
            return self.target
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    @cached_property
    def options(self) -> tuple[str, ...]:
        """The knobs a user may set: the target's parameters other than the budget (for a composition, every
        part's), in declaration order."""
        if self.parts:
            return tuple(dict.fromkeys(o for part in self.parts for o in METHODS[part].options))
        target = self.load()
        if target is None:
            return ()
        hidden = set()
        if dataclasses.is_dataclass(target):
            hidden = {f.name for f in dataclasses.fields(target) if f.metadata.get("option") is False}
        parameters = inspect.signature(target).parameters
        return tuple(name for name in parameters if name != BUDGET and name not in hidden)

    @property
    def takes_draft(self) -> bool:
        return DRAFT in self.options

    def build(self, budget: int | float | None, options: dict) -> list[Stage]:
        """The stages at ``budget`` with ``options`` (already checked); a budget the method ignores is not passed."""
        target = self.load()
        if target is None:
            return []
        if BUDGET in inspect.signature(target).parameters and budget is not None:
            options = {BUDGET: budget, **options}
        built = target(**options)
        return list(built) if isinstance(built, (list, tuple)) else [built]


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


def command_line_options(method: str, items: list[str], draft: str | None = None) -> dict:
    """``--option KEY=VALUE`` items, plus ``--draft`` as the method's ``draft`` option (an error for a method
    that takes no draft): what ``ctxopt ask`` and ``ctxopt serve`` hand to ``build_stages``."""
    options = parse_options(items)
    if draft:
        spec = METHODS.get(method)
        if spec is not None and not spec.takes_draft:
            raise InputError(f"--draft: method {method!r} takes no draft model.")
        options[DRAFT] = draft
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
            None, " then ".join(parts), needs_budget=any(s.needs_budget for s in specs),
            takes_budget=any(s.takes_budget for s in specs), parts=parts,
        )

    def get(self, name: str, default: MethodSpec | None = None) -> MethodSpec | None:
        try:
            return self[name]
        except KeyError:
            return default


METHODS: MethodRegistry = MethodRegistry({
    "full": MethodSpec(None, "the whole context, no compression", needs_budget=False, takes_budget=False),
    "truncate": MethodSpec("ctxopt.stages:Truncate", "keep the start and end of the context"),
    "rag": MethodSpec("ctxopt.compressors.rag:RAGChunks", "top chunks of the context by embedder similarity"),
    "gemfilter": MethodSpec("ctxopt.compressors.gemfilter:GemFilter",
                            "keep the tokens an early layer's last query scores highest (GemFilter)"),
    "specpc": MethodSpec("ctxopt.compressors.specpc:SpecPC", "keep the tokens a draft model attends to (SpecPC)"),
    "rapid": MethodSpec("ctxopt.speculative.rapid:rapid", "speculative decoding with a drafter on retrieved chunks "
                        "(the target prefills the whole prompt; the budget sizes the drafter's prompt)",
                        needs_budget=False),
    "snapkv": MethodSpec("ctxopt.compressors.snapkv:SnapKV",
                         "KV cache pruned per head by the prompt's last queries (SnapKV)"),
    "speckv": MethodSpec("ctxopt.compressors.speckv:SpecKV",
                         "KV cache pruned per head by a draft answer's attention (SpecKV)"),
    "speckv-pc": MethodSpec("ctxopt.compressors.speckv:speckv_pc",
                            "SpecPC prompt compression, then SpecKV on the same draft answer"),
    "refrag": MethodSpec("ctxopt.compressors.refrag:REFRAG", "one trained embedding per k-token context chunk "
                         "(REFRAG; default adapter SmolLM2 + MiniLM, k=16; its size is set by k and the expanded "
                         "share, not a budget)", needs_budget=False, takes_budget=False),
    "color": MethodSpec("ctxopt.compressors.color:CoLoR", "each passage rewritten shorter by a trained compressor "
                        "LM (CoLoR; default Qwen2.5-Coder-0.5B + packaged LoRA; the summaries' length is the "
                        "compressor's, not a budget)", needs_budget=False, takes_budget=False),
    "extractive": MethodSpec("ctxopt.compressors.extractive:Extractive", "the sentences most similar to the "
                             "question, ranked across all passages"),
})


def register(name: str, spec: MethodSpec) -> None:
    """Add a method under ``name`` (a plug-in's own stage: ``MethodSpec("mypkg.mymod:MyStage", "...")``)."""
    if COMPOSE in name:
        raise InputError(f"A method name cannot contain {COMPOSE!r}: that joins methods into a composition.")
    METHODS[name] = spec


def build_stages(method: str, budget: int | float | None = None, **options) -> list[Stage]:
    """The stages of ``method`` at ``budget``: the prompt tokens the generator prefills (template, question and
    kept context), or a ratio in (0, 1] of the uncompressed prompt's tokens (docs/methods.md, "Budgets"). A
    budget for a method that takes none is an error, as is an option the method does not
    take (a misspelt knob must not be ignored); a composed method hands each part the options
    that part takes. An option given as None keeps the method's default."""
    spec = METHODS.get(method)
    if spec is None:
        raise InputError(f"Unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}.")
    if spec.needs_budget and budget is None:
        raise InputError(f"Method {method!r} needs a budget (--budget N tokens, or a ratio such as 0.25).")
    if budget is not None and not spec.takes_budget:
        takes = ", ".join(name for name, s in sorted(METHODS.items()) if s.takes_budget)
        raise InputError(f"Method {method!r} takes no budget: drop the budget, or pick a method that takes one "
                         f"({takes}).")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        takes = f"it takes: {', '.join(spec.options)}" if spec.options else "it takes none"
        raise InputError(f"Method {method!r} has no option {', '.join(map(repr, unknown))}; {takes}.")
    if spec.parts:
        return [stage for part in spec.parts
                for stage in build_stages(part, budget if METHODS[part].takes_budget else None,
                                          **options_for(METHODS[part], options))]
    return spec.build(budget, {k: v for k, v in options.items() if v is not None})


def budget_for(method: str, budget: int | float | None) -> int | float | None:
    """``budget`` when ``method`` takes one, else None: for a comparison that runs several methods at one budget
    (``full``, ``color`` and ``refrag`` refuse one in ``build_stages``)."""
    spec = METHODS.get(method)
    return budget if spec is None or spec.takes_budget else None


def options_for(spec: MethodSpec, options: dict) -> dict:
    """The subset of ``options`` that ``spec``'s method takes."""
    return {name: value for name, value in options.items() if name in spec.options}
