"""Shared steps of the token stages that keep a scored subset of the prompt (GemFilter, SpecPC): smoothing
a score vector, ranking it, growing ranked positions into neighbourhoods, and filling a token budget in rank
order.

Every function here is pure tensor work on 1-D score or index vectors, so each can be tested by hand.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..types import CONTEXT, Prompt


def first_occurrences(indices: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the entries of 1-D ``indices`` that are the first of their value."""
    mask = torch.zeros(len(indices), dtype=torch.bool, device=indices.device)
    if len(indices) == 0:
        return mask
    _, inverse = torch.unique(indices, return_inverse=True)
    order = torch.arange(len(indices), device=indices.device)
    first = torch.full((int(inverse.max()) + 1,), len(indices), device=indices.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    mask[first] = True
    return mask


def unique_in_order(indices: torch.Tensor) -> torch.Tensor:
    """``indices`` without repeats, each value where it first occurs (pandas.unique, not torch.unique)."""
    return indices[first_occurrences(indices)]


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Positions by score, highest first; ties go to the earlier position (a stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices


def average_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Centred 1-D mean, stride 1, zero padding of kernel // 2 counted in the mean (``F.avg_pool1d``'s
    default ``count_include_pad=True``): an edge position is divided by ``kernel`` too. Odd ``kernel``."""
    if kernel == 1:
        return scores
    return F.avg_pool1d(scores.view(1, 1, -1), kernel_size=kernel, stride=1, padding=kernel // 2).view(-1)


def centred_max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Centred 1-D max, stride 1, same length, any ``kernel``: position i sees i - (kernel-1)//2 ..
    i + kernel//2 (an even kernel reaches one further right), zero padding past both ends."""
    if kernel == 1:
        return scores
    left = (kernel - 1) // 2
    padded = F.pad(scores.view(1, 1, -1), (left, kernel - 1 - left), value=0.0)
    return F.max_pool1d(padded, kernel_size=kernel, stride=1).view(-1)


def neighbour_offsets(span: int) -> torch.Tensor:
    """The ``span`` offsets -(span-1)//2 .. span//2 around a position, nearest first, left before right."""
    offsets = torch.arange(-((span - 1) // 2), span // 2 + 1)
    return offsets[torch.sort(offsets.abs(), stable=True).indices]


def expand_neighbours(ranked: torch.Tensor, span: int, n: int) -> torch.Tensor:
    """Each ranked position followed by its neighbours (nearest first), clamped to 0..n-1, repeats dropped,
    rank order kept."""
    grown = (ranked.unsqueeze(-1) + neighbour_offsets(span).to(ranked.device)).clamp_(0, n - 1)
    return unique_in_order(grown.flatten())


def forced_tokens(prompt: Prompt, keep_question: bool, budget: int, stage: str) -> torch.Tensor:
    """With ``keep_question``, the indices of the tokens that are not context (template, instruction,
    question), ascending, which must fit the budget; otherwise none."""
    if not keep_question:
        return torch.zeros(0, dtype=torch.long)
    forced = (prompt.segment != CONTEXT).nonzero().flatten()
    if len(forced) > budget:
        raise InputError(
            f"{stage}: budget {budget} is smaller than the {len(forced)} template/question tokens that "
            "keep_question=True keeps; pass a larger budget or keep_question=False."
        )
    return forced


def fill_budget(ordered: Sequence[torch.Tensor], budget: int) -> torch.Tensor:
    """The first ``budget`` distinct indices of the concatenated ``ordered`` pieces, sorted ascending."""
    picked = unique_in_order(torch.cat([piece.flatten().cpu() for piece in ordered]))
    return torch.sort(picked[:budget]).values
