"""Attention capture: the scores of the last W queries against all keys, per layer and head, post-RoPE,
exactly as the model computes them, without ever forming an n x n matrix.

A named attention function is registered in transformers' AttentionInterface. It computes the window's
scores (W x n per head) from the query and key tensors it is handed, gives them to the request's reducer,
and then runs ordinary SDPA. Memory stays O(W * n) per layer. GemFilter, SpecPC, SpecKV and SnapKV all
read attention through this one hook.

It also holds ``GROUPED_SDPA``, the attention implementation ``ctxopt.models.load_model`` gives every model:
transformers' SDPA, except for a masked forward of several new tokens against a cache of a grouped-query
model, which SDPA groups itself (CPU), or runs as lower-right causal flash attention (CUDA, half precision).
"""
from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

CAPTURE_IMPLEMENTATION = "ctxopt_capture"
GROUPED_SDPA = "ctxopt_sdpa"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, changed for a MASKED forward of a grouped-query model.

    transformers passes ``enable_gqa`` to SDPA only when there is no mask (a mask sends CUDA's grouped
    kernel to the math fallback) and otherwise copies every key and value head once per query head. A forward
    of several new tokens against a cache always has a mask -- RAPID's verification of gamma drafts, a
    chunked prefill -- so that copy of the whole cache, per layer per forward, is paid every time
    (Qwen2.5-Coder-1.5B, 6 query heads per KV head, 8K cache, 2 CPU threads: a 5-token forward 3.47 s with
    the copy, 2.38 s without; benchmarks/RESULTS.md). CPU SDPA groups masked queries natively, so there it is
    asked to. On CUDA in half precision, a mask that is plain lower-right causal (new tokens after a cache, no
    padding, no sliding window) becomes :func:`lower_right_causal_attention`. Everything else is
    transformers' path.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    special = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "sinks", "s_aux"))
    if attention_mask is None or groups == 1 or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.device.type == "cpu":
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask[..., : key.shape[-2]], dropout_p=dropout, scale=scaling,
            enable_gqa=True,
        )
        return output.transpose(1, 2).contiguous(), None
    if query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0 \
            and is_lower_right_causal(attention_mask, key.shape[-2]):
        return lower_right_causal_attention(query, key, value, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def lower_right_causal_attention(query, key, value, scaling=None) -> torch.Tensor:
    """Attention of q new tokens that follow a cache: query i sees keys 0 .. n - q + i. Given to SDPA as torch's
    lower-right ``CausalBias`` with its own GQA grouping, so CUDA runs flash attention with no mask and no copy
    of the cache (transformers copies every key and value head per query head when a mask is present: on an
    H200 with an 8B-shaped model and a 128K cache an 11-token forward cost 0.30 s, a 1-token one 0.065 s).
    Returns (batch, q, heads, head_dim) like transformers' attention functions."""
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(query.shape[-2], key.shape[-2])
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
    )
    return output.transpose(1, 2).contiguous()


_CHECKED_MASK = threading.local()  # the last mask checked (a weak reference), its key count and the answer


def is_lower_right_causal(mask: torch.Tensor, keys: int) -> bool:
    """Whether a boolean batch-1 mask lets each of its q queries see exactly the keys up to its own slot, the last
    q of ``keys``: all of the cache before them, and causally among themselves -- the mask transformers builds
    for new tokens after a cache without padding or a sliding window. One reduction, remembered for the mask
    object itself, which transformers hands to every layer of one forward."""
    last = getattr(_CHECKED_MASK, "last", None)
    if last is not None and last[0]() is mask and last[1] == keys:
        return last[2]
    queries = mask.shape[-2]
    answer = False
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] == 1 and 1 < queries < keys \
            and mask.shape[-1] >= keys:
        prefix = keys - queries
        own = torch.ones(queries, queries, dtype=torch.bool, device=mask.device).tril()
        answer = bool(mask[..., :prefix].all() & (mask[..., prefix:keys] == own).all())
    _CHECKED_MASK.last = (weakref.ref(mask), keys, answer)
    return answer


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)


