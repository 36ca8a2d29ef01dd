"""Query-aware extractive compression: keep the sentences most similar to the question.

The training-free baseline beside CoLoR (the spirit of LangChain's EmbeddingsFilter / LLMChainExtractor, at
sentence level): the sentences of all passages are embedded with the retrieval embedder, ranked together by
cosine similarity to the question, and kept best first while the prompt fits the budget; the kept sentences
stay in their order.
It also makes CoLoR's extractive training candidates at several ratios (``ctxopt train color-data``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stages import PassageStage, Run, context_room, fill_prompt, resolve_budget, take_in_order
from ..text import count_tokens, sentence_spans
from ..types import Passage

SENTENCE_JOIN = " "


def split_sentences(passages: list[Passage], tokenizer) -> tuple[list[tuple[int, str]], list[int]]:
    """Every sentence of every passage as (passage index, text), in text order, and each one's tokens."""
    units = [(i, p.text[a:b]) for i, p in enumerate(passages) for a, b in sentence_spans(p.text)]
    return units, [count_tokens(tokenizer, text) for _, text in units]


def rank_sentences(question: str, sentences: list[str], embedder) -> list[int]:
    """Sentence indices by cosine similarity to ``question`` (the embedder's normalised vectors), best first."""
    scores = embedder.embed(sentences) @ embedder.embed([question])[0]
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def extract(question: str, text: str, budget: int | float, tokenizer, embedder) -> str:
    """The sentences of one ``text`` most similar to ``question`` that fit ``budget`` (tokens of ``text``, or a
    ratio of them), joined in text order; at least the single best sentence. (Per text: CoLoR's training
    candidates and query-free index pre-compression; the ``extractive`` method ranks all passages jointly.)"""
    units, sizes = split_sentences([Passage(text)], tokenizer)
    if len(units) <= 1:
        return text
    ranked = rank_sentences(question, [u for _, u in units], embedder)
    kept = take_in_order(ranked, sizes, resolve_budget(budget, sum(sizes))) or ranked[:1]
    return SENTENCE_JOIN.join(units[i][1] for i in sorted(kept))


@dataclass
class Extractive(PassageStage):
    """The sentences most similar to the question, ranked across ALL passages together, kept best first while
    the prompt built around them fits ``budget`` prefilled tokens (template, instruction and question included;
    a ratio is of the uncompressed prompt: docs/methods.md, "Budgets"). Kept sentences stay in their order; a
    passage with no kept sentence is dropped (no per-passage floor). Source, span, id and metadata are kept."""

    budget: int | float = 0.5
    name = "extractive"

    def compress(self, question: str, passages: list[Passage], run: Run) -> list[Passage]:
        room = context_room(self.name, self.budget, passages, run)
        if room is None:
            return passages
        units, sizes = split_sentences(passages, run.lm.tokenizer)
        ranked = rank_sentences(question, [text for _, text in units], run.embedder())

        def build(chosen: list[int]) -> list[Passage]:
            kept: dict[int, list[str]] = {}
            for unit in sorted(chosen):
                kept.setdefault(units[unit][0], []).append(units[unit][1])
            return [passages[i].replace(text=SENTENCE_JOIN.join(texts)) for i, texts in kept.items()]

        return fill_prompt(ranked, sizes, room, build, run)
