"""Attention capture and ctxopt's SDPA attention implementation; everything still lives in ``capture``, this
package re-exports what the rest of ctxopt imports."""
from .capture import (  # noqa: F401 (re-exports)
    CAPTURE_IMPLEMENTATION,
    GROUPED_SDPA,
    AttentionCapture,
    Reducer,
    StopForward,
    WindowAttention,
    capture_attention,
    grouped_sdpa_attention,
    is_lower_right_causal,
    lower_right_causal_attention,
    use_grouped_sdpa,
)
