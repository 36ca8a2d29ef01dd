"""GemFilter's selection-layer search (research tooling, not the method): accuracy per layer, and a cheap
screen of every layer's needle recall from one forward per prompt. ``benchmarks/gemfilter_layers.py`` runs the
screen on benchmark samples; ``ctxopt.compressors.gemfilter.default_layer`` is what the method uses.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..compressors.gemfilter import GemFilter, keep_positions, last_query_scores
from ..compressors.specpc import overlapping, text_tiles
from ..models import LoadedModel
from ..pipeline import Pipeline
from ..types import CONTEXT, Prompt
from .metrics import ruler_string_match_all


def search_layer(
    lm: LoadedModel,
    samples: Sequence[Any],
    layers: Iterable[int] | None = None,
    budget: int | float = 1024,
    max_new_tokens: int = 16,
    **pipeline_options: Any,
) -> dict[int, float]:
    """Accuracy of GemFilter at each candidate selection layer (default: every layer) on ``samples``.

    A sample has ``.question``, ``.context`` and ``.answers``; it counts as answered when the answer contains
    every gold string, case-insensitively (RULER's string_match_all). Extra keyword
    arguments go to the Pipeline (``instruction=...``, ``system=...``).
    """
    accuracy: dict[int, float] = {}
    for layer in range(lm.num_layers) if layers is None else layers:
        pipe = Pipeline(lm, stages=[GemFilter(budget, layer=layer)], max_new_tokens=max_new_tokens, **pipeline_options)
        hits = [ruler_string_match_all(pipe.ask(s.question, context=s.context).text, s.answers) for s in samples]
        accuracy[layer] = sum(hits) / max(len(hits), 1)
    return accuracy


def answer_spans(prompt: Prompt, tokenizer, answers: Sequence[str]) -> list[list[torch.Tensor]]:
    """For each answer string, the context token indices of each of its occurrences in ``prompt.text``
    (the tokens whose characters overlap it; occurrences touching template or question tokens are left out)."""
    text, tiles = text_tiles(prompt, tokenizer)
    spans = []
    for answer in answers:
        found, start = [], text.find(answer)
        while answer and start >= 0:
            lo, hi = overlapping(torch.tensor([[start, start + len(answer)]]), tiles)[0].tolist()
            if hi > lo and bool((prompt.segment[lo:hi] == CONTEXT).all()):
                found.append(torch.arange(lo, hi))
            start = text.find(answer, start + 1)
        spans.append(found)
    return spans


def needle_recall(
    lm: LoadedModel,
    prompts: Sequence[Prompt],
    answers: Sequence[Sequence[str]],
    budgets: Sequence[int],
    layers: Iterable[int] | None = None,
    kernel: int = 5,
) -> dict[int, dict[int, float]]:
    """A cheap screen for ``search_layer``: {budget: {layer: recall}}, where recall is the fraction of gold
    answers of which GemFilter at that budget and layer (default: every layer) keeps every token of at least
    one occurrence in the context (an answer without an occurrence counts as lost). One full forward per
    prompt serves all layers and budgets, and nothing is decoded, so it ranks the layers of a model too slow
    to decode at each of them."""
    layers = list(range(lm.num_layers)) if layers is None else list(layers)
    hits: dict[int, dict[int, list[bool]]] = {budget: {layer: [] for layer in layers} for budget in budgets}
    for prompt, gold in zip(prompts, answers, strict=True):
        spans = answer_spans(prompt, lm.tokenizer, gold)
        scores = last_query_scores(lm.model, prompt.input_ids, layers)
        for budget in budgets:
            for layer in layers:
                kept = torch.zeros(len(prompt), dtype=torch.bool)
                kept[keep_positions(scores[layer], kernel, budget)] = True
                hits[budget][layer] += [any(bool(kept[span].all()) for span in found) for found in spans]
    return {budget: {layer: sum(h) / max(len(h), 1) for layer, h in by_layer.items()}
            for budget, by_layer in hits.items()}
