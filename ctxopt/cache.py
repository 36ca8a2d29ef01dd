"""KV-cache utilities that work on transformers' Cache objects across 5.x releases, and on ctxopt's own
preallocated :class:`SlotCache`.

KV tensors live in ``cache.layers[i].keys`` / ``.values``, shaped (batch, kv_heads, seq, head_dim). A one-row
SlotCache (what ``ctxopt.decoding.prefill`` fills) answers the same functions for its row: ``layer_kv`` gives
views of the row's entries, ``crop_cache`` and ``keep_per_head`` change the row in place (a shorter length; the
kept entries moved to the front slots), so neither allocates a new cache.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

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


def _one_row(cache) -> "SlotCache | None":
    """``cache`` when it is a SlotCache (which must then hold one row), else None."""
    if not isinstance(cache, SlotCache):
        return None
    if cache.rows != 1:
        raise ValueError(f"a SlotCache of {cache.rows} rows is a decode batch, not one sequence's cache")
    return cache


def layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _one_row(cache) is not None:
        return cache.row_layers(0)[layer]
    entry = cache.layers[layer]
    return entry.keys, entry.values


def set_layer_kv(cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``layer`` of ``cache`` hold ``keys`` and ``values`` (a SlotCache's row then uses them as its slots)."""
    if _one_row(cache) is not None:
        cache.keys[layer], cache.values[layer] = keys, values
        cache.lengths[0] = keys.shape[2]
        return
    entry = cache.layers[layer]
    entry.keys, entry.values = keys, values


def num_layers(cache) -> int:
    if isinstance(cache, SlotCache):
        return cache.num_layers()
    return len(_layers(cache))


def cache_length(cache) -> int:
    """Number of positions held (per head) in the first layer."""
    return int(cache.get_seq_length()) if num_layers(cache) else 0


