"""The table the examples print when they compare methods on the same questions: per method, answers correct
against the expected ones, prompt tokens prefilled, KV positions decoded from, median TTFT and its ratio to full
context's; then, for a method slower than full context or losing an answer full context keeps, a note saying
why instead of a silent loss."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..types import Answer
from .metrics import normalize_answer

COLUMNS = ("method", "correct", "prompt tokens", "KV positions", "TTFT", "TTFT / full")

# Why a method's TTFT cannot beat full context's on a CPU at an example's prompt length (METHODS.md, each
# method's cost model): what it runs before or besides the prefill it shortens.
WHY_SLOWER = {
    "snapkv": "it prefills the whole prompt, then prunes the KV cache: it saves cache memory and decode time, "
              "never TTFT",
    "speckv": "it prefills the whole prompt and first decodes a draft answer, then prunes the KV cache: it saves "
              "cache memory and decode time, not TTFT",
    "speckv-pc": "it runs a draft over the whole prompt, then prefills and decodes a draft answer: TTFT drops only "
                 "with a draft several times smaller than the target on a prompt of thousands of tokens",
    "specpc": "it runs a draft model over the whole prompt before the target's shorter prefill: TTFT drops only with "
              "a draft several times smaller than the target on a prompt of thousands of tokens",
    "gemfilter": "it runs the target's first layers over the whole prompt before the shorter prefill: TTFT drops "
                 "only when the whole prefill is long (thousands of tokens)",
    "rag": "it embeds and ranks the context's chunks before the prefill: on a short context that costs about what "
           "it saves",
    "extractive": "it scores every sentence of the context before the prefill: on a short context that costs about "
                  "what it saves",
    "color": "a second model summarises the context before the prefill",
    "refrag": "it encodes the context's chunks with the encoder before the prefill",
    "rapid": "it prefills the whole prompt for the target and a retrieved one for the drafter: RAPID speeds up "
             "decoding, not the first token",
}


def contains_answer(text: str, answers: list[str]) -> bool:
    """Whether ``text`` contains one of the gold ``answers``, both normalised (SQuAD's normalisation)."""
    return any(normalize_answer(gold) in normalize_answer(text) for gold in answers)


def kv_positions(stages: list[dict]) -> int:
    """Cache positions the decoder started from: the output of the last stage before decoding (``stages`` as
    ``Stats.to_dict()`` lists them, as in a LangChain reply's ``response_metadata["ctxopt"]["stats"]``)."""
    return [r["tokens_out"] for r in stages if not r["stage"].startswith("decode")][-1]


@dataclass
class MethodRow:
    """One method's results on the questions: whether each answer is correct (None: no gold answer given), and
    per question the TTFT in seconds, the prompt tokens prefilled and the KV positions decoded from."""

    method: str
    correct: list[bool | None]
    ttfts: list[float]
    prompt_tokens: list[int]
    kv: list[int]

    @property
    def ttft(self) -> float:
        return statistics.median(self.ttfts)


def method_row(method: str, answers: list[Answer], golds: list[list[str]]) -> MethodRow:
    """A row from a pipeline's answers, graded against ``golds`` (one list of gold answers per question)."""
    return MethodRow(method, [contains_answer(a.text, g) if g else None for a, g in zip(answers, golds)],
                     [a.stats.ttft_seconds for a in answers], [len(a.prompt) for a in answers],
                     [kv_positions(a.stats.to_dict()["stages"]) for a in answers])


def method_table(rows: list[MethodRow], full: str = "full") -> str:
    """The rows as an aligned text table with ``COLUMNS`` (medians over questions); '-' for correct without gold
    answers and for the ratio without a full-context row."""
    base = next((r for r in rows if r.method == full), None)
    lines = [COLUMNS]
    for r in rows:
        ratio = f"{r.ttft / base.ttft:.2f}x" if base and base.ttft > 0 else "-"
        correct = "-" if None in r.correct else f"{sum(r.correct)}/{len(r.correct)}"
        lines.append((r.method, correct, f"{statistics.median(r.prompt_tokens):.0f}", f"{statistics.median(r.kv):.0f}",
                      f"{r.ttft:.2f}s", ratio))
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def method_notes(rows: list[MethodRow], full: str = "full") -> list[str]:
    """One line per method that is slower than full context (and why), or loses answers full context keeps."""
    base = next((r for r in rows if r.method == full), None)
    if base is None:
        return []
    notes = []
    for r in rows:
        if r is base:
            continue
        lost = sum(bool(b and c is False) for b, c in zip(base.correct, r.correct))
        if lost:
            notes.append(f"{r.method} lost {lost} answer(s) that full context kept at this budget: a larger --budget "
                         "keeps more of the context")
        if r.ttft >= base.ttft:
            why = WHY_SLOWER.get(r.method.split("+")[-1], "its selection costs more than the prefill it saves")
            notes.append(f"{r.method} is not faster than full context here ({r.ttft:.2f}s vs {base.ttft:.2f}s): {why}")
    return notes
