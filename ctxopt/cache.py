"""KV-cache utilities that work on transformers' Cache objects across 5.x releases.

KV tensors live in ``cache.layers[i].keys`` / ``.values``, shaped (batch, kv_heads, seq, head_dim).
"""
from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


def new_cache(model) -> DynamicCache:
    """An empty dynamic cache laid out for ``model`` (sliding-window layers included)."""
    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


def _layers(cache) -> list:
    return list(getattr(cache, "layers", []))


def layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    entry = cache.layers[layer]
    return entry.keys, entry.values


def set_layer_kv(cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    entry = cache.layers[layer]
    entry.keys, entry.values = keys, values


def num_layers(cache) -> int:
    return len(_layers(cache))


def cache_length(cache) -> int:
    """Number of positions held (per head) in the first layer."""
    return int(cache.get_seq_length()) if num_layers(cache) else 0


def kv_bytes(cache) -> int:
    """Bytes held by the key and value tensors themselves (measured from the tensors, not computed)."""
    total = 0
    for entry in _layers(cache):
        for tensor in (getattr(entry, "keys", None), getattr(entry, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def clone_cache(cache):
    """An independent copy (for answering several questions over one prefilled context)."""
    return copy.deepcopy(cache)


def crop_cache(cache, length: int) -> None:
    """Drop every position at index >= ``length`` in every layer (rollback of rejected tokens).

    Passes ``Cache.crop`` a negative count (tokens to remove): transformers 5.2x accepts only that, and
    5.17 reads a negative value the same way (a positive one there is the length to keep).
    """
    remove = cache_length(cache) - length
    if remove > 0:
        cache.crop(-remove)


def keep_per_head(cache, keep: list[torch.Tensor]) -> None:
    """Keep, in every layer, the positions ``keep[layer]`` (batch, kv_heads, k) for each KV head.

    Different heads may keep different positions; each layer stays rectangular (the same k per head),
    and keys keep the rotation they were stored with. The old tensors are released, so memory shrinks.
    """
    if len(keep) != num_layers(cache):
        raise ValueError(f"need one index tensor per layer: got {len(keep)} for {num_layers(cache)} layers")
    for layer, index in enumerate(keep):
        keys, values = layer_kv(cache, layer)
        gather = index.to(keys.device).unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        set_layer_kv(
            cache,
            layer,
            torch.gather(keys, 2, gather).contiguous(),
            torch.gather(values, 2, gather.expand(-1, -1, -1, values.shape[-1])).contiguous(),
        )
