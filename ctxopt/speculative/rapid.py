"""RAPID: retrieval-augmented speculative decoding (Chen et al., ICML 2025, arXiv 2502.20330).

Sources: [P] the paper; [C] its official code, John-AI-Lab/RAPID (``src/utils.py: _speculative_sampling``,
``src/rag.py``, ``readme.md``); [L] Leviathan et al. 2023, the speculative sampling RAPID builds on.

The target has prefilled the full long prompt (the pipeline's prefill, possibly pruned by a cache stage).
The drafter (option ``draft``) -- the target itself by default (self-speculation), or any model with the same
tokenizer --
prefills a SHORT prompt: the context's chunks most similar to the question, in document order. [P][C]
Each model keeps its own cache and positions. One round:

1. The drafter proposes up to ``gamma`` tokens x_1..x_k, greedy or sampled from its distribution q. [P][C]
2. The target scores all of them in ONE forward at explicit positions: logits z_1..z_k for the drafts and
   z_{k+1} for the token after them. [L]
3. Retrieval-augmented target distribution, per draft position [C]:
       g     = (p - q) on tokens where q >= alpha * max(q), 0 elsewhere
       z_hat = z - eta * g,      p_hat = softmax(z_hat)
   SIGN CONVENTION (checked in [C] ``adjust_logits = student_logits - m * truncate_g`` with
   ``gradient = student_prob - teacher_prob``, student = target logits, teacher = drafter logits, mask on
   the teacher's probabilities; readme: "speculative_margin ... \\eta in Eq. (6)"): the long-context target
   is the student and the RAG drafter the teacher; p - q is the gradient of KL(q || p) with respect to the
   target's logits, and z_hat is one descent step on it. So on the tokens the drafter finds likely,
   z_hat = z + eta * (q - p): p_hat moves TOWARD q. Tokens below the mask keep their logit.
4. Sampling: accept x_i while u <= p_hat(x_i) / q(x_i); at the first rejection sample the next token from
   normalize(clamp(max(p - q, p - p_hat), 0)) [C]; if all k are accepted, sample a bonus token from p at
   k + 1. With eta = 0, p_hat = p and the residual is max(p - q, 0): exactly speculative sampling [L], so
   the output follows the target's distribution.
   Greedy (temperature 0): accept while argmax z_hat == x_i; at the first mismatch emit argmax z_hat; if all
   are accepted emit argmax z_{k+1}. With eta = 0 this is the target's own greedy decoding.
5. Rollback: both caches are cut back to their prompt plus the accepted tokens (a shorter row of ctxopt's
   slot cache: nothing is copied); the round's last emitted token is fed to both at the start of the next round
   (in the target's verification forward).

Deviations, all deliberate:
- Greedy mode is ours: [C] always runs its sampling rule (on logits processed by the generation config).
  In greedy mode p and q for g are softmaxes at temperature 1.
- Temperature and top-p shape both p and q before step 3 (as [C]'s logits processors do); z is then log p.
- Drafter prompt: the target's prompt frame (question, the pipeline's instruction and system message, the
  answer prefix) rebuilt by ``reframe_prompt`` around chunks from ``top_chunks`` (ctxopt's token chunker
  and the pipeline's embedder, where [C] uses LangChain's splitter and BGE-M3). ``rag_tokens`` counts the
  drafter's whole prompt (frame and chunks), as every ctxopt budget does, where [C] counts the chunks; a
  prompt that already fits goes to the drafter whole; if no chunk reaches the similarity threshold the drafter sees the
  question alone ([C] also keeps nothing then).
- gamma is fixed per round, a draft stops early at an end-of-sequence token, and the last round's gamma is
  cut so that no more than ``max_new_tokens`` tokens are produced.
- With eta = 0 "lossless" is exact in arithmetic; in floating point a multi-token verification forward can
  differ from one-token forwards in the last bits, which can flip a near-tie argmax.

Knobs and their sources: gamma = 10 (``num_assistant_tokens=10`` [C]); eta = 2, measured (deviation: the readme's
quick start [C] uses 10, the paper's tables 5-50 [P], the LongBench script 0.1): the largest eta of 0, 1, 2, 5, 10
whose answers were never below the target's own on SmolLM2-135M's 4K hard needles (benchmarks/JOURNAL.md,
2026-12-06: eta 0-2 equal the target 4/4, eta 5 answered 2/4 and eta 10 1/4 where the target answered 3/4);
128-token chunks, similarity floor 0.1, about
4K tokens kept (``get_rag_context`` defaults [C]); alpha = 0.1 (``spec_alpha`` [C]).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache import SlotCache, cache_length, kv_bytes, layer_kv, num_layers
from ..compressors.rag import top_chunks
from ..decoding import (
    DecodeResult,
    GenerationConfig,
    Prefill,
    StopChecker,
    choose_token,
    make_generator,
    next_token_distribution,
    prefill,
    round_up,
    slot_forward,
)
from ..drafts import resolve_draft
from ..errors import InputError
from ..models import LoadedModel
from ..prompting import reframe_prompt
from ..stages import Decoder, Run, context_room, resolve_budget
from ..types import Passage, Prompt


# -- the verification step, on plain tensors -------------------------------------------------------------
def augment_logits(z: torch.Tensor, p: torch.Tensor, q: torch.Tensor, eta: float, alpha: float = 0.1) -> torch.Tensor:
    """Step 3: z_hat = z - eta * g with g = (p - q) where q >= alpha * max(q), else 0 (rows are positions). [C]"""
    if eta == 0:
        return z
    g = torch.where(q >= alpha * q.amax(-1, keepdim=True), p - q, torch.zeros_like(p))
    return z - eta * g


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def accept_or_resample(
    drafts: Sequence[int], p: torch.Tensor, q: torch.Tensor, p_hat: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """Step 4, sampling: (drafts accepted, next token). ``p`` has len(drafts) + 1 rows, ``q`` and ``p_hat``
    len(drafts); all are probabilities. [C][L]"""
    for i, x in enumerate(drafts):
        if float(torch.rand((), generator=generator)) * float(q[i, x]) <= float(p_hat[i, x]):
            continue
        residual = torch.clamp(torch.maximum(p[i] - q[i], p[i] - p_hat[i]), min=0)
        # A rejection implies residual mass > 0 in exact arithmetic; rounding can leave none when p ~ q.
        return i, _sample(residual if float(residual.sum()) > 0 else p[i], generator)
    return len(drafts), _sample(p[len(drafts)], generator)


def verify(
    drafts: Sequence[int],
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    config: GenerationConfig,
    eta: float,
    alpha: float,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Steps 3-4 on raw logits: ``target_logits`` (k + 1, V) and ``draft_logits`` (k, V) for k drafts."""
    k = len(drafts)
    z = target_logits.float()
    if config.greedy:
        z_hat = z[:k]
        if eta and k:
            q = torch.softmax(draft_logits.float().to(z.device), -1)
            z_hat = augment_logits(z_hat, torch.softmax(z_hat, -1), q, eta, alpha)
        choice = z_hat.argmax(-1).tolist()
        for i, x in enumerate(drafts):
            if choice[i] != x:
                return i, choice[i]
        return k, int(z[k].argmax())
    p = next_token_distribution(z, config)
    q = next_token_distribution(draft_logits.float().to(z.device), config) if k else p[:0]
    p_hat = torch.softmax(augment_logits(p[:k].log(), p[:k], q, eta, alpha), -1) if eta and k else p[:k]
    return accept_or_resample(drafts, p, q, p_hat, generator)


