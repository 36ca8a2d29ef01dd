"""The five kinds of pipeline stage, the per-run context they share, and budgets.

passage stage: passages -> shorter passages (text)          CoLoR, extractive, RAG chunks
token stage:   prompt -> kept token subset (with provenance) GemFilter, SpecPC, truncation
input stage:   prompt -> prefilled cache (replaces prefill)  REFRAG
cache stage:   prefilled cache -> smaller cache              SpecKV, SnapKV
decoder:       cache -> answer tokens                        greedy/sampling, RAPID
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch

from .decoding import DecodeResult, GenerationConfig, Prefill, decode, prefill
from .errors import InputError
from .measure import measure
from .text import count_tokens
from .types import CONTEXT, Passage, Prompt, StageStats, Stats

if TYPE_CHECKING:
    from .attention import AttentionCapture
    from .models import LoadedModel

KINDS = ("passage", "token", "input", "cache", "decoder")


class SharedWork(Protocol):
    """Work that several runs over the same prompt may share, kept by whoever runs them (the benchmark's
    ``ctxopt.bench.memo.PrefillMemo``): a stage's budget-free passes (``Run.shared``) and plain prefills.
    A found entry carries the record of the run that did the work, so its cost still counts."""

    def find_pass(self, key: tuple, input_ids: torch.Tensor) -> tuple[Any, StageStats] | None: ...

    def store_pass(self, key: tuple, input_ids: torch.Tensor, value: Any, record: StageStats) -> None: ...

    def lookup(
        self, input_ids: torch.Tensor, request: "AttentionCapture | None"
    ) -> tuple[Prefill, StageStats] | None: ...

    def store(
        self, input_ids: torch.Tensor, request: "AttentionCapture | None", state: Prefill, record: StageStats
    ) -> None: ...


@dataclass
class Run:
    """One question's run: the model, the question, the decoding settings and the ledger its stages write to.

    What stages legitimately share has a typed field: ``draft_answer`` (a draft model's greedy answer in the
    target's token ids, written by SpecPC with a lookahead and reused by SpecKV). A stage reports its own
    figures with ``report(**figures)``; they land in that stage's Stats record.
    """

    lm: "LoadedModel"
    question: str
    config: GenerationConfig
    stats: Stats = field(default_factory=Stats)
    embedder: Callable[[], Any] | None = None
    draft_answer: torch.Tensor | None = None
    shared_work: SharedWork | None = None
    # What a budget means (docs/methods.md, "Budgets"): the prompt tokens the generator prefills. A ratio is of
    # ``prompt_tokens``, the uncompressed prompt's length (None: of the prompt a stage is handed); a passage
    # stage measures the prompt around its kept passages with ``measure_prompt`` (the Pipeline's own builder).
    prompt_tokens: int | None = None
    measure_prompt: Callable[[list[Passage]], int] | None = None
    # The running stage's own figures, not yet in a record: ``add_record`` moves them into the next one.
    figures: dict[str, Any] = field(default_factory=dict)

    def note(self, text: str) -> None:
        """A remark about this run (a budget that changed nothing), shown with the answer's last record."""
        self.stats.notes.append(text)

    def report(self, **figures: Any) -> None:
        """The running stage's own cost breakdown (draft seconds, chunks encoded): it goes into the stage's
        Stats record ``extra``."""
        self.figures.update(figures)

    def add_record(self, record: StageStats) -> None:
        """Add a stage's Stats record with the figures the stage reported. A shared pass the stage reused
        (``shared``) counts in the record as if it had run: its seconds and peak memory."""
        figures, self.figures = self.figures, {}
        record.extra.update(figures)
        if "shared_pass_seconds" in figures:
            record.seconds += figures["shared_pass_seconds"]
            record.peak_memory_bytes = max(record.peak_memory_bytes or 0, figures["shared_pass_peak_bytes"])
        self.stats.add(record)

    def shared(self, key: tuple, input_ids: torch.Tensor, compute: Callable[[], Any]) -> tuple[Any, float, bool]:
        """``compute()``, a pass over the prompt ``input_ids`` that does not depend on the budget, done once per
        ``key`` (stage, model and knobs) when the run has ``shared_work``. Returns (value, seconds the pass
        took when it ran, reused); ``add_record`` charges a reused pass's cost to the stage."""
        if self.shared_work is None:
            began = time.perf_counter()
            return compute(), time.perf_counter() - began, False
        found = self.shared_work.find_pass(key, input_ids)
        if found is not None:
            value, record = found
            seconds = self.figures.get("shared_pass_seconds", 0.0) + record.seconds
            peak = max(self.figures.get("shared_pass_peak_bytes", 0), record.peak_memory_bytes or 0)
            self.report(shared_pass_seconds=seconds, shared_pass_peak_bytes=peak)
            return value, record.seconds, True
        with measure(key[0], self.lm.device) as record:
            value = compute()
        self.shared_work.store_pass(key, input_ids, value, record)
        return value, record.seconds, False


class Stage:
    """Base of every stage. ``kind`` places it in the pipeline; ``name`` labels its Stats record."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def prepare(self, lm: "LoadedModel") -> None:
        """Load now what this stage reads of the generator ``lm`` that would load on first use (the ctxopt side
        of a serving engine defers its weights: ``LoadedModel``), so that a timed request does not pay for it."""


class PassageStage(Stage):
    """Passages -> shorter passages (text), before the prompt is built."""

    kind = "passage"

    def compress(self, question: str, passages: list[Passage], run: Run) -> list[Passage]:
        raise NotImplementedError


class TokenStage(Stage):
    """Prompt -> the subset of its tokens to keep (``prompt.select``), provenance intact."""

    kind = "token"

    def select(self, prompt: Prompt, run: Run) -> Prompt:
        raise NotImplementedError


class InputStage(Stage):
    """Prompt -> prefilled cache. ``TokenPrefill`` is the default; REFRAG prefills chunk embeddings instead."""

    kind = "input"

    def prefill(self, prompt: Prompt, run: Run) -> Prefill:
        raise NotImplementedError


class CacheStage(Stage):
    """Prunes a prefilled cache. A stage that scores with the prefill's own attention (SnapKV, SpecKV)
    returns a request from ``attention_request``; the generator runs the prefill under that capture and hands
    the filled request back to ``compress`` as ``capture`` (None when the stage asked for none)."""

    kind = "cache"

    def attention_request(self, prompt: Prompt, run: Run) -> "AttentionCapture | None":
        return None

    def compress(self, state: Prefill, prompt: Prompt, run: Run, capture: "AttentionCapture | None") -> Prefill:
        raise NotImplementedError


class Decoder(Stage):
    """Prefilled cache -> answer tokens. ``StepDecoder`` is the default; RAPID decodes speculatively."""

    kind = "decoder"

    @property
    def record_name(self) -> str:
        """The name of this decoder's Stats record: ``decode:<name>``."""
        return f"decode:{self.name}"

    def decode(self, state: Prefill, prompt: Prompt, run: Run, on_text=None) -> DecodeResult:
        raise NotImplementedError


@dataclass
class TokenPrefill(InputStage):
    """The default input stage: the model runs the prompt's token ids at positions 0..n-1 (``chunk_size``
    tokens per forward when set, to bound attention memory on long prompts). The cache has slots for the answer
    after the prompt's, so a decoder that extends it in place (RAPID's verifier) needs no copy."""

    chunk_size: int | None = None
    name = "prefill"

    def prefill(self, prompt: Prompt, run: Run) -> Prefill:
        return prefill(run.lm.model, prompt.input_ids, chunk_size=self.chunk_size, room=run.config.max_new_tokens)


class StepDecoder(Decoder):
    """The default decoder: greedy or sampled, one token per forward, at explicit positions."""

    name = "step"

    @property
    def record_name(self) -> str:
        return "decode"

    def decode(self, state: Prefill, prompt: Prompt, run: Run, on_text=None) -> DecodeResult:
        lm = run.lm
        return decode(lm.model, lm.tokenizer, state, run.config, lm.eos_token_ids, on_text)


def resolve_budget(budget: int | float, total: int, what: str = "budget") -> int:
    """A budget as a token count (int >= 1) or a ratio of ``total`` (float in (0, 1]) -> a token count.

    A budget at or above ``total`` returns ``total``: the caller treats that as a no-op.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise InputError(f"{what} must be a token count (int) or a ratio (float in (0, 1]); got {budget!r}.")
    if budget <= 0:
        raise InputError(f"{what} must be positive; got {budget}.")
    if isinstance(budget, float):
        if budget > 1.0:
            raise InputError(f"A float {what} is a ratio and must be in (0, 1]; pass an int for a token count.")
        return max(1, min(total, round(budget * total)))
    return min(int(budget), total)


def budget_tokens(budget: int | float, current: int, run: Run | None = None) -> int:
    """The budget as prefilled prompt tokens: a ratio is of the uncompressed prompt (``run.prompt_tokens``, or
    ``current``, the length of the prompt in hand, when the run does not know it)."""
    whole = run.prompt_tokens if run is not None and run.prompt_tokens else current
    return resolve_budget(budget, max(whole, current))


def tokens_to_keep(
    name: str, budget: int | float, total: int, run: Run | None = None, window: int = 0,
    what: str = "nothing dropped", note: bool = True,
) -> int | None:
    """The budget as a token count (``budget_tokens``), or None when it covers all ``total`` tokens (a no-op,
    noted in ``run`` when ``note``).

    A stage that always keeps a ``window`` of recent positions needs a budget larger than that window.
    """
    keep = budget_tokens(budget, total, run)
    if keep >= total:
        if run is not None and note:
            run.note(f"{name}: budget {budget} >= prompt length {total}; {what}")
        return None
    if keep <= window:
        raise InputError(
            f"{name}: the budget ({keep} positions) must exceed the window ({window}); "
            "pass a larger budget or a smaller window."
        )
    return keep


def prompt_length(run: Run, passages: list[Passage]) -> int:
    """Tokens of the prompt built around ``passages`` (``run.measure_prompt``); without a builder (a stage used
    outside a Pipeline) the passages' own tokens."""
    if run.measure_prompt is not None:
        return run.measure_prompt(passages)
    return count_tokens(run.lm.tokenizer, passages)


def context_room(name: str, budget: int | float, passages: list[Passage], run: Run) -> tuple[int, int] | None:
    """A passage stage's budget as (prompt tokens it may fill, the prompt's fixed part), or None when the prompt
    around all ``passages`` already fits. The fixed part (template, instruction, question, answer prefix) is the
    prompt built around no passage. A budget that leaves no room beside it is an error naming the smallest
    budget that keeps any context."""
    whole = prompt_length(run, passages)
    keep = budget_tokens(budget, whole, run)
    if keep >= whole:
        run.note(f"{name}: budget {budget} >= prompt length {whole}; nothing dropped")
        return None
    fixed = prompt_length(run, []) if run.measure_prompt is not None else 0
    if keep <= fixed:
        ratio = f" or a ratio above {fixed / run.prompt_tokens:.3f}" if run.prompt_tokens else ""
        raise InputError(
            f"{name}: budget {budget} ({keep} prompt tokens) leaves no room for context beside the prompt's "
            f"{fixed} fixed tokens (template, instruction, question); pass at least {fixed + 1} tokens{ratio}."
        )
    return keep, fixed


def take_in_order(ranked: list[int], sizes: list[int], room: int) -> list[int]:
    """Units (sentences, chunks) taken in ``ranked`` order while their ``sizes`` fit ``room`` tokens; one that
    does not fit is skipped, so a later, smaller one may still be taken."""
    chosen, used = [], 0
    for unit in ranked:
        if used + sizes[unit] <= room:
            chosen.append(unit)
            used += sizes[unit]
    return chosen


def fill_prompt(
    ranked: list[int], sizes: list[int], room: tuple[int, int], build: Callable[[list[int]], list[Passage]],
    run: Run,
) -> list[Passage]:
    """The passages ``build(chosen)`` makes from the units ``take_in_order`` takes into ``room`` = (prompt
    tokens, fixed part) from ``context_room``. The numbering and separators between passages cost tokens the
    units' sizes do not count, so the prompt is then measured with the prompt builder: the lowest-ranked units
    are dropped until it fits, and the units left out are offered again, in rank order, where the measured room
    still holds them."""
    keep, fixed = room
    chosen = take_in_order(ranked, sizes, keep - fixed)
    length = prompt_length(run, build(chosen))
    while chosen and length > keep:
        chosen.pop()
        length = prompt_length(run, build(chosen))
    taken = set(chosen)
    for unit in ranked:
        if unit not in taken and sizes[unit] <= keep - length:
            trial = prompt_length(run, build(chosen + [unit]))
            if trial <= keep:
                chosen.append(unit)
                taken.add(unit)
                length = trial
    return build(chosen)


@dataclass
class Truncate(TokenStage):
    """Baseline: keep instruction/question/template tokens, and the start and end of the context to fit
    the budget (half from each end), counting every kept prompt token against the budget."""

    budget: int | float = 1024
    name = "truncate"

    def select(self, prompt: Prompt, run: Run) -> Prompt:
        keep_total = tokens_to_keep(self.name, self.budget, len(prompt), run)
        if keep_total is None:
            return prompt
        is_context = prompt.segment == CONTEXT
        fixed = (~is_context).nonzero().flatten()
        context = is_context.nonzero().flatten()
        room = keep_total - len(fixed)
        if room < 0:
            raise InputError(
                f"truncate: budget {keep_total} is smaller than the {len(fixed)} template/instruction/question "
                f"tokens; pass at least {len(fixed) + 1} tokens."
            )
        head = room - room // 2
        tail = room // 2
        kept_context = torch.cat([context[:head], context[len(context) - tail:] if tail else context[:0]])
        return prompt.select(torch.cat([fixed, kept_context]))
