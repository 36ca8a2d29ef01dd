"""Query-aware extractive compression: in each passage, keep the sentences most similar to the question.

The training-free baseline beside CoLoR (the spirit of LangChain's EmbeddingsFilter / LLMChainExtractor, at
sentence level): sentences are embedded with the retrieval embedder, ranked by cosine similarity to the
question, and kept best first while they fit the passage's budget; the kept sentences stay in their order.
It also makes CoLoR's extractive training candidates at several ratios (``ctxopt train color-data``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stages import PassageStage, Run, resolve_budget
from ..text import count_tokens, sentence_spans
from ..types import Passage

SENTENCE_JOIN = " "


def extract(question: str, text: str, budget: int | float, tokenizer, embedder) -> str:
    """The sentences of ``text`` most similar to ``question`` that fit ``budget`` (tokens of ``text``, or a
    ratio of them), joined in text order; at least the single best sentence."""
    spans = sentence_spans(text)
    if len(spans) <= 1:
        return text
    sentences = [text[a:b] for a, b in spans]
    sizes = [count_tokens(tokenizer, s) for s in sentences]
    room = resolve_budget(budget, sum(sizes))
    scores = embedder.embed(sentences) @ embedder.embed([question])[0]
    kept: list[int] = []
    used = 0
    for i in np.argsort(-scores, kind="stable"):
        if kept and used + sizes[i] > room:
            continue
        kept.append(int(i))
        used += sizes[i]
    return SENTENCE_JOIN.join(sentences[i] for i in sorted(kept))


@dataclass
class Extractive(PassageStage):
    """Each passage cut to its sentences most similar to the question, within ``budget`` per passage: a
    ratio of the passage's tokens (0.5) or a token count (64). Source, span, id and metadata are kept."""

    budget: int | float = 0.5
    name = "extractive"

    def compress(self, question: str, passages: list[Passage], run: Run) -> list[Passage]:
        embedder = run.embedder()
        tokenizer = run.lm.tokenizer
        return [p.replace(text=extract(question, p.text, self.budget, tokenizer, embedder)) for p in passages]
