"""Plain data types that flow through a ctxopt pipeline.

Passage -> Prompt (token ids + provenance, and the Stats of building it) -> Prefill (KV cache + next position)
-> Answer (+ Stats).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Passage:
    """A piece of context text and where it came from.

    ``span`` is the character span of ``text`` inside the source document, so a citation can point at
    the exact place. ``metadata`` is carried through every stage untouched (LangChain metadata lives here).
    """

    text: str
    source: str = ""
    span: tuple[int, int] | None = None
    score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def __post_init__(self) -> None:
        if self.span is None:
            self.span = (0, len(self.text))
        if self.id is None:
            digest = hashlib.sha1(f"{self.source}:{self.span}:{self.text}".encode()).hexdigest()
            self.id = digest[:12]

    def replace(self, **changes: Any) -> "Passage":
        return dataclasses.replace(self, **changes)


@dataclass
class StageStats:
    """What one stage did and what it cost."""

    stage: str
    tokens_in: int | None = None
    tokens_out: int | None = None
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    kv_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stats:
    """Per-stage records plus the totals a user asks for first."""

    stages: list[StageStats] = field(default_factory=list)
    # Remarks a stage made about its run ("budget >= prompt length; nothing dropped"); the pipeline moves them
    # into the last record's ``extra["notes"]`` when the answer is complete.
    notes: list[str] = field(default_factory=list)

    def add(self, record: StageStats) -> StageStats:
        self.stages.append(record)
        return record

    def get(self, stage: str) -> StageStats | None:
        for record in self.stages:
            if record.stage == stage:
                return record
        return None

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def reused_seconds(self) -> float:
        """Seconds of shared work this run reused instead of running (a shared prefill, a shared selection
        pass): its records count them, its wall time does not."""
        return sum(
            (s.seconds if s.extra.get("shared_prefill") else 0.0) + s.extra.get("shared_pass_seconds", 0.0)
            for s in self.stages
        )

    def decode_record(self) -> StageStats | None:
        """The decoder's record: "decode", or "decode:<name>" for a decoder stage such as RAPID."""
        return next((r for r in self.stages if r.stage == "decode" or r.stage.startswith("decode:")), None)

    @property
    def ttft_seconds(self) -> float:
        """Seconds until the first answer token: every stage before the decoder plus its first step."""
        total = 0.0
        for record in self.stages:
            if record is self.decode_record():
                return total + float(record.extra.get("first_token_seconds") or 0.0)
            total += record.seconds
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "total_seconds": self.total_seconds,
            "ttft_seconds": self.ttft_seconds,
        }

    def summary(self) -> str:
        parts = []
        for s in self.stages:
            piece = f"{s.stage}: {s.seconds:.2f}s"
            if s.tokens_in is not None and s.tokens_out is not None:
                piece += f" {s.tokens_in}->{s.tokens_out} tok"
            if s.kv_bytes is not None:
                piece += f" kv={s.kv_bytes / 2**20:.1f}MiB"
            if s.peak_memory_bytes is not None:
                piece += f" peak={s.peak_memory_bytes / 2**20:.0f}MiB"
            parts.append(piece)
        return " | ".join(parts) + f" | ttft={self.ttft_seconds:.2f}s total={self.total_seconds:.2f}s"


# Segment codes of prompt tokens.
TEMPLATE, CONTEXT, QUESTION = 0, 1, 2


@dataclass
class Prompt:
    """Token ids of a chat prompt with per-token provenance.

    For token ``i``: ``passage_index[i]`` is the passage it came from (-1 for template, instruction and
    question tokens), ``char_spans[i]`` its character span inside that passage's text ((-1, -1) when
    it has none), ``segment[i]`` one of TEMPLATE / CONTEXT / QUESTION, and ``positions[i]`` its position
    in the original, uncompressed prompt. Token stages return ``prompt.select(kept)``; provenance follows.
    """

    input_ids: torch.Tensor
    passage_index: torch.Tensor
    char_spans: torch.Tensor
    segment: torch.Tensor
    positions: torch.Tensor
    passages: list[Passage]
    question: str
    text: str = ""
    # How the prompt was framed (``prompting.build_prompt``'s arguments), so a second model can be given the
    # same frame around other passages (RAPID's drafter). None: ctxopt's default instruction.
    instruction: str | None = None
    system: str | None = None
    answer_prefix: str = ""
    # What building this prompt cost so far (retrieval, passage stages, the template, token stages): the
    # generator goes on writing into the same ledger, so an answer's Stats cover the whole run.
    stats: Stats = field(default_factory=Stats, repr=False, compare=False)
    # A draft model's greedy answer to this prompt, in the prompt's token ids, when a stage produced one
    # (SpecPC with a lookahead); a later stage may reuse it instead of drafting again (SpecKV in SpecKV-PC).
    draft_answer: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # The uncompressed prompt's length, before any passage or token stage: what a ratio budget is of
    # (``Run.prompt_tokens``); None for a prompt no Pipeline compressed (its ``original_length`` stands in).
    prompt_tokens: int | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def original_length(self) -> int:
        return int(self.positions.max().item()) + 1 if len(self) else 0

    def select(self, keep: torch.Tensor | list[int]) -> "Prompt":
        """The prompt restricted to the given token indices, kept in ascending order."""
        keep = torch.as_tensor(keep, dtype=torch.long).flatten()
        keep = torch.unique(keep, sorted=True)
        if len(keep) and (keep[0] < 0 or keep[-1] >= len(self)):
            raise IndexError(f"token index out of range for a prompt of {len(self)} tokens")
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[keep],
            passage_index=self.passage_index[keep],
            char_spans=self.char_spans[keep],
            segment=self.segment[keep],
            positions=self.positions[keep],
        )

    def kept_text(self, passage: int) -> str:
        """The characters of passage ``passage`` covered by kept tokens, in order, gaps marked by ' … '."""
        rows = (self.passage_index == passage).nonzero().flatten().tolist()
        text = self.passages[passage].text
        pieces: list[str] = []
        last_end = None
        for row in rows:
            start, end = self.char_spans[row].tolist()
            if start < 0:
                continue
            if last_end is not None and start > last_end and pieces:
                pieces.append(" … " if text[last_end:start].strip() else text[last_end:start])
            if last_end is None or end > last_end:
                pieces.append(text[max(start, last_end or 0):end])
                last_end = end
        return "".join(pieces)

    def passages_kept(self) -> list[int]:
        """Indices of passages that still have at least one token in the prompt."""
        idx = self.passage_index[self.passage_index >= 0]
        return sorted(set(idx.tolist()))


@dataclass
class Answer:
    """A decoded answer, the passages it drew on, and what producing it cost."""

    text: str
    sources: list[Passage]
    stats: Stats
    token_ids: list[int] = field(default_factory=list)
    prompt: Prompt | None = None
