"""Attention capture: the scores of the last W queries against all keys, per layer and head, post-RoPE,
exactly as the model computes them, without ever forming an n x n matrix.

ctxopt's attention implementation (``kernels.GROUPED_SDPA``) shows each layer's query and key to the current
context's observer before it runs. A capture request is such an observer: it computes the window's scores
(W x n per head) from those tensors, gives them to the request's reducer, and the layer then runs its usual
(grouped) SDPA. Memory stays O(W * n) per layer. GemFilter, SpecPC, SpecKV and SnapKV all read attention
through this one hook.

A model loaded by ``ctxopt.models.load_model`` already runs GROUPED_SDPA, so capturing changes nothing about
it. Any other model (one built by hand, one switched to eager or to transformers' own SDPA) is switched to
GROUPED_SDPA for the block, under a process-wide lock, and switched back after.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .kernels import GROUPED_SDPA, QueryKeyObserver, observe_queries_and_keys


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


def _window_scores(module, query: torch.Tensor, key: torch.Tensor, window: int) -> torch.Tensor:
    """(heads, W, n) raw q·k for the last ``window`` queries of batch item 0, GQA keys repeated."""
    q = query[0, :, -window:].float()
    k = key[0].float()
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=0)
    return q @ k.transpose(-1, -2)


def _recorder(request: AttentionCapture, configs: list) -> QueryKeyObserver:
    """The observer that records ``request``'s window for the layers of the captured model only.

    A layer belongs to the captured model when its attention module reads its implementation from one of
    ``configs`` (the module's ``config``), so another model forwarded inside the block records nothing.
    """

    def record(module, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None or not request.wants(layer):
            return
        module_config = getattr(module, "config", None)
        if not any(module_config is config for config in configs):
            return
        window = min(request.window, query.shape[2])
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        found = WindowAttention(layer, _window_scores(module, query, key, window), scale, key.shape[1])
        request.records[layer] = request.reducer(found) if request.reducer else found
        if request.stop_after is not None and layer >= request.stop_after:
            raise StopForward

    return record


# Held by a capture for the whole block while it has a model switched to GROUPED_SDPA, so that no other thread
# decides, from the switched implementation, that the model runs GROUPED_SDPA of its own.
_SWITCH_LOCK = threading.RLock()


def _configs(model) -> list:
    """The model's config and any sub-config whose attention implementation modules read."""
    configs = [model.config]
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        configs.append(text_config)
    return configs


@contextmanager
def _switched_to_grouped_sdpa(configs: list):
    """The configs' attention implementation set to GROUPED_SDPA for the block, under the lock, restored after."""
    with _SWITCH_LOCK:
        previous = [config._attn_implementation for config in configs]
        for config in configs:
            config._attn_implementation = GROUPED_SDPA
        try:
            yield
        finally:
            for config, old in zip(configs, previous):
                config._attn_implementation = old


@contextmanager
def capture_attention(model, request: AttentionCapture):
    """Within the block, forwards of ``model`` record window attention into ``request``.

    The model runs (grouped) SDPA throughout. A model that runs GROUPED_SDPA already (every model
    ``load_model`` returns) is left as it is; any other is switched to it for the block and switched back after.
    A StopForward raised by the recorder is swallowed here: the block's forward simply ends early.
    """
    configs = _configs(model)
    with _SWITCH_LOCK:  # waits while another thread has a model switched
        native = all(config._attn_implementation == GROUPED_SDPA for config in configs)
    switch = nullcontext() if native else _switched_to_grouped_sdpa(configs)
    try:
        with switch, observe_queries_and_keys(_recorder(request, configs)):
            yield request
    except StopForward:
        pass
