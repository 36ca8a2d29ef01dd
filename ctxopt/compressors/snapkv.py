"""SnapKV: keep, per KV head, the prefix positions the prompt's last queries attend to most.

Paper: "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv 2404.14469) [P];
code: FasterDecoding/SnapKV [C]; the kvpress ``SnapKVPress`` [K] is the reference implementation most
baselines use.

1. During the prefill, capture the softmax attention of the last ``window`` prompt queries (the observation
   window) over all keys, causal inside the window, in every layer, and keep only the prefix columns. [P][C]
2. Average over the window's queries. [K] (the SnapKV code sums; the ranking is the same)
3. Pool along positions with kernel 5, centred, stride 1 (the paper's clustering step [P]): max pooling
   here, as the issue reads the paper. kvpress, and the SnapKV code by default, pool by average
   (``pooling="avg"`` reproduces them).
4. Average over each KV head's group of query heads (GQA), after pooling, as kvpress does. [K]
5. Keep each KV head's top (budget - window) prefix positions plus the whole window. [P][C]

Positions are untouched: the pruned cache keeps the original rotations, the next token goes at position n,
and the full prefill's logits still predict the first answer token.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..attention import AttentionCapture, WindowAttention
from ..cache import cache_length, keep_per_head, num_layers
from ..decoding import Prefill
from ..errors import InputError
from ..stages import CacheStage, Run, tokens_to_keep
from ..types import Prompt
from .scoring import Pooling, check_knobs, pool1d, prefix_probs, select_per_head


def snapkv_scores(record: WindowAttention, kernel: int, pooling: Pooling) -> torch.Tensor:
    """One layer's SnapKV scores of the prefix positions, (kv_heads, n - W): steps 1-4."""
    per_head = pool1d(prefix_probs(record).mean(dim=1), kernel, pooling)
    return record.group_heads(per_head).mean(dim=1)


@dataclass
class SnapKV(CacheStage):
    """Prune the prefilled cache to ``budget`` positions per KV head (a token count, or a ratio of the prompt)."""

    budget: int | float = 1024
    window: int = 64
    kernel: int = 5
    pooling: Pooling = "max"

    name = "snapkv"

    def __post_init__(self) -> None:
        check_knobs(self.name, self.window, self.kernel, self.pooling)

    def attention_request(self, prompt: Prompt, run: Run) -> AttentionCapture | None:
        if tokens_to_keep(self.name, self.budget, len(prompt), run, self.window, note=False) is None:
            return None
        reducer = partial(snapkv_scores, kernel=self.kernel, pooling=self.pooling)
        return AttentionCapture(window=self.window, reducer=reducer)

    def compress(self, state: Prefill, prompt: Prompt, run: Run, capture: AttentionCapture | None) -> Prefill:
        keep = tokens_to_keep(self.name, self.budget, len(prompt), run, self.window, "cache kept whole")
        if keep is None:
            return state
        if capture is None:
            raise InputError(
                "snapkv: no attention was captured; run the prefill under attention_request() (the Pipeline does)."
            )
        n = cache_length(state.cache)
        layers = num_layers(state.cache)
        scores = [capture.records.get(layer) for layer in range(layers)]
        if any(s is None or s.shape[-1] != n - self.window for s in scores):
            raise InputError(
                f"snapkv: the capture does not cover the last {self.window} queries of all {layers} layers "
                "(a prefill chunk shorter than the window?); use a prefill chunk of at least the window."
            )
        window = torch.arange(n - self.window, n)
        keep_per_head(state.cache, [select_per_head(s, keep - self.window, window) for s in scores])
        return state