@dataclass
class WindowAttention:
    """The last ``W`` queries of one forward against all ``n`` keys of one layer.

    ``raw`` is q·k (no scaling), shape (heads, W, n), float32, with keys repeated over GQA groups.
    The window's queries sit at the last W key positions, so query i may see keys j <= n - W + i.
    """

    layer: int
    raw: torch.Tensor
    scaling: float
    num_kv_heads: int

    @property
    def window(self) -> int:
        return self.raw.shape[1]

    def causal_mask(self) -> torch.Tensor:
        """True where query i may not attend key j (the future inside the window)."""
        w, n = self.raw.shape[1], self.raw.shape[2]
        rows = torch.arange(w, device=self.raw.device).unsqueeze(1) + (n - w)
        return torch.arange(n, device=self.raw.device).unsqueeze(0) > rows

    def probs(self) -> torch.Tensor:
        """softmax(q k^T * scaling) with the window's causal mask: the attention weights the model uses."""
        logits = (self.raw * self.scaling).masked_fill(self.causal_mask(), float("-inf"))
        return torch.softmax(logits, dim=-1)

    def group_heads(self, scores: torch.Tensor) -> torch.Tensor:
        """(heads, ...) -> (kv_heads, group, ...), grouping query heads that share a KV head."""
        return scores.view(self.num_kv_heads, -1, *scores.shape[1:])


Reducer = Callable[[WindowAttention], Any]


class StopForward(Exception):
    """Raised inside the forward once the last requested layer is captured (GemFilter runs layers 0..r)."""


@dataclass
class AttentionCapture:
    """What to capture: the last ``window`` queries at ``layers`` (None = all), reduced by ``reducer``.

    ``records[layer]`` holds the reducer's output for the latest forward that reached that layer (a chunked
    prefill overwrites earlier chunks, so the record is the prompt's end). ``stop_after`` ends the
    forward right after that layer's attention scores are taken.
    """

    window: int
    layers: Iterable[int] | None = None
    reducer: Reducer | None = None
    stop_after: int | None = None
    records: dict[int, Any] = field(default_factory=dict)

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in set(self.layers)


_ACTIVE: contextvars.ContextVar[AttentionCapture | None] = contextvars.ContextVar("ctxopt_capture", default=None)


def _window_scores(module, query: torch.Tensor, key: torch.Tensor, window: int) -> torch.Tensor:
    """(heads, W, n) raw q·k for the last ``window`` queries of batch item 0, GQA keys repeated."""
    q = query[0, :, -window:].float()
    k = key[0].float()
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=0)
    return q @ k.transpose(-1, -2)


def _capturing_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA, plus the window's scores for the active capture request (if any wants this layer)."""
    request = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if request is not None and layer is not None and request.wants(layer):
        window = min(request.window, query.shape[2])
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        record = WindowAttention(layer, _window_scores(module, query, key, window), scale, key.shape[1])
        request.records[layer] = request.reducer(record) if request.reducer else record
        if request.stop_after is not None and layer >= request.stop_after:
            raise StopForward
    return grouped_sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPLEMENTATION, sdpa_mask)

_SWITCH_LOCK = threading.RLock()


def _configs(model) -> list:
    """The model's config and any sub-config whose attention implementation modules read."""
    configs = [model.config]
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        configs.append(text_config)
    return configs


@contextmanager
def capture_attention(model, request: AttentionCapture):
    """Within the block, forwards of ``model`` record window attention into ``request``.

    The model runs (grouped) SDPA throughout; only the registered wrapper is swapped in, and swapped back after.
    A StopForward raised by the wrapper is swallowed here: the block's forward simply ends early.
    """
    with _SWITCH_LOCK:
        configs = _configs(model)
        previous = [c._attn_implementation for c in configs]
        token = _ACTIVE.set(request)
        for config in configs:
            config._attn_implementation = CAPTURE_IMPLEMENTATION
        try:
            yield request
        except StopForward:
            pass
        finally:
            for config, old in zip(configs, previous):
                config._attn_implementation = old
            _ACTIVE.reset(token)


def use_grouped_sdpa(model) -> None:
    """Give ``model`` the GROUPED_SDPA attention implementation if it runs transformers' SDPA now."""
    for config in _configs(model):
        if config._attn_implementation == "sdpa":
            config._attn_implementation = GROUPED_SDPA
