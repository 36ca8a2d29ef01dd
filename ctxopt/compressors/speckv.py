"""SpecKV: prune the KV cache with the attention the target pays to a draft model's approximate answer.

Paper: "Draft-based Approximate Inference for LLMs" (arXiv 2506.08373) [P]; code:
furiosa-ai/draft-based-approx-llm [C].

1. The draft (a small model with the target's tokenizer) greedily answers the same prompt; the lookahead is
   the whole answer, up to max_new_tokens, ending at EOS. [P][C] An answer already in ``run.draft_answer``
   (SpecPC's, in SpecKV-PC) is reused. [C]
2. The target prefills the prompt, capturing the last ``window`` prompt queries; then the draft tokens are
   fed at positions n..n+L-1, capturing all L of their queries. Per layer: softmax(Q_win K^T / sqrt(d)),
   causal inside the window; drop the window's own columns (keys n-w..); reduce by MAX over the GQA group
   and the window's queries -> one score vector per KV head; centred max-pool, kernel 7. [C]
3. Keep each KV head's top (budget - window) prefix positions plus the window's prompt positions; drop the
   draft tokens and the last prompt token. [C] The decode loop feeds the last prompt token again at its
   ORIGINAL position n-1; stored keys keep their original rotation. [C]

Cross-tokenizer drafts (``cross_tokenizer``, as SpecPC's: None, the default, maps when the vocabularies differ;
ctxopt's extension beyond [P][C], which use a draft sharing the target's tokenizer): the draft reads the text of
the prompt's tokens (the rendered target chat prompt, SpecPC's ``text_tiles``) in its own tokens, and its greedy
answer goes back to the target as text re-tokenized by the target's tokenizer (``drafts.retokenize``). Scoring is
unchanged: it is the TARGET's attention from the window and those answer tokens, so no score crosses tokenizers;
the lookahead counts draft tokens. The draft and the mapping are checked in ``attention_request``, before the
target's prefill, so a draft that cannot draft fails fast.

Deviations from [C]: the window holds the last ``window`` prompt tokens (the code's window has one more,
``window + 1``), so the cache holds budget - 1 positions per head and budget once the last prompt token is
fed again (the code keeps budget, then budget + 1). Scores and probabilities are float32 (the code keeps the
model's dtype). [C]'s sparse (vertical-slash) target prefill for long prompts, an accelerator, is not done. A
draft that is the target itself answers from a copy of the target's prefilled cache instead of prefilling the
prompt a second time (the same greedy answer).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch

from ..attention import AttentionCapture, WindowAttention, capture_attention
from ..cache import cache_length, crop_cache, keep_per_head, num_layers
from ..decoding import GenerationConfig, Prefill, decode, forward, prefill
from ..drafts import crosses_tokenizers, resolve_draft, retokenize
from ..errors import InputError
from ..stages import CacheStage, Run, Stage, tokens_to_keep
from ..types import Prompt
from .scoring import check_knobs, check_lookahead, pool1d, prefix_probs, select_per_head
from .specpc import SpecPC, text_tiles

if TYPE_CHECKING:
    from ..models import LoadedModel

def max_scores(record: WindowAttention, prefix: int | None = None) -> torch.Tensor:
    """One layer's window attention on the prefix, max over the window's queries and each GQA group:
    (kv_heads, prefix)."""
    probs = record.group_heads(prefix_probs(record, prefix))
    return probs.amax(dim=(1, 2))


@dataclass
class SpecKV(CacheStage):
    """Prune the prefilled cache to ``budget`` positions per KV head, scored with a draft's answer.

    ``draft``: a LoadedModel, a registry name or path, or None for the target itself. ``lookahead``: draft
    tokens to generate (None = up to the run's max_new_tokens). The draft's cost (``draft_seconds``,
    ``draft_tokens``; ``draft_reused``: SpecPC's answer in this run; ``draft_shared``: another budget's
    answer, ``Run.shared``) is reported to this stage's Stats record extra; it is part of this stage's
    seconds, hence of TTFT.
    """

    draft: "LoadedModel | str | None" = None
    budget: int | float = 1024
    window: int = 32
    kernel: int = 7
    lookahead: int | None = None
    cross_tokenizer: bool | None = None
    _drafts_by_target: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False, metadata={"option": False})

    name = "speckv"

    def __post_init__(self) -> None:
        check_knobs(self.name, self.window, self.kernel)
        check_lookahead(self.name, self.lookahead)

    def attention_request(self, prompt: Prompt, run: Run) -> AttentionCapture | None:
        """The capture of the target's prefill, asked for before it runs; a draft that cannot draft for the
        target (its tokenizer, or a prompt it cannot read across tokenizers) fails here, before the prefill."""
        if tokens_to_keep(self.name, self.budget, len(prompt), run, self.window, note=False) is None:
            return None
        if self._drafts(run):
            draft = self._draft_model(run)
            if draft.model is not run.lm.model:
                self.draft_input(prompt, run, draft)
        return AttentionCapture(window=self.window, reducer=max_scores)

    def _draft_model(self, run: Run) -> "LoadedModel":
        """The draft for this run's target, resolved (checked, loaded, its default warned about) once per target
        and setting of ``draft`` and ``cross_tokenizer``."""
        # A draft given as a model is remembered by identity (holding it could hold the target's model: the key).
        draft = self.draft if self.draft is None or isinstance(self.draft, str) else id(self.draft)
        asked = (draft, self.cross_tokenizer)
        memo = self._drafts_by_target.get(run.lm.model)
        if memo is None or memo[0] != asked:
            found = resolve_draft(self.draft, run.lm, self.name, cross_tokenizer=self.cross_tokenizer)
            # The target itself is kept as "self": a value holding the key would keep the model alive.
            memo = (asked, "self" if found.model is run.lm.model else found)
            self._drafts_by_target[run.lm.model] = memo
        return run.lm if memo[1] == "self" else memo[1]

    def _drafts(self, run: Run) -> bool:
        """Whether this run's draft model will answer (no answer to reuse, a lookahead above 0)."""
        return run.draft_answer is None and self.lookahead != 0

    def draft_input(self, prompt: Prompt, run: Run, draft: "LoadedModel") -> torch.Tensor:
        """The prompt as the draft reads it: its own token ids, or, across tokenizers, the draft's tokens of the
        prompt's text (SpecPC's ``text_tiles``: the kept tokens' text of the rendered target prompt)."""
        if not crosses_tokenizers(self.cross_tokenizer, draft, run.lm):
            return prompt.input_ids
        text, _ = text_tiles(prompt, run.lm.tokenizer)
        return torch.tensor(draft.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def draft_answer(self, state: Prefill, prompt: Prompt, run: Run) -> torch.Tensor:
        """Step 1: the draft's greedy answer to the prompt (``run.draft_answer`` when a stage already made it)."""
        lookahead = run.config.max_new_tokens if self.lookahead is None else self.lookahead
        reused = run.draft_answer is not None
        seconds, shared = 0.0, False
        if reused:
            ids = run.draft_answer[:lookahead]
        elif lookahead == 0:
            ids = torch.zeros(0, dtype=torch.long)
        else:
            draft = self._draft_model(run)
            itself = draft.model is run.lm.model

            def answer() -> torch.Tensor:
                start = state.copy() if itself else prefill(draft.model, self.draft_input(prompt, run, draft))
                config = GenerationConfig(max_new_tokens=lookahead)
                result = decode(draft.model, draft.tokenizer, start, config, draft.eos_token_ids)
                ids = torch.tensor(result.token_ids, dtype=torch.long)
                crossed = not itself and crosses_tokenizers(self.cross_tokenizer, draft, run.lm)
                return retokenize(ids, draft.tokenizer, run.lm.tokenizer) if crossed else ids

            ids, seconds, shared = run.shared(("speckv draft", draft.model, lookahead), prompt.input_ids, answer)
            run.draft_answer = ids
        run.report(draft_seconds=seconds, draft_tokens=len(ids), draft_reused=reused, draft_shared=shared)
        return ids

    def compress(self, state: Prefill, prompt: Prompt, run: Run, capture: AttentionCapture | None) -> Prefill:
        keep = tokens_to_keep(self.name, self.budget, len(prompt), run, self.window, "cache kept whole")
        if keep is None:
            return state
        if capture is None or state.logits is None or state.pending_ids is not None:
            raise InputError("speckv: compress() needs a plain prefill of the prompt run under attention_request() "
                             "(the Pipeline does this).")
        n, layers, w = cache_length(state.cache), num_layers(state.cache), self.window
        prefix = n - w
        scores = [capture.records.get(layer) for layer in range(layers)]
        if any(s is None or s.shape[-1] != prefix for s in scores):
            raise InputError(
                f"speckv: the capture does not cover the last {w} prompt queries of all {layers} layers "
                "(a prefill chunk shorter than the window?); use a prefill chunk of at least the window."
            )
        draft_ids = self.draft_answer(state, prompt, run)
        if len(draft_ids):
            request = AttentionCapture(window=len(draft_ids), reducer=partial(max_scores, prefix=prefix))
            positions = torch.arange(state.next_position, state.next_position + len(draft_ids))
            with capture_attention(run.lm.model, request), torch.inference_mode():
                forward(run.lm.model, draft_ids, positions=positions, cache=state.cache)
            scores = [torch.maximum(s, request.records[layer]) for layer, s in enumerate(scores)]
        crop_cache(state.cache, n - 1)
        window = torch.arange(prefix, n - 1)
        keep_per_head(state.cache, [select_per_head(pool1d(s, self.kernel), keep - w, window) for s in scores])
        return Prefill(
            cache=state.cache,
            next_position=state.next_position - 1,
            logits=None,
            pending_ids=prompt.input_ids[-1:],
        )


def speckv_pc(
    budget: int | float, draft: "LoadedModel | str | None" = None, window: int = 32, kernel: int = 7,
    lookahead: int | None = None, cross_tokenizer: bool | None = None,
) -> list[Stage]:
    """The ``speckv-pc`` method: SpecPC at 2048 tokens (its other knobs at their defaults), then SpecKV
    at ``budget``; SpecPC's draft also writes the answer (``lookahead``, None = the whole answer) that SpecKV
    reuses. [C] Deviation: a budget above 2048 raises SpecPC's to the budget (at 2048 SpecKV would then keep
    the whole cache). A ratio budget is of the uncompressed prompt for both stages (``Run.prompt_tokens``), so
    SpecPC keeps max(2048, the budget's tokens)."""
    return [
        SpecPC(draft=draft, budget=budget, lookahead=lookahead, cross_tokenizer=cross_tokenizer, at_least=2048),
        SpecKV(draft=draft, budget=budget, window=window, kernel=kernel, lookahead=lookahead,
               cross_tokenizer=cross_tokenizer),
    ]
