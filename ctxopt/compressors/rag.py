"""RAG over a long context: split it into chunks, keep the chunks most similar to the question.

The baseline "RAG top-k chunks of the long context", and the drafter's prompt of RAPID (arXiv 2502.20330:
128-token chunks, inner-product retrieval with a 0.1 similarity floor, about 4K tokens kept, put back in
document order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..retrievers.chunking import chunk_text
from ..stages import PassageStage, Run, context_room, fill_prompt
from ..text import count_tokens
from ..types import Passage


def split_chunks(passages: list[Passage], tokenizer, chunk_tokens: int) -> list[Passage]:
    """``passages`` cut into ``chunk_tokens``-token chunks by ``tokenizer`` (the generator's), spans kept."""
    chunks: list[Passage] = []
    for passage in passages:
        base = passage.span[0] if passage.span else 0
        chunks += chunk_text(passage.text, tokenizer, chunk_tokens, overlap=0, source=passage.source, offset=base,
                             metadata=passage.metadata)
    return chunks


def rank_chunks(
    question: str, chunks: list[Passage], embedder, threshold: float | None = None
) -> tuple[list[int], np.ndarray]:
    """Chunk indices by embedder similarity to ``question``, best first (those under ``threshold`` left out),
    and every chunk's score."""
    scores = embedder.embed([c.text for c in chunks]) @ embedder.embed([question])[0]
    ranked = [int(i) for i in np.argsort(-scores, kind="stable")]
    if threshold is not None:
        ranked = [i for i in ranked if scores[i] >= threshold]
    return ranked, scores


def top_chunks(question: str, passages: list[Passage], run: Run, room: tuple[int, int], chunk_tokens: int = 128,
               threshold: float | None = None) -> list[Passage]:
    """The ``chunk_tokens``-token chunks of ``passages`` most similar to ``question`` (the run's embedder; those
    under ``threshold`` left out), best first while the prompt around them fits ``room`` (``context_room``),
    in document order."""
    tokenizer = run.lm.tokenizer
    chunks = split_chunks(passages, tokenizer, chunk_tokens)
    if not chunks:
        return []
    ranked, scores = rank_chunks(question, chunks, run.embedder(), threshold)

    def build(chosen: list[int]) -> list[Passage]:
        return [chunks[i].replace(score=float(scores[i])) for i in sorted(chosen)]

    return fill_prompt(ranked, [count_tokens(tokenizer, c) for c in chunks], room, build, run)


@dataclass
class RAGChunks(PassageStage):
    """Keep the ``chunk_tokens``-token chunks most similar to the question (embedder cosine), best first, while
    the prompt built around them fits ``budget`` prefilled tokens (template, instruction and question included;
    a ratio is of the uncompressed prompt: docs/methods.md, "Budgets"). Kept chunks stay in document order."""

    budget: int | float = 1024
    chunk_tokens: int = 128
    threshold: float | None = None
    name = "rag"

    def compress(self, question: str, passages: list[Passage], run: Run) -> list[Passage]:
        room = context_room(self.name, self.budget, passages, run)
        if room is None:
            return passages
        return top_chunks(question, passages, run, room, self.chunk_tokens, self.threshold)
