"""Shared steps of the cache stages that score prefix positions with a window of queries (SnapKV, SpecKV):
the window's attention weights on the prefix, centred 1-D pooling, and per-KV-head top-k selection.

Every step works on one layer's captured :class:`~ctxopt.attention.WindowAttention`, inside the capture's
reducer, so only a (kv_heads, prefix) score vector per layer outlives the forward.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..attention import WindowAttention
from ..checks import require_int
from ..errors import InputError

Pooling = Literal["max", "avg"]


def prefix_probs(record: WindowAttention, prefix: int | None = None) -> torch.Tensor:
    """softmax(Q_win K^T * scaling), causal inside the window, on keys 0..prefix-1 only:
    (heads, W, prefix). ``prefix`` defaults to every key before the window (n - W)."""
    if prefix is None:
        prefix = record.raw.shape[-1] - record.window
    return record.probs()[..., :prefix]


def pool1d(scores: torch.Tensor, kernel: int, pooling: Pooling = "max") -> torch.Tensor:
    """Centred 1-D pooling along the last axis, stride 1, same length (odd ``kernel``).

    Max pooling pads with -inf; average pooling pads with zeros counted in the mean (torch's default,
    as in kvpress and the SnapKV code).
    """
    if kernel == 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    return pool(flat, kernel_size=kernel, stride=1, padding=kernel // 2).reshape(scores.shape)


def check_lookahead(stage: str, lookahead: int | None) -> None:
    """A draft lookahead is a token count >= 0, or None (up to the run's max_new_tokens)."""
    if lookahead is not None and (isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0):
        raise InputError(f"{stage}: lookahead must be a token count >= 0 or None (up to max_new_tokens); "
                         f"got {lookahead!r}.")


def check_knobs(stage: str, window: int, kernel: int, pooling: Pooling = "max") -> None:
    """Reject a window or kernel the scoring cannot use, saying what to pass instead."""
    require_int(window, f"{stage}: window (queries in the observation window)", minimum=1)
    require_int(kernel, f"{stage}: kernel (centred pooling)", minimum=1, odd=True)
    if pooling not in ("max", "avg"):
        raise InputError(f"{stage}: pooling must be 'max' or 'avg'; got {pooling!r}.")


def select_per_head(scores: torch.Tensor, keep: int, window: torch.Tensor) -> torch.Tensor:
    """Indices for ``cache.keep_per_head``: each KV head's ``keep`` best prefix positions (ascending),
    then the ``window`` positions. ``scores`` is (kv_heads, prefix); returns (1, kv_heads, keep + W)."""
    top = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    window = window.to(top.device).expand(scores.shape[0], -1)
    return torch.cat([top, window], dim=-1).unsqueeze(0)
