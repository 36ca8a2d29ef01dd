"""REFRAG's input layout [P, section 2]: the context split into k-token chunks, one embedding per chunk, and an
expanded chunk put back in place as its k ordinary token embeddings.

Chunks never cross a passage boundary (the paper chunks one retrieved context; chunking per passage is what
lets embeddings be precomputed per passage). Template, instruction, numbering and question tokens stay tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...types import CONTEXT, Prompt


@dataclass(frozen=True)
class Chunk:
    """Up to k consecutive context tokens of one passage: prompt rows [start, end), characters ``span`` of it."""

    passage: int
    start: int
    end: int
    span: tuple[int, int]
    text: str


def chunk_rows(length: int, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and end token of each k-token chunk of a run of ``length`` tokens (the last may be shorter):
    the one chunking rule of the live path and of the chunk cache, which must agree chunk for chunk."""
    firsts = torch.arange(0, length, chunk_tokens)
    return firsts, (firsts + chunk_tokens).clamp(max=length)


def chunk_offsets(offsets: list[tuple[int, int]], chunk_tokens: int) -> list[tuple[int, int, int, int]]:
    """Group token character offsets into k-token chunks: (first token, end token, char start, char end)."""
    firsts, ends = chunk_rows(len(offsets), chunk_tokens)
    return [(first, end, offsets[first][0], offsets[end - 1][1]) for first, end in zip(firsts.tolist(), ends.tolist())]


def split_context(prompt: Prompt, chunk_tokens: int) -> list[Chunk]:
    """The prompt's CONTEXT tokens cut into chunks of ``chunk_tokens``, per run of one passage, in order.

    Runs are found with tensor ops and chunk bounds per run: a loop over tokens cost 0.48 s at 128K tokens
    (8K chunks), inside REFRAG's TTFT."""
    owner = torch.where(prompt.segment == CONTEXT, prompt.passage_index, -1)
    if owner.numel() == 0:
        return []
    edges = (torch.nonzero(owner[1:] != owner[:-1]).flatten() + 1).tolist()
    chunks: list[Chunk] = []
    for start, end in zip([0] + edges, edges + [len(owner)]):
        passage = int(owner[start])
        if passage < 0:
            continue
        firsts, lasts = chunk_rows(end - start, chunk_tokens)
        firsts, lasts = firsts + start, lasts + start
        los, his = prompt.char_spans[firsts, 0].tolist(), prompt.char_spans[lasts - 1, 1].tolist()
        text = prompt.passages[passage].text
        chunks.extend(Chunk(passage, first, last, (lo, hi), text[lo:hi])
                      for first, last, lo, hi in zip(firsts.tolist(), lasts.tolist(), los, his))
    return chunks


def assemble(
    token_embeds: torch.Tensor, chunks: list[Chunk], chunk_embeds: torch.Tensor, expanded: set[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder input: the prompt's token embeddings with each compressed chunk's k rows replaced by its one
    chunk embedding; an expanded chunk keeps its token embeddings. Returns (inputs_embeds, source) where
    ``source[i]`` is the prompt row of position i, or -(c + 1) for the embedding of chunk c."""
    n = token_embeds.shape[0]
    source = torch.arange(n)
    keep = torch.ones(n, dtype=torch.bool)
    compressed = [c for c in range(len(chunks)) if c not in expanded]
    if compressed:
        starts = torch.tensor([chunks[c].start for c in compressed])
        ends = torch.tensor([chunks[c].end for c in compressed])
        inside = torch.zeros(n + 1, dtype=torch.long)  # +1 from a chunk's second row, -1 after its last
        inside.index_add_(0, starts + 1, torch.ones_like(starts))
        inside.index_add_(0, ends, -torch.ones_like(ends))
        keep = inside.cumsum(0)[:n] == 0
        source[starts] = -(torch.tensor(compressed) + 1)
    source = source[keep]
    rows = token_embeds[keep].clone()
    is_chunk = source < 0
    if is_chunk.any():
        rows[is_chunk] = chunk_embeds[(-source[is_chunk] - 1)].to(rows.dtype)
    return rows, source


def surprisal_scores(chunk_ids: list[torch.Tensor]) -> torch.Tensor:
    """The heuristic policy's cheap perplexity proxy: mean log(1 + token id) per chunk.

    [P]'s heuristic expands the chunks with the highest perplexity, which needs a decoder pass over the full
    context, the very cost REFRAG avoids. A byte-level BPE vocabulary is built by merges in order of
    frequency, so a token's id ranks its frequency; under Zipf's law -log p(token) = log(rank) + const, so the
    mean log id is a free estimate of a chunk's unigram log-perplexity (rare names and numbers score high).
    """
    if not chunk_ids:
        return torch.zeros(0)
    lengths = torch.tensor([len(ids) for ids in chunk_ids])
    owner = torch.repeat_interleave(torch.arange(len(chunk_ids)), lengths)
    logs = torch.log1p(torch.cat(chunk_ids).double())
    sums = torch.zeros(len(chunk_ids), dtype=torch.float64).index_add_(0, owner, logs)
    return torch.where(lengths > 0, sums / lengths.clamp(min=1), 0.0).float()


def expansion_count(expand: float, chunks: int) -> int:
    """p * L chunks, rounded, for an expansion fraction p in [0, 1]."""
    return min(chunks, int(math.floor(expand * chunks + 0.5)))
