"""ctxopt's attention implementation, ``GROUPED_SDPA``: the kernels it runs and its registration in transformers.

``GROUPED_SDPA`` is the attention implementation ``ctxopt.models.load_model`` asks transformers for when it
loads any model: transformers' SDPA, except for a masked forward of several new tokens against a cache of a
grouped-query model, which SDPA groups itself (CPU), or runs as lower-right causal flash attention (CUDA, half
precision).

The function registered under that name also shows each layer's query and key tensors to an observer, when
one is set for the current context (:func:`observe_queries_and_keys`). That is how ``capture.py`` reads
attention scores without a second implementation: this module knows nothing about captures.
"""
from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

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
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
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


def one_query_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """GROUPED_SDPA for ``ctxopt.decoding.FixedStep`` (one new token per row, a mask per row): the query heads
    that share a KV head attend as that head's queries, so SDPA reads each key and value once under the row's
    mask. transformers' masked SDPA copies every KV head once per query head instead (the whole cache, each layer,
    each step), and a grouped-query flag with a mask sends CUDA's SDPA to its math kernel."""
    special = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "sinks", "s_aux"))
    if dropout or special or query.shape[2] != 1:
        return grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, head_dim)  # query head h reads KV head h // groups
    mask = None if attention_mask is None else attention_mask[..., :key.shape[-2]]
    output = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


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


# ----------------------------------------------------------------------------------------------------
# The registered implementation and its observer.

# Called as observer(module, query, key, scaling) before a layer's attention, with post-RoPE tensors; it may raise to
# end the forward there.
QueryKeyObserver = Callable[[Any, torch.Tensor, torch.Tensor, float | None], None]

_OBSERVER: contextvars.ContextVar[QueryKeyObserver | None] = contextvars.ContextVar("ctxopt_observer", default=None)


@contextmanager
def observe_queries_and_keys(observer: QueryKeyObserver) -> Iterator[None]:
    """Within the block (in this context only), every layer that runs ``GROUPED_SDPA`` calls ``observer`` first."""
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


# Called like an attention function, instead of grouped SDPA, by every layer of a forward run within
# :func:`attention_override` (the shared-prefix decode of ``ctxopt.attention.shared_prefix``).
_OVERRIDE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("ctxopt_attention", default=None)


@contextmanager
def attention_override(attention: Callable) -> Iterator[None]:
    """Within the block (in this context only), every layer that runs ``GROUPED_SDPA`` computes its attention with
    ``attention(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`` -> (output, None)."""
    token = _OVERRIDE.set(attention)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def ctxopt_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, step_attention=None,
                     **kwargs):
    """The function registered as ``GROUPED_SDPA``: the context's observer (if any) sees the query and key, then
    the context's override (if any) or :func:`grouped_sdpa_attention` runs. A forward given ``step_attention=``
    (an attention function, passed through the model's keyword arguments) runs that instead and reads no context
    variable: ``torch.compile`` traces it without a break (``ctxopt.decoding.FixedStep``)."""
    if step_attention is not None:
        return step_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    observer = _OBSERVER.get()
    if observer is not None:
        observer(module, query, key, scaling)
    attention = _OVERRIDE.get() or grouped_sdpa_attention
    return attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def runs_grouped_sdpa(model) -> bool:
    """Whether every attention layer of ``model`` runs ``GROUPED_SDPA`` (so that an override reaches them all)."""
    configs = [model.config] + [c for c in [getattr(model.config, "text_config", None)] if c is not None]
    return all(config._attn_implementation == GROUPED_SDPA for config in configs)


AttentionInterface.register(GROUPED_SDPA, ctxopt_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)


def use_grouped_sdpa(model) -> None:
    """Give ``model`` the GROUPED_SDPA attention implementation if it runs transformers' SDPA now.

    For models built outside ``ctxopt.models.load_model`` (which asks ``from_pretrained`` for GROUPED_SDPA):
    random-weight models in benchmarks and tests. Uses transformers' ``set_attn_implementation``, which also
    checks that the model dispatches attention through transformers' AttentionInterface.
    """
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GROUPED_SDPA)