# -- one model's view of the growing sequence --------------------------------------------------------------
class _Cursor:
    """A model's cache over its own prompt plus the answer so far, with explicit positions.

    ``sequence`` arguments are the tokens after the prompt (the Prefill's pending ids, then the answer).
    ``fed`` of them are in the cache, including draft tokens not yet verified; ``rollback`` drops those by
    shortening the row. The cache is the state's own one-row ``SlotCache``, extended in place in the slots the
    prefill left for the answer (grown only when those run out): nothing is copied, and rollback reallocates
    nothing. Two cases copy the entries in use once into a new one-row SlotCache of the size the answer needs
    (``room`` more slots), which then becomes the state's cache: a state holding another kind of cache, and a row
    more than twice that size (a cache stage compacted a long prompt's row in place; decoding in it would keep
    the whole prompt's buffer for the answer). At the end the state holds what a fresh prefill of the prompt and
    the kept tokens would.
    """

    def __init__(self, model: torch.nn.Module, state: Prefill, room: int):
        self.model, self.state = model, state
        self.prefix = [] if state.pending_ids is None else state.pending_ids.tolist()
        if not self.prefix and state.logits is None:
            raise InputError("The prefill carries neither logits nor pending ids to start decoding from.")
        cache = state.cache
        needed = round_up(cache_length(cache) + len(self.prefix) + room)
        if not (isinstance(cache, SlotCache) and cache.rows == 1 and cache.capacity <= 2 * needed):
            state.cache = SlotCache.holding([layer_kv(cache, layer) for layer in range(num_layers(cache))], needed)
            del cache
        self.cache = state.cache
        self.start_length = self.cache.lengths[0]
        self.start_position = state.next_position
        self.fed = 0
        self.logits = state.logits  # predicts the token after the cache's last one; None after a rollback
        self.forwards = 0

    def logits_after(self, sequence: list[int], drafts: list[int]) -> torch.Tensor:
        """(len(drafts) + 1, V) logits predicting each draft and the token after them. Feeds the part of
        ``sequence`` not yet in the cache, then ``drafts``, in one forward."""
        fresh = sequence[self.fed:]
        held = [] if fresh else [self.logits[None]]
        if not fresh and not drafts:
            return held[0]
        tokens = fresh + drafts
        start = self.start_position + self.fed
        needed = self.cache.lengths[0] + len(tokens)
        if needed > self.cache.capacity:
            self.cache.reserve(1, round_up(needed + max(64, self.cache.capacity // 8)))
        rows = slot_forward(self.model, self.cache, [tokens], [list(range(start, start + len(tokens)))],
                            logits_to_keep=len(drafts) + 1 - len(held))[0].float()
        self.fed, self.forwards, self.logits = self.fed + len(tokens), self.forwards + 1, rows[-1]
        return torch.cat(held + [rows])

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` tokens of the sequence in the cache (no-op if fewer are there)."""
        if length < self.fed:
            self.cache.set_length(0, self.start_length + length)
            self.fed, self.logits = length, None


# -- the decoder -----------------------------------------------------------------------------------------
@dataclass
class RAPID(Decoder):
    """Retrieval-augmented speculative decoding as the pipeline's decoder (see the module docstring).

    ``draft``: the drafter -- None (self-speculation), a LoadedModel, or a name/path (``ctxopt.drafts``); it
    must share the target's tokenizer and logit width. ``rag_tokens`` bounds the drafter's context, ``chunk_tokens`` and
    ``threshold`` shape its retrieval, ``eta`` and ``alpha`` the retrieval-augmented target distribution.
    """

    draft: LoadedModel | str | None = None
    gamma: int = 10
    eta: float = 2.0
    chunk_tokens: int = 128
    rag_tokens: int | float = 4096
    threshold: float | None = 0.1
    alpha: float = 0.1
    name: ClassVar[str] = "rapid"

    def __post_init__(self) -> None:
        if self.gamma < 1 or self.chunk_tokens < 1:
            raise InputError("rapid: gamma and chunk_tokens must be >= 1.")
        resolve_budget(self.rag_tokens, 1, "rapid: rag_tokens")
        if self.eta < 0 or not 0 < self.alpha <= 1:
            raise InputError(f"rapid: eta must be >= 0 and alpha in (0, 1]; got eta={self.eta}, alpha={self.alpha}.")

    def resolve_drafter(self, target: LoadedModel) -> LoadedModel:
        """The drafter model, checked to share the target's vocabulary and logit width."""
        return resolve_draft(self.draft, target, self.name, compare_logits=True)

    def draft_passages(self, question: str, passages: list[Passage], run: Run) -> list[Passage]:
        """The drafter's context: chunks most similar to the question while the drafter's prompt fits
        ``rag_tokens`` (a budget as every method's: prompt tokens, or a ratio of the uncompressed prompt), in
        document order."""
        room = context_room(self.name, self.rag_tokens, passages, run)
        if room is None:
            return passages
        if run.embedder is None:
            raise InputError("rapid: the drafter's retrieval needs an embedder; run it through a Pipeline.")
        kept = top_chunks(question, passages, run, room, self.chunk_tokens, self.threshold)
        if not kept:
            run.note(f"rapid: no chunk reached similarity {self.threshold}; the drafter sees the question only")
        return kept

    def prepare_drafter(self, drafter: LoadedModel, prompt: Prompt, run: Run) -> tuple[Prompt, Prefill, float, float]:
        """The drafter's prompt (the target's frame around the retrieved chunks) and its prefilled state, with the
        seconds spent on retrieval and on that prefill."""
        began = time.perf_counter()
        passages = self.draft_passages(prompt.question, prompt.passages, run)
        retrieved = time.perf_counter()
        draft_prompt = reframe_prompt(drafter.tokenizer, prompt, passages)
        draft_state = prefill(drafter.model, draft_prompt.input_ids, room=run.config.max_new_tokens)
        return draft_prompt, draft_state, retrieved - began, time.perf_counter() - retrieved

    def decode(
        self, state: Prefill, prompt: Prompt, run: Run, on_text: Callable[[str], None] | None = None,
    ) -> DecodeResult:
        drafter = self.resolve_drafter(run.lm)
        draft_prompt, draft_state, retrieval_seconds, prefill_seconds = self.prepare_drafter(drafter, prompt, run)
        result = self.speculate(run.lm, state, drafter, draft_state, run.config, on_text)
        result.seconds += retrieval_seconds + prefill_seconds
        result.first_token_seconds += retrieval_seconds + prefill_seconds
        result.extra.update(
            drafter_seconds=result.extra["drafter_seconds"] + prefill_seconds,
            draft_prefill_seconds=prefill_seconds,
            retrieval_seconds=retrieval_seconds,
            draft_prompt_tokens=len(draft_prompt),
            draft_kv_bytes=kv_bytes(draft_state.cache),
            drafter=drafter.name,
        )
        return result

    def speculate(
        self,
        target: LoadedModel,
        state: Prefill,
        drafter: LoadedModel,
        draft_state: Prefill,
        config: GenerationConfig,
        on_text: Callable[[str], None] | None = None,
    ) -> DecodeResult:
        """Draft, verify, roll back, until EOS, a stop string or ``max_new_tokens`` (steps 1-5), from two
        prefilled states. ``decode`` builds the drafter's state and adds its prompt's size and cost to ``extra``."""
        began = time.perf_counter()
        generator = make_generator(config)
        eos = set(target.eos_token_ids)
        checker = _Cursor(target.model, state, room=config.max_new_tokens)
        draft = _Cursor(drafter.model, draft_state, room=config.max_new_tokens)
        stopper = StopChecker(target.tokenizer, target.eos_token_ids, config.stop_strings, on_text)
        answer: list[int] = []
        proposed = accepted = 0
        drafter_seconds, first_token_seconds, done = 0.0, None, False
        with torch.inference_mode():
            while not done:
                tick = time.perf_counter()
                gamma = min(self.gamma, config.max_new_tokens - len(answer) - 1)
                drafts, draft_logits = self._draft(draft, answer, gamma, config, generator, eos)
                drafter_seconds += time.perf_counter() - tick
                target_logits = checker.logits_after(checker.prefix + answer, drafts)
                n, last = verify(drafts, target_logits, draft_logits, config, self.eta, self.alpha, generator)
                proposed, accepted = proposed + len(drafts), accepted + n
                checker.rollback(len(checker.prefix) + len(answer) + n)
                draft.rollback(len(answer) + n)
                for token in drafts[:n] + [last]:
                    answer.append(token)
                    if stopper.push(token) or len(answer) >= config.max_new_tokens:
                        done = True
                        break
                if first_token_seconds is None:
                    first_token_seconds = time.perf_counter() - began
            stopper.finish()
        return DecodeResult(
            token_ids=stopper.ids,
            text=stopper.text,
            seconds=time.perf_counter() - began,
            first_token_seconds=first_token_seconds or 0.0,
            forward_passes=checker.forwards,
            stopped_by=stopper.reason,
            extra=dict(
                acceptance_rate=accepted / proposed if proposed else 0.0,
                proposed_tokens=proposed,
                accepted_tokens=accepted,
                target_forwards=checker.forwards,
                drafter_forwards=draft.forwards,
                tokens_per_target_forward=len(answer) / max(1, checker.forwards),
                drafter_seconds=drafter_seconds,
                gamma=self.gamma,
                eta=self.eta,
            ),
        )

    @staticmethod
    def _draft(
        draft: _Cursor, answer: list[int], gamma: int, config: GenerationConfig, generator: torch.Generator | None,
        eos: set[int],
    ) -> tuple[list[int], torch.Tensor]:
        """Step 1: up to ``gamma`` draft tokens and the drafter's logits for each, one drafter forward a token."""
        drafts: list[int] = []
        rows: list[torch.Tensor] = []
        while len(drafts) < gamma and not (drafts and drafts[-1] in eos):
            logits = draft.logits_after(answer + drafts, [])[-1]
            rows.append(logits)
            drafts.append(choose_token(logits, config, generator))
        return drafts, torch.stack(rows) if rows else torch.empty(0)


def rapid(
    budget: int | float | None = None,
    draft: LoadedModel | str | None = None,
    gamma: int = 10,
    eta: float = 2.0,
    chunk_tokens: int = 128,
    threshold: float | None = 0.1,
    alpha: float = 0.1,
) -> RAPID:
    """The ``rapid`` method: ``budget`` is the drafter's prompt (``rag_tokens``: prompt tokens, or a ratio of the
    uncompressed prompt); the target prefills the whole prompt."""
    return RAPID(draft=draft, gamma=gamma, eta=eta, chunk_tokens=chunk_tokens, threshold=threshold, alpha=alpha,
                 **({} if budget is None else {"rag_tokens": budget}))
