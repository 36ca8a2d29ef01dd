"""SpecPC: keep the prompt tokens a small draft model attends to, then run the target on those only.

Paper: "Draft-based Approximate Inference for LLMs" (arXiv 2506.08373) [P]; code:
furiosa-ai/draft-based-approx-llm [C] (``specpc/specpc.py``, ``specpc/specpc_utils.py``, paper configs).

1. The draft prefills the prompt, capturing the last ``window`` queries at layers >= ``first_layer``. With
   ``lookahead`` L > 0 it also greedily generates L tokens (stopping at EOS), as ``generate(max_new_tokens=L)``
   does: the L-1 single-token steps after the prefill add their query's attention too. [C]
2. Per layer: the softmax attention of those queries over the prompt keys (scaled, causal inside the
   window); the window's queries are weighted by linspace(0, 1, W), multiplying the probabilities (not
   applied to a lookahead step's single query); max over heads and queries. Then max over layers, and max
   over the prefill and the lookahead steps. [C]
3. Centred max-pool over positions, kernel 32 for Llama-family drafts and 64 for Qwen-family ones; an even
   kernel reaches (k-1)//2 left and k//2 right, zero padding. [C]
4. Rank positions by pooled score; follow each by its ``kernel`` neighbours (offsets -(k-1)//2 .. k//2,
   nearest first); drop repeats keeping rank order; put the last ``window`` prompt tokens first; drop
   repeats; cut to the budget; sort ascending. [C] The Pipeline prefills the target on the kept tokens as a
   fresh prompt. [P][C]

Defaults [C] (paper configs): window 64, first layer 8, max pooling and reduction, neighbours = kernel,
lookahead_tokens 1 (a prefill only; ``lookahead=0`` here). The draft defaults to the target itself.
``lookahead=None`` means up to the run's max_new_tokens (what SpecKV-PC uses). The draft tokens go to
``run.draft_answer`` (target token ids) for SpecKV; when the run already has one, its first L tokens are fed to
the draft instead of decoding again.

Deviations from [C]: ties in the ranking go to the earlier position; a window longer than the prompt is
clipped (the code raises); probabilities stay float32 (the code casts them to the model's dtype).
``keep_question=True`` (ctxopt's option, off as in [C]) keeps template and question tokens first, counted in
the budget.

ctxopt's extension, beyond the paper: a draft with a DIFFERENT tokenizer (``cross_tokenizer``: None, the
default, maps when the draft's vocabulary differs from the target's, as for the registry's SmolLM2 draft of
Qwen2.5-Coder-0.5B; True always maps; False refuses such a draft). The
draft reads the text of the prompt's tokens (``prompt.text``, the rendered target chat prompt) tokenized by
its own tokenizer. Each token's character range is widened to run to the next token's start, so both
tokenizations tile the text; each draft token stands for the target tokens whose ranges overlap its own.
Draft tokens are taken in the ranked order of step 4 until the next one's target tokens would overflow the
budget (counted in target tokens). Kernel and window stay in draft tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..attention import AttentionCapture, WindowAttention, capture_attention
from ..checks import require_int
from ..decoding import GenerationConfig, decode, forward, prefill
from ..drafts import crosses_tokenizers, resolve_draft, retokenize
from ..errors import InputError
from ..stages import Run, TokenStage, tokens_to_keep
from ..types import Prompt
from .scoring import check_lookahead
from .selection import (
    centred_max_pool,
    expand_neighbours,
    first_occurrences,
    forced_tokens,
    rank_descending,
    unique_in_order,
)

if TYPE_CHECKING:
    from ..models import LoadedModel

def default_kernel(lm: "LoadedModel") -> int:
    """[C]'s pooling kernel: 64 for Qwen-family models, 32 for Llama-family ones and anything else."""
    return 64 if lm.family.startswith("qwen") else 32


def reduce_window(probs: torch.Tensor, prompt_length: int, weighted: bool) -> torch.Tensor:
    """Step 2 for one layer: (heads, queries, keys) probabilities -> (prompt_length,) scores.

    With ``weighted``, query i of W is multiplied by i / (W - 1) (linspace(0, 1, W)) before the max over
    heads and queries; keys past the prompt (lookahead tokens) are dropped.
    """
    probs = probs[..., :prompt_length]
    if weighted and probs.shape[1] > 1:
        weights = torch.linspace(0, 1, probs.shape[1], device=probs.device, dtype=probs.dtype)
        probs = probs * weights.view(1, -1, 1)
    return probs.amax(dim=(0, 1))


