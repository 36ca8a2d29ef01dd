"""How ctxopt's models compute and expose attention, split by job:

- ``kernels``: ``GROUPED_SDPA``, the attention implementation every model ``ctxopt.models.load_model`` returns
  runs (transformers' SDPA without the per-head copy of the cache on masked grouped-query forwards), its
  registration in transformers, and the per-context observer of queries and keys it calls;
- ``capture``: attention capture (``capture_attention``, ``AttentionCapture``, ``WindowAttention``), the window
  of scores GemFilter, SpecPC, SpecKV and SnapKV read, taken through that observer.
"""
from .capture import (
    AttentionCapture,
    Reducer,
    StopForward,
    WindowAttention,
    capture_attention,
)
from .kernels import (
    GROUPED_SDPA,
    grouped_sdpa_attention,
    is_lower_right_causal,
    lower_right_causal_attention,
    observe_queries_and_keys,
    use_grouped_sdpa,
)

__all__ = [
    "GROUPED_SDPA",
    "AttentionCapture",
    "Reducer",
    "StopForward",
    "WindowAttention",
    "capture_attention",
    "grouped_sdpa_attention",
    "is_lower_right_causal",
    "lower_right_causal_attention",
    "observe_queries_and_keys",
    "use_grouped_sdpa",
]
