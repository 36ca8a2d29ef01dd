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
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from .decoding import DecodeResult, GenerationConfig, Prefill
from .errors import InputError
from .measure import measure
from .types import CONTEXT, Passage, Prompt, StageStats, Stats

if TYPE_CHECKING:
    from .attention import AttentionCapture
    from .models import LoadedModel
    from .pipeline import PrefillMemo

KINDS = ("passage", "token", "input", "cache", "decoder")
STAGE_EXTRA_KEY = "stage_extra"


@dataclass
class Run:
    """What one question's run shares between its stages."""

    lm: "LoadedModel"
    question: str
    config: GenerationConfig
    stats: Stats
    embedder: Callable[[], Any] | None = None
    passages: list[Passage] = field(default_factory=list)
    memo: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prefill_memo: "PrefillMemo | None" = None

    def note(self, text: str) -> None:
        self.notes.append(text)

    def add_record(self, record: StageStats) -> None:
        """Add a stage's Stats record with the stage's own cost breakdown (``memo["stage_extra"]``). A shared
        pass the stage reused (``shared``) counts in the record as if it had run: its seconds and peak memory."""
        extra = self.memo.pop(STAGE_EXTRA_KEY, {})
        record.extra.update(extra)
        if "shared_pass_seconds" in extra:
            record.seconds += extra["shared_pass_seconds"]
            record.peak_memory_bytes = max(record.peak_memory_bytes or 0, extra["shared_pass_peak_bytes"])
        self.stats.add(record)

    def shared(self, key: tuple, input_ids: torch.Tensor, compute: Callable[[], Any]) -> tuple[Any, float, bool]:
        """``compute()``, a pass over the prompt ``input_ids`` that does not depend on the budget, done once per
        ``key`` (stage, model and knobs) when the pipeline shares a ``PrefillMemo``. Returns (value, seconds
        the pass took when it ran, reused); ``add_record`` charges a reused pass's cost to the stage."""
        if self.prefill_memo is None:
            began = time.perf_counter()
            return compute(), time.perf_counter() - began, False
        found = self.prefill_memo.find_pass(key, input_ids)
        if found is not None:
            value, record = found
            extra = self.memo.setdefault(STAGE_EXTRA_KEY, {})
            extra["shared_pass_seconds"] = extra.get("shared_pass_seconds", 0.0) + record.seconds
            extra["shared_pass_peak_bytes"] = max(extra.get("shared_pass_peak_bytes", 0), record.peak_memory_bytes or 0)
            return value, record.seconds, True
        with measure(key[0], self.lm.device) as record:
            value = compute()
        self.prefill_memo.store_pass(key, input_ids, value, record)
        return value, record.seconds, False


class Stage:
    """Base of every stage. ``kind`` places it in the pipeline; ``name`` labels its Stats record."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""


class PassageStage(Stage):
    kind = "passage"

    def compress(self, question: str, passages: list[Passage], run: Run) -> list[Passage]:
        raise NotImplementedError


class TokenStage(Stage):
    kind = "token"

    def select(self, prompt: Prompt, run: Run) -> Prompt:
        raise NotImplementedError


class InputStage(Stage):
    kind = "input"

    def prefill(self, prompt: Prompt, run: Run) -> Prefill:
        raise NotImplementedError


class CacheStage(Stage):
    """Prunes a prefilled cache. A stage that scores with the prefill's own attention (SnapKV, SpecKV)
    returns a request from ``attention_request``; the pipeline runs the prefill under that capture."""

    kind = "cache"

    def attention_request(self, prompt: Prompt, run: Run) -> "AttentionCapture | None":
        return None

    def compress(self, state: Prefill, prompt: Prompt, run: Run) -> Prefill:
        raise NotImplementedError


class Decoder(Stage):
    kind = "decoder"

    def decode(self, state: Prefill, prompt: Prompt, run: Run, on_text=None) -> DecodeResult:
        raise NotImplementedError


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


def tokens_to_keep(
    name: str, budget: int | float, total: int, run: Run | None = None, window: int = 0, what: str = "nothing dropped"
) -> int | None:
    """The budget as a token count, or None when it covers all ``total`` tokens (a no-op, noted in ``run``).

    A stage that always keeps a ``window`` of recent positions needs a budget larger than that window.
    """
    keep = resolve_budget(budget, total)
    if keep >= total:
        if run is not None:
            run.note(f"{name}: budget {budget} >= prompt length {total}; {what}")
        return None
    if keep <= window:
        raise InputError(
            f"{name}: the budget ({keep} positions) must exceed the window ({window}); "
            "pass a larger budget or a smaller window."
        )
    return keep


class Truncate(TokenStage):
    """Baseline: keep instruction/question/template tokens, and the start and end of the context to fit
    the budget (half from each end), counting every kept prompt token against the budget."""

    name = "truncate"

    def __init__(self, budget: int | float = 1024):
        self.budget = budget

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
                f"truncate: budget {keep_total} is smaller than the {len(fixed)} instruction/question tokens."
            )
        head = room - room // 2
        tail = room // 2
        kept_context = torch.cat([context[:head], context[len(context) - tail:] if tail else context[:0]])
        return prompt.select(torch.cat([fixed, kept_context]))
