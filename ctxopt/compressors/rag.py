"""RAG over a long context: split it into chunks, keep the chunks most similar to the question.

The baseline "RAG top-k chunks of the long context", and the drafter's prompt of RAPID (arXiv 2502.20330:
128-token chunks, inner-product retrieval with a 0.1 similarity floor, about 4K tokens kept, put back in
document order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..retrievers.chunking import chunk_text
from ..stages import PassageStage, Run, resolve_budget
from ..text import count_tokens
from ..types import Passage


def select_chunks(
    question: str,
    passages: list[Passage],
    tokenizer,
    embedder,
    budget_tokens: int,
    chunk_tokens: int = 128,
    threshold: float | None = None,
) -> list[Passage]:
    """Chunk ``passages`` by ``tokenizer`` (the generator's), keep the best-scoring chunks up to
    ``budget_tokens`` (and above ``threshold`` if given), returned in document order."""
    chunks: list[Passage] = []
    for passage in passages:
        base = passage.span[0] if passage.span else 0
        for chunk in chunk_text(passage.text, tokenizer, chunk_tokens, overlap=0, source=passage.source, offset=base,
                                metadata=passage.metadata):
            chunks.append(chunk)
    if not chunks:
        return []
    vectors = embedder.embed([c.text for c in chunks])
    query = embedder.embed([question])[0]
    scores = vectors @ query
    sizes = [count_tokens(tokenizer, c) for c in chunks]
    chosen, used = [], 0
    for i in np.argsort(-scores, kind="stable"):
        if threshold is not None and scores[i] < threshold:
            break
        if used + sizes[i] > budget_tokens:
            continue
        chosen.append(int(i))
        used += sizes[i]
    return [chunks[i].replace(score=float(scores[i])) for i in sorted(chosen)]


@dataclass
class RAGChunks(PassageStage):
    """Keep ``budget`` tokens of ``chunk_tokens``-token chunks, ranked by embedder similarity to the question.
    The budget is a token count or a ratio of the context's tokens."""

    budget: int | float = 1024
    chunk_tokens: int = 128
    threshold: float | None = None
    name = "rag"

    def compress(self, question: str, passages: list[Passage], run: Run) -> list[Passage]:
        total = count_tokens(run.lm.tokenizer, passages)
        keep = resolve_budget(self.budget, total)
        if keep >= total:
            run.note(f"rag: budget {self.budget} >= context length {total}; nothing dropped")
            return passages
        kept = select_chunks(
            question, passages, run.lm.tokenizer, run.embedder(), keep, self.chunk_tokens, self.threshold
        )
        return kept or passages[:1]
