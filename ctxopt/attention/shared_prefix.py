"""Shared-prefix attention for a batch of sequences that continue one prefix (Hydragen, Juravsky et al. 2024,
arXiv 2402.05099): ``ask_many``'s questions after one context.

The prefix's keys and values are held once, (1, kv_heads, P, head_dim) per layer; each sequence's own entries
(its question, its answer so far) sit in its row of a :class:`ctxopt.cache.SlotCache`. Attention of a query over
prefix + own keys is split in two [H, section 3]:

- prefix: the queries of ALL sequences against the prefix keys, one matrix-matrix product per KV head (the
  sequences' queries, and a grouped-query model's query heads of one KV head, side by side as the rows), where
  attending each sequence to its own copy of the prefix would be a matrix-vector product per sequence;
- suffix: each sequence's queries against its own entries, under the batch step's mask.

Each part is a softmax over its own keys; with the log-sum-exp of their scores, lse_p and lse_s, the attention
over all keys is  o = o_p * exp(lse_p - lse) + o_s * exp(lse_s - lse),  lse = log(exp(lse_p) + exp(lse_s)) --
the same numbers as attention over the concatenated keys, up to rounding.

Deviations from the paper: one level of sharing (Hydragen's hierarchical sharing, a tree of prefixes, is not
done); each part is computed with plain matrix products and a softmax that materialise the scores (the paper
uses flash-attention kernels that return the log-sum-exp); the prefix part is chunked over the prefix keys
(``PREFIX_CHUNK``) to bound the scores' memory, each chunk combined the same way. Like the paper, the
decomposition is used for every forward after the prefix: the questions' own prefill and every decode step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import layer_kv, num_layers

# Prefix keys per block of the prefix part's scores: (kv_heads, sequences x groups x queries, PREFIX_CHUNK) floats.
PREFIX_CHUNK = 8192


@dataclass
class SharedPrefix:
    """The prefix every row of a batch continues: keys and values per layer, (1, kv_heads, P, head_dim), held once."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def from_cache(cls, cache) -> "SharedPrefix":
        """The layers of a prefilled cache of one sequence (a one-row SlotCache or a transformers cache), without
        copying them."""
        layers = [layer_kv(cache, layer) for layer in range(num_layers(cache))]
        return cls([keys for keys, _ in layers], [values for _, values in layers])

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def empty_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero-length (keys, values) shaped like the prefix's, for a row that holds nothing yet."""
        return [(k[:, :, :0], v[:, :, :0]) for k, v in zip(self.keys, self.values)]

    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """An attention function (``ctxopt.attention.kernels.attention_override``) over this prefix followed by
        each row's own ``key`` / ``value`` under ``attention_mask`` (boolean, rows x 1 x queries x keys)."""
        if dropout:
            raise ValueError("shared-prefix attention runs inference only (dropout 0)")
        layer = module.layer_idx
        output = combined_attention(query, self.keys[layer], self.values[layer], key, value, attention_mask, scaling)
        return output.transpose(1, 2).contiguous(), None


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(rows, heads, q, d) -> (rows, kv_heads, groups * q, d): the query heads that share a KV head side by side
    (transformers' grouping: query head h reads KV head h // groups)."""
    rows, heads, q, dim = query.shape
    return query.reshape(rows, kv_heads, heads // kv_heads * q, dim)


def _part(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted values and the scores' log-sum-exp (float32), over the last dimension."""
    scores = scores.float()
    lse = torch.logsumexp(scores, -1, keepdim=True)
    weights = torch.exp(scores - lse).to(values.dtype)
    return torch.matmul(weights, values).float(), lse


def _merge(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]):
    """Attention over the keys of two parts, from each part's output and log-sum-exp."""
    (out_a, lse_a), (out_b, lse_b) = first, second
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse) + out_b * torch.exp(lse_b - lse), lse


def combined_attention(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (rows, heads, q, d) over the shared prefix (1, kv_heads, P, d) and then each row's own
    ``keys`` / ``values`` (rows, kv_heads, K, d) where ``mask`` (rows, 1, q, K) allows. Returns (rows, heads, q, dv)."""
    rows, heads, q, dim = query.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = _grouped(query, kv_heads)  # (rows, kv_heads, groups * q, d)
    # Prefix: every row's queries of one KV head as the rows of one matrix, against the prefix keys held once.
    stacked = grouped.transpose(0, 1).reshape(kv_heads, rows * groups * q, dim)
    prefix = None
    for lo in range(0, prefix_keys.shape[2], PREFIX_CHUNK):
        chunk = slice(lo, lo + PREFIX_CHUNK)
        scores = torch.matmul(stacked, prefix_keys[0, :, chunk].transpose(-1, -2)) * scale
        part = _part(scores, prefix_values[0, :, chunk])
        prefix = part if prefix is None else _merge(prefix, part)
    if prefix is None:
        raise ValueError("the shared prefix is empty")
    out_p, lse_p = (t.reshape(kv_heads, rows, groups * q, -1).transpose(0, 1) for t in prefix)
    # Suffix: each row's queries against its own entries, as the mask allows.
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scale  # (rows, kv_heads, groups * q, K)
    allowed = mask[:, :, None].expand(rows, 1, groups, q, mask.shape[-1]).reshape(rows, 1, groups * q, -1)
    suffix = _part(scores.masked_fill(~allowed, float("-inf")), values)
    out, _ = _merge((out_p, lse_p), suffix)
    return out.reshape(rows, heads, q, -1).to(query.dtype)
