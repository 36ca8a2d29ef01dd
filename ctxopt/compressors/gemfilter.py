"""GemFilter: keep the prompt tokens an early layer's last query points at, then run the model on those only.

Paper: "Discovering the Gems in Early Layers" (arXiv 2409.17422) [P]; code: SalesforceAIResearch/GemFilter [C].

1. Run layers 0..r over the whole prompt, no KV cache; the forward stops inside layer r's attention. [P][C]
2. Score each token by the raw dot product of layer r's post-RoPE query of the LAST prompt token with its
   post-RoPE key (GQA keys repeated), summed over all query heads; no softmax, no 1/sqrt(d). [C]
3. Smooth the scores with a 1-D mean, kernel 5, stride 1, padding 2, zero padding counted in the mean
   (``F.avg_pool1d`` defaults, as [C] calls it). [C]
4. Keep the top k = min(budget, n) positions, in their original order. [C] The Pipeline then prefills the
   full model on the kept tokens as a fresh prompt (positions 0..k-1) and decodes. [P][C]

Selection layer: [C]'s per-model choice (13 of 32 for Llama-3.1-8B-Instruct, 19 of 40 for Mistral-Nemo-12B,
19 of 32 for Phi-3.5-mini), matched by config shape since model names are unreliable; any other model gets
round(0.4 * layers), the analogue of Llama-3.1-8B's 13/32, unless the registry names a layer a layer
screen chose for that model (``RegistryEntry.gemfilter_layer``, ctxopt/models/registry.py). The layer search
lives in the benchmark harness (``ctxopt.bench.layers``: ``search_layer`` measures accuracy per layer,
``needle_recall`` screens every layer from one forward per sample). On
Qwen2.5-Coder-1.5B the screen (6 RULER-4K needle samples) puts the retrieval layers deeper: at layers 15-18,
20 and 21 the needle is kept at budget 256, at layer 11 only at 1024-2048. At 8K the screen moves to layer 16
and up, and there layer 16 answers both needles at budgets 512 and 1024 where layers 11 and 15 answer none, at
0.69x of full's TTFT instead of 0.48x (benchmarks/JOURNAL.md): layer 16 is that model's registry default.

Deviations from [C]: scores are computed in float32 (the code keeps the model's half precision), and ties in
the ranking go to the earlier position (``torch.topk``'s tie order is unspecified). ``keep_question=True`` is
ctxopt's option, off by default as in [C]: template and question tokens are kept first, counted in the
budget, and the best context tokens fill the rest.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..attention import AttentionCapture, capture_attention
from ..checks import require_int
from ..decoding import forward
from ..models.registry import registry_entry
from ..stages import Run, TokenStage, tokens_to_keep
from ..types import Prompt
from .selection import average_pool, fill_budget, forced_tokens, rank_descending

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from ..models import LoadedModel

# (model_type, layers, hidden size, KV heads) -> the selection layer [C] uses (needle_eval.py).
PAPER_LAYERS: dict[tuple[str, int, int, int], int] = {
    ("llama", 32, 4096, 8): 13,  # Llama-3.1-8B-Instruct
    ("mistral", 40, 5120, 8): 19,  # Mistral-Nemo-12B-Instruct
    ("phi3", 32, 3072, 32): 19,  # Phi-3.5-mini-instruct
}
DEPTH_FRACTION = 0.4


def registry_layer(name: str) -> int | None:
    """The selection layer a layer screen chose for registry model ``name`` (``RegistryEntry.gemfilter_layer``)."""
    entry = registry_entry(name)
    return entry.gemfilter_layer if entry else None


def default_layer(config: "PretrainedConfig") -> int:
    """The paper's layer for a model it used (matched by config shape), else round(0.4 * layers)."""
    config = config.get_text_config(decoder=True)
    key = (
        config.model_type,
        config.num_hidden_layers,
        config.hidden_size,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    return PAPER_LAYERS.get(key, round(DEPTH_FRACTION * config.num_hidden_layers))


def last_query_scores(
    model, input_ids: torch.Tensor, layers: Sequence[int], stop_after: int | None = None
) -> dict[int, torch.Tensor]:
    """Step 2 at each of ``layers``: sum over query heads of q_last·k for every prompt token, (n,) float32.

    One forward without a cache; ``stop_after`` ends it once that layer's scores are taken.
    """
    request = AttentionCapture(
        window=1, layers=list(layers), stop_after=stop_after, reducer=lambda record: record.raw[:, -1].sum(0)
    )
    with torch.inference_mode(), capture_attention(model, request):
        forward(model, input_ids, positions=torch.arange(len(input_ids)))
    return {layer: scores.cpu() for layer, scores in request.records.items()}


def early_layer_scores(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Steps 1-2: layer ``layer``'s scores, only layers 0..layer run."""
    return last_query_scores(model, input_ids, [layer], stop_after=layer)[layer]


def keep_positions(scores: torch.Tensor, kernel: int, keep: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 3-4: the ``forced`` positions, then the best smoothed scores, ``keep`` in all, ascending."""
    forced = torch.zeros(0, dtype=torch.long) if forced is None else forced
    return fill_budget([forced, rank_descending(average_pool(scores, kernel))], keep)


@dataclass
class GemFilter(TokenStage):
    """Keep ``budget`` tokens (int, or a ratio of the prompt) chosen by layer ``layer``'s last query."""

    budget: int | float = 1024
    layer: int | None = None
    kernel: int = 5
    keep_question: bool = False
    name = "gemfilter"

    def __post_init__(self) -> None:
        require_int(self.kernel, "gemfilter: kernel (a centred mean)", minimum=1, odd=True)

    def resolve_layer(self, lm: "LoadedModel") -> int:
        layer = self.layer if self.layer is not None else registry_layer(lm.name) or default_layer(lm.config)
        return require_int(layer, f"gemfilter: layer (of {lm.name}'s {lm.num_layers})", 0, lm.num_layers - 1)

    def prepare(self, lm: "LoadedModel") -> None:
        lm.first_layers(self.resolve_layer(lm) + 1)

    def select(self, prompt: Prompt, run: Run) -> Prompt:
        keep = tokens_to_keep(self.name, self.budget, len(prompt), run)
        if keep is None:
            return prompt
        layer = self.resolve_layer(run.lm)
        forced = forced_tokens(prompt, self.keep_question, keep, self.name)
        scores, scoring_seconds, reused = run.shared(
            ("gemfilter", run.lm, layer), prompt.input_ids,
            lambda: early_layer_scores(run.lm.first_layers(layer + 1), prompt.input_ids, layer),
        )
        began = time.perf_counter()
        kept = keep_positions(scores, self.kernel, keep, forced)
        run.report(
            selection_seconds=scoring_seconds + time.perf_counter() - began, selection_layer=layer,
            forced_tokens=len(forced), selection_reused=reused,
        )
        return prompt.select(kept)