def draft_scores(
    draft: "LoadedModel",
    input_ids: torch.Tensor,
    window: int = 64,
    first_layer: int = 8,
    lookahead: int = 0,
    answer_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps 1-2: the draft's attention score of each prompt token, (n,) float32, and its lookahead tokens.

    ``answer_ids`` (draft token ids) are fed instead of greedy decoding when given; their first L-1 tokens'
    queries count, as when they are decoded. Returns (scores, the L draft tokens or None when L is 0).
    """
    n = len(input_ids)
    best: torch.Tensor | None = None

    def keep_max(record: WindowAttention) -> None:
        nonlocal best
        in_prompt = record.raw.shape[-1] == n  # the prefill's window, not a lookahead step
        scores = reduce_window(record.probs(), n, weighted=in_prompt)
        best = scores if best is None else torch.maximum(best, scores)

    layers = range(first_layer, draft.num_layers)
    given = answer_ids is not None
    with torch.inference_mode():
        with capture_attention(draft.model, AttentionCapture(window, layers, keep_max)):
            if lookahead == 0:
                forward(draft.model, input_ids, positions=torch.arange(n))
            else:
                state = prefill(draft.model, input_ids)
                if not given:
                    config = GenerationConfig(max_new_tokens=lookahead)
                    result = decode(draft.model, draft.tokenizer, state, config, draft.eos_token_ids)
                    answer_ids = torch.tensor(result.token_ids, dtype=torch.long)
        if lookahead == 0:
            return best.cpu(), None
        answer_ids = answer_ids[:lookahead]
        fed = answer_ids[:-1]
        if given and len(fed):
            with capture_attention(draft.model, AttentionCapture(len(fed), layers, keep_max)):
                forward(draft.model, fed, positions=torch.arange(n, n + len(fed)), cache=state.cache)
    return best.cpu(), answer_ids


def selection_order(scores: torch.Tensor, kernel: int, window: int, top: int | None = None) -> torch.Tensor:
    """Steps 3-4 before the cut: positions in keep order (last ``window`` first, then the neighbourhoods of
    the ``top`` best max-pooled positions, default all; ``top`` = the budget loses nothing before the cut)."""
    n = len(scores)
    ranked = expand_neighbours(rank_descending(centred_max_pool(scores, kernel))[:top], kernel, n)
    return unique_in_order(torch.cat([torch.arange(max(0, n - window), n), ranked]))


def token_tiles(offsets: list[tuple[int, int]] | torch.Tensor, length: int) -> torch.Tensor:
    """(n, 2) character ranges that tile ``0..length``: each token runs from its start to the next token's
    later start (the first from 0, the last to ``length``); tokens sharing a start share a range."""
    starts = torch.as_tensor(offsets, dtype=torch.long).view(-1, 2)[:, 0].cummax(0).values
    if len(starts) == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    starts[0] = 0
    following = torch.searchsorted(starts, starts, right=True)
    ends = torch.cat([starts, torch.tensor([length])])[following]
    return torch.stack([starts, ends], dim=1)


def overlapping(units: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """(m, 2) index ranges [lo, hi) of the ``tiles`` (sorted, tiling) whose characters overlap each unit's."""
    lo = torch.searchsorted(tiles[:, 1].contiguous(), units[:, 0].contiguous(), right=True)
    hi = torch.searchsorted(tiles[:, 0].contiguous(), units[:, 1].contiguous(), right=False)
    return torch.stack([lo, torch.maximum(hi, lo)], dim=1)


def cut_to_budget(
    order: torch.Tensor, ranges: torch.Tensor, budget: int, forced: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take units (draft tokens) in ``order`` while the target tokens they stand for (``ranges[u]`` =
    [lo, hi)) fit in ``budget`` after the ``forced`` target tokens. Returns (kept target indices ascending,
    the units taken, in order)."""
    forced = torch.zeros(0, dtype=torch.long) if forced is None else forced
    lo, hi = ranges[order].unbind(1)
    counts = hi - lo
    starts = torch.cumsum(counts, 0) - counts
    targets = lo.repeat_interleave(counts) + torch.arange(int(counts.sum())) - starts.repeat_interleave(counts)
    owners = torch.arange(len(order)).repeat_interleave(counts)
    new = first_occurrences(torch.cat([forced, targets]))
    added = torch.zeros(len(order), dtype=torch.long).scatter_add_(0, owners, new[len(forced):].long())
    taken = int(((torch.cumsum(added, 0) + int(new[: len(forced)].sum())) <= budget).sum())
    kept = torch.cat([forced, targets[owners < taken]])
    return torch.unique(kept, sorted=True), order[:taken]


def text_tiles(prompt: Prompt, tokenizer) -> tuple[str, torch.Tensor]:
    """The text of the prompt's tokens (their tiles of ``prompt.text``, joined) and each token's range in it.

    Target offsets come from re-tokenizing ``prompt.text`` (which produced the prompt, without special
    tokens); a prompt already cut by another stage contributes only its kept tokens' text.
    """
    if not prompt.text:
        raise InputError("specpc: cross-tokenizer mode needs prompt.text, the rendered prompt (build_prompt sets it).")
    encoded = tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    if prompt.original_length > len(ids) or not torch.equal(ids[prompt.positions], prompt.input_ids):
        raise InputError("specpc: prompt.text does not tokenize back to the prompt's tokens; cross-tokenizer "
                         "mode needs a prompt built by ctxopt.prompting.build_prompt with the target's tokenizer.")
    tiles = token_tiles(encoded["offset_mapping"], len(prompt.text))[prompt.positions]
    fresh = torch.ones(len(tiles), dtype=torch.bool)
    fresh[1:] = tiles[1:, 0] != tiles[:-1, 0]  # tokens sharing a start share one piece of text
    pieces = tiles[fresh]
    lengths = pieces[:, 1] - pieces[:, 0]
    ends = torch.cumsum(lengths, 0)
    local = torch.stack([ends - lengths, ends], dim=1)[torch.cumsum(fresh.long(), 0) - 1]
    text = "".join(prompt.text[a:b] for a, b in pieces.tolist())
    return text, local


@dataclass
class SpecPC(TokenStage):
    """Keep ``budget`` tokens (int, or a ratio of the prompt) chosen by a draft model's attention."""

    draft: "LoadedModel | str | None" = None
    budget: int | float = 2048
    window: int = 64
    first_layer: int = 8
    kernel: int | None = None
    lookahead: int | None = 0
    keep_question: bool = False
    cross_tokenizer: bool | None = None
    # A floor on the kept tokens whatever the budget (SpecKV-PC's first stage keeps at least 2048).
    at_least: int = field(default=0, metadata={"option": False})
    name = "specpc"

    def __post_init__(self) -> None:
        require_int(self.window, "specpc: window", minimum=1)
        require_int(self.first_layer, "specpc: first_layer", minimum=0)
        if self.kernel is not None:
            require_int(self.kernel, "specpc: kernel", minimum=1)
        check_lookahead(self.name, self.lookahead)

    def prepare(self, lm: "LoadedModel") -> None:
        self.load_draft(lm).load_weights()

    def load_draft(self, target: "LoadedModel") -> "LoadedModel":
        """The draft: the target when None, a registry name or path loaded on the target's device and dtype."""
        draft = resolve_draft(self.draft, target, self.name, cross_tokenizer=self.cross_tokenizer)
        if self.first_layer >= draft.num_layers:
            raise InputError(f"specpc: first_layer {self.first_layer} is past the last layer of the draft "
                             f"{draft.name!r} ({draft.num_layers} layers); pass a smaller first_layer.")
        return draft

    def select(self, prompt: Prompt, run: Run) -> Prompt:
        keep = tokens_to_keep(self.name, self.budget, len(prompt), run)
        if keep is not None and self.at_least:
            keep = None if self.at_least >= len(prompt) else max(keep, self.at_least)
        if keep is None:
            return prompt
        draft = self.load_draft(run.lm)
        cross = crosses_tokenizers(self.cross_tokenizer, draft, run.lm)
        forced = forced_tokens(prompt, self.keep_question, keep, self.name)
        if cross:
            text, target_tiles = text_tiles(prompt, run.lm.tokenizer)
            encoded = draft.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            draft_ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
            ranges = overlapping(token_tiles(encoded["offset_mapping"], len(text)), target_tiles)
        else:
            draft_ids = prompt.input_ids
            ranges = torch.stack([torch.arange(len(prompt)), torch.arange(1, len(prompt) + 1)], dim=1)
        lookahead = run.config.max_new_tokens if self.lookahead is None else self.lookahead
        given = self._given_answer(run, draft, cross) if lookahead else None
        given_key = None if given is None else tuple(given.tolist())
        key = ("specpc", draft.model, self.window, self.first_layer, lookahead, given_key)
        (scores, answer), scoring_seconds, reused = run.shared(
            key, draft_ids, lambda: draft_scores(draft, draft_ids, self.window, self.first_layer, lookahead, given)
        )
        began = time.perf_counter()
        if answer is not None and given is None:
            run.draft_answer = retokenize(answer, draft.tokenizer, run.lm.tokenizer) if cross else answer
        top = None if cross else keep  # a draft token may stand for no new target token
        order = selection_order(scores, self.kernel or default_kernel(draft), self.window, top)
        kept, units = cut_to_budget(order, ranges, keep, forced)
        run.report(
            selection_seconds=scoring_seconds + time.perf_counter() - began,
            selection_reused=reused,
            draft_seconds=scoring_seconds,
            draft_tokens=len(draft_ids),
            draft_kept_tokens=len(units),
            lookahead_tokens=0 if answer is None else len(answer),
            lookahead_reused=given is not None,
        )
        return prompt.select(kept)

    def _given_answer(self, run: Run, draft: "LoadedModel", cross: bool) -> torch.Tensor | None:
        """``run.draft_answer`` (target tokens) as draft tokens, or None when absent."""
        ids = run.draft_answer
        if ids is None or not cross:
            return ids
        return retokenize(ids, run.lm.tokenizer, draft.tokenizer)