def kv_bytes(cache) -> int:
    """Bytes held by the key and value tensors themselves (measured from the tensors, not computed). A one-row
    SlotCache counts the entries its row holds: the free slots after them are room that the decoder does not
    copy when the request joins its batch (the prefill's buffer is released then)."""
    if _one_row(cache) is not None:
        return cache.row_bytes(0)
    total = 0
    for entry in _layers(cache):
        for tensor in (getattr(entry, "keys", None), getattr(entry, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def clone_cache(cache):
    """An independent copy (for answering several questions over one prefilled context). Each layer's keys and
    values are copied compactly: a layer that views a larger buffer (a decoder's slots) copies only its entries;
    a one-row SlotCache's copy has the same room in new slots."""
    if _one_row(cache) is not None:
        return SlotCache.holding(cache.row_layers(0), cache.capacity)
    memo = {}
    for entry in _layers(cache):
        for tensor in (getattr(entry, "keys", None), getattr(entry, "values", None)):
            if isinstance(tensor, torch.Tensor):
                memo[id(tensor)] = tensor.clone()
    return copy.deepcopy(cache, memo)


def crop_cache(cache, length: int) -> None:
    """Drop every position at index >= ``length`` in every layer (rollback of rejected tokens).

    Passes ``Cache.crop`` a negative count (tokens to remove): transformers 5.2x accepts only that, and
    5.17 reads a negative value the same way (a positive one there is the length to keep).
    """
    remove = cache_length(cache) - length
    if remove <= 0:
        return
    if _one_row(cache) is not None:
        cache.set_length(0, length)
    else:
        cache.crop(-remove)


def keep_per_head(cache, keep: list[torch.Tensor]) -> None:
    """Keep, in every layer, the positions ``keep[layer]`` (batch, kv_heads, k) for each KV head.

    Different heads may keep different positions; each layer stays rectangular (the same k per head),
    and keys keep the rotation they were stored with. In a one-row SlotCache the kept entries of each head move
    to its front slots and the row's length becomes k (the same k in every layer): nothing is allocated but the
    k gathered entries of one layer at a time, and the freed slots are room for the answer. In a transformers
    cache the old tensors are replaced by the kept entries and released, so memory shrinks.
    """
    if len(keep) != num_layers(cache):
        raise ValueError(f"need one index tensor per layer: got {len(keep)} for {num_layers(cache)} layers")
    if _one_row(cache) is not None:
        cache.compact(keep)
        return
    for layer, index in enumerate(keep):
        keys, values = layer_kv(cache, layer)
        gather = index.to(keys.device).unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        set_layer_kv(
            cache,
            layer,
            torch.gather(keys, 2, gather).contiguous(),
            torch.gather(values, 2, gather.expand(-1, -1, -1, values.shape[-1])).contiguous(),
        )


class SlotCache:
    """Preallocated key/value slots for a batch of sequences that decode together, one row per sequence.

    Layer ``l`` holds ``keys[l]`` / ``values[l]`` shaped (row capacity, kv_heads, slot capacity, head_dim). Row
    ``r`` uses its first ``lengths[r]`` slots in every layer and head (every head of a row holds the same number
    of entries, as ``keep_per_head`` leaves them, though not the same positions); the slots after them are free.
    A forward through the model (of all rows or a run of them) writes the new tokens' keys and values into the
    slots after each row's length (``update``, called by every attention layer) and reads back the slots up to the
    longest row's end, which the step's mask (``step_mask``, passed to the model as its 4-D attention mask, so
    every attention implementation honours it) limits per row to its own entries, causally among the new ones.
    ``advance`` then moves the lengths past the written slots; rolling back rejected tokens is only a smaller
    length (``set_length``), and freeing a row moves the last row into its place (one row's copy), so that the
    rows in use are always ``0 .. rows - 1``.

    Positions are not stored: keys keep the rotation they were written with, and the caller passes each new
    token's position explicitly. The slots are inference tensors (written under ``torch.inference_mode``, as
    the decode loop runs). The object stands in for a transformers ``Cache`` through the two methods the
    models call on one (``update``, ``get_seq_length``).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], rows: int = 0):
        self.keys, self.values = keys, values
        self.lengths: list[int] = [0] * rows
        self._write: tuple[torch.Tensor, torch.Tensor] | None = None  # (key index, value index) of the step
        self._span = (0, 0, 0)  # the step's first row, the row after its last, and the slots it reads
        self.unmasked = False  # whether the step's mask lets every query see every slot it reads
        self.causal = False  # whether the step's mask is plain causal (empty rows, no padding)

    # -- allocation ---------------------------------------------------------------------------------------
    @classmethod
    @torch.inference_mode()
    def like(cls, layers: list[tuple[torch.Tensor, torch.Tensor]], row_capacity: int, capacity: int) -> "SlotCache":
        """Empty slots shaped like ``layers`` ((keys, values) per layer, any batch and length)."""
        keys = [k.new_zeros(row_capacity, k.shape[1], capacity, k.shape[3]) for k, _ in layers]
        values = [v.new_zeros(row_capacity, v.shape[1], capacity, v.shape[3]) for _, v in layers]
        return cls(keys, values)

    @classmethod
    def holding(cls, layers: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> "SlotCache":
        """A one-row cache holding a copy of one sequence's ``layers`` in ``capacity`` slots."""
        cache = cls.like(layers, 1, 0)
        cache.add_row(layers, capacity)
        return cache

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def row_capacity(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def num_layers(self) -> int:
        return len(self.keys)

    @torch.inference_mode()
    def reserve(self, rows: int, capacity: int) -> None:
        """Make room for ``rows`` rows of ``capacity`` slots (reallocates, copying the rows in use, when short)."""
        if rows <= self.row_capacity and capacity <= self.capacity:
            return
        new_rows, new_capacity = max(rows, self.row_capacity), max(capacity, self.capacity)
        used = self.rows
        for layer in range(len(self.keys)):
            for tensors in (self.keys, self.values):
                old = tensors[layer]
                grown = old.new_zeros(new_rows, old.shape[1], new_capacity, old.shape[3])
                grown[:used, :, :old.shape[2]] = old[:used]
                tensors[layer] = grown

    @torch.inference_mode()
    def add_row(self, layers: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> int:
        """Copy one sequence's keys and values ((1, kv_heads, length, head_dim) per layer) into a new row with
        room for ``capacity`` slots in all; returns the row."""
        if len(layers) != len(self.keys):
            raise ValueError(f"need {len(self.keys)} layers, got {len(layers)}")
        length = layers[0][0].shape[2] if layers else 0
        if any(k.shape[2] != length or v.shape[2] != length for k, v in layers):
            raise ValueError("every layer of a sequence must hold the same number of entries")
        row = self.rows
        self.reserve(row + 1, max(capacity, length))
        for layer, (k, v) in enumerate(layers):
            self.keys[layer][row, :, :length] = k[0]
            self.values[layer][row, :, :length] = v[0]
        self.lengths.append(length)
        return row

    @torch.inference_mode()
    def remove_row(self, row: int) -> None:
        """Free ``row``: the last row moves into its place (the caller renumbers that row to ``row``)."""
        last = self.rows - 1
        if row != last:
            length = self.lengths[last]
            for tensors in (self.keys, self.values):
                for buffer in tensors:
                    buffer[row, :, :length] = buffer[last, :, :length]
            self.lengths[row] = length
        self.lengths.pop()

    @property
    def layers(self) -> list[SimpleNamespace]:
        """Row 0's entries per layer as ``.keys`` / ``.values`` views, read as a transformers cache's layers are (a
        one-row cache; setting them changes nothing: use ``set_layer_kv``)."""
        _one_row(self)
        return [SimpleNamespace(keys=k, values=v) for k, v in self.row_layers(0)]

    @classmethod
    def for_model(cls, model, capacity: int) -> "SlotCache":
        """One empty row of ``capacity`` slots per layer, shaped for ``model`` (its KV heads, head size, dtype and
        device), for a prefill to write into."""
        config = getattr(model.config, "text_config", None) or model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        param = next(model.parameters())
        with torch.inference_mode():
            keys = [torch.zeros(1, heads, capacity, head_dim, dtype=param.dtype, device=param.device)
                    for _ in range(config.num_hidden_layers)]
            values = [torch.zeros_like(k) for k in keys]
        return cls(keys, values, rows=1)

    @torch.inference_mode()
    def compact(self, keep: list[torch.Tensor], row: int = 0) -> None:
        """Keep, in every layer, the entries ``keep[layer]`` (1, kv_heads, k) of each KV head of ``row``, moved to
        the row's first k slots in that order; the row's length becomes k (cache stages: SnapKV, SpecKV)."""
        sizes = {index.shape[-1] for index in keep}
        if len(sizes) != 1:
            raise ValueError(f"every layer must keep the same number of entries per head; got {sorted(sizes)}")
        k = sizes.pop()
        length = self.lengths[row]
        for layer, index in enumerate(keep):
            if int(index.max()) >= length:
                raise ValueError(f"layer {layer} keeps entry {int(index.max())} of a row of {length} entries")
            for tensors in (self.keys, self.values):
                buffer = tensors[layer]
                gather = index.to(buffer.device).unsqueeze(-1).expand(-1, -1, -1, buffer.shape[-1])
                buffer[row:row + 1, :, :k] = torch.gather(buffer[row:row + 1, :, :length], 2, gather)
        self.lengths[row] = k

    def set_length(self, row: int, length: int) -> None:
        """Keep the first ``length`` entries of ``row`` (rollback: no copy, the slots after it are reused)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} entries; cannot set its length to {length}")
        self.lengths[row] = length

    def row_layers(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The entries of ``row`` per layer, as (1, kv_heads, length, head_dim) views of the slots."""
        length = self.lengths[row]
        return [(k[row:row + 1, :, :length], v[row:row + 1, :, :length]) for k, v in zip(self.keys, self.values)]

    def row_bytes(self, row: int) -> int:
        """Bytes of the entries ``row`` holds (its length of slots in every layer, keys and values)."""
        length = self.lengths[row]
        return sum(t[0, :, :length].numel() * t.element_size() for ts in (self.keys, self.values) for t in ts)

    def nbytes(self) -> int:
        """Bytes of the preallocated slots."""
        return sum(t.numel() * t.element_size() for ts in (self.keys, self.values) for t in ts)

    # -- one forward ------------------------------------------------------------------------------------------
    def step_mask(self, counts: list[int], width: int, start: int = 0) -> torch.Tensor:
        """Prepare a forward of rows ``start .. start + len(counts) - 1`` that feeds ``width`` tokens to each, the
        last ``counts[i]`` of them real and the ones before padding (left padding, so that every row's last
        token is at the end). Returns the boolean attention mask (rows, 1, width, extent): real token j of a
        row sees the row's entries and its real tokens up to j; a padding token sees only itself. Real tokens
        are written after the row's entries, padding after those (slots that stay free)."""
        stop = start + len(counts)
        if not 0 <= start < stop <= self.rows:
            raise ValueError(f"rows {start}..{stop - 1} are not all in use ({self.rows} rows)")
        device = self.keys[0].device
        lengths = self.lengths[start:stop]
        extent = max(lengths) + width
        if extent > self.capacity:
            raise ValueError(f"a step to {extent} slots passes the capacity ({self.capacity}); reserve first")
        held = torch.tensor(lengths, device=device)[:, None]
        real = torch.tensor(counts, device=device)[:, None]
        window = torch.arange(width, device=device)
        index = window - (width - real)  # (rows, width): the real token's index, negative for padding
        is_real = index >= 0
        slots = torch.where(is_real, held + index, held + real + window)
        seen = torch.arange(extent, device=device)
        mask = (seen <= slots[..., None]) & (is_real[..., None] | (seen == slots[..., None]))
        heads, key_dim = self.keys[0].shape[1], self.keys[0].shape[3]
        value_heads, value_dim = self.values[0].shape[1], self.values[0].shape[3]
        slots = slots[:, None, :, None]
        self._write = (slots.expand(-1, heads, -1, key_dim), slots.expand(-1, value_heads, -1, value_dim))
        self._span = (start, stop, extent)
        # Every query sees every slot read (one new token per row, all rows equally long): attention needs no mask.
        self.unmasked = width == 1 and min(lengths) == max(lengths)
        # Every row starts empty and is fed no padding (a prefill): the mask is plain causal.
        self.causal = max(lengths) == 0 and min(counts) == width
        return mask[:, None]

    def fixed_step_mask(self, lengths: torch.Tensor) -> torch.Tensor:
        """Prepare a decode step of fixed shapes: one new token for each of rows ``0 .. len(lengths) - 1``, written
        at slot ``lengths[r]`` and reading every slot of the capacity, the mask (rows, 1, 1, capacity) allowing
        each row its own entries and the new one. ``lengths`` is a tensor on the cache's device and nothing here
        reads its values on the host, so a step prepared this way has the same shapes and work at every call (a
        CUDA graph replays it; ``ctxopt.decoding.FixedStep``). The host's ``lengths`` are not read either: the
        caller checks that the slots fit and calls ``advance`` after the forward."""
        rows = lengths.shape[0]
        slots = lengths.view(rows, 1, 1, 1)
        heads, key_dim = self.keys[0].shape[1], self.keys[0].shape[3]
        value_heads, value_dim = self.values[0].shape[1], self.values[0].shape[3]
        self._write = (slots.expand(-1, heads, 1, key_dim), slots.expand(-1, value_heads, 1, value_dim))
        self._span = (0, rows, self.capacity)
        self.unmasked = self.causal = False
        seen = torch.arange(self.capacity, device=lengths.device)
        return (seen <= lengths[:, None])[:, None, None, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's keys and values after each row's entries; return the slots the step reads."""
        start, stop, extent = self._span
        keys, values = self.keys[layer_idx][start:stop], self.values[layer_idx][start:stop]
        keys.scatter_(2, self._write[0], key_states.to(keys.dtype))
        values.scatter_(2, self._write[1], value_states.to(values.dtype))
        return keys[:, :, :extent], values[:, :, :extent]

    def advance(self, counts: list[int], start: int = 0) -> None:
        """After the forward: rows ``start ..`` hold their ``counts`` real new entries."""
        for i, count in enumerate(counts):
            self.lengths[start + i] += count
        self._write = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths, default=0)
