"""What one target forward of k new tokens costs on a prefilled cache: a RAPID round's verification next to a
plain decode step. Used by ``benchmarks/rapid_eval.py --forward-costs`` (CPU, real models) and
``benchmarks/gpu_speed.py`` (H200, random 8B-shaped weights)."""
from __future__ import annotations

import statistics
import time

import torch

from ..attention import GROUPED_SDPA
from ..cache import cache_length, crop_cache
from ..decoding import Prefill, forward


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_costs(lm, state: Prefill, sizes=(1, 2, 5, 11), repeats: int = 3) -> dict[str, dict[int, float]]:
    """Median seconds of one forward of k random new tokens on ``state``'s cache (cropped back after each),
    per attention implementation (transformers' SDPA, ctxopt's GROUPED_SDPA) and k."""
    length = cache_length(state.cache)
    vocab = lm.config.get_text_config(decoder=True).vocab_size
    config, device = lm.model.config, lm.model.device
    original = config._attn_implementation
    costs: dict[str, dict[int, float]] = {}
    try:
        for implementation in ("sdpa", GROUPED_SDPA):
            config._attn_implementation = implementation
            costs[implementation] = {}
            for k in sizes:
                times = []
                for _ in range(repeats):
                    ids = torch.randint(0, vocab, (k,))
                    _synchronize(device)
                    tick = time.perf_counter()
                    with torch.inference_mode():
                        forward(lm.model, ids, positions=torch.arange(length, length + k), cache=state.cache,
                                logits_to_keep=k)
                    _synchronize(device)
                    times.append(time.perf_counter() - tick)
                    crop_cache(state.cache, length)
                costs[implementation][k] = statistics.median(times)
    finally:
        config._attn_implementation = original
    return costs


def forward_costs_table(costs: dict[str, dict[int, float]], length: int, repeats: int = 3) -> str:
    """Markdown of :func:`forward_costs`' result for a cache of ``length`` tokens."""
    sizes = list(next(iter(costs.values())))
    lines = [f"cache {length} tokens; median of {repeats} forwards, seconds", "",
             "| attention | " + " | ".join(f"k={k}" for k in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for implementation, by_size in costs.items():
        lines.append(f"| {implementation} | " + " | ".join(f"{by_size[k]:.3f}" for k in sizes) + " |")
    return "\n".join(lines)
