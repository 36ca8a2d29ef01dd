"""Prompt assembly: instruction + passages + question through the model's chat template, as token ids
whose every token remembers which passage and which character span it came from."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InputError
from .types import CONTEXT, QUESTION, TEMPLATE, Passage, Prompt

DEFAULT_INSTRUCTION = (
    "Answer the question using the context below. Reply with a short answer only, no explanation."
)
PASSAGE_SEPARATOR = "\n\n"


def validate_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InputError("The question is empty: pass a non-empty question string.")
    return question.strip()


def _user_message(
    question: str, passages: Sequence[Passage], instruction: str
) -> tuple[str, list[tuple[int, int]], tuple[int, int]]:
    """The user message text, the character range of each passage inside it, and the question's range."""
    parts: list[str] = []
    cursor = 0

    def push(piece: str) -> tuple[int, int]:
        nonlocal cursor
        parts.append(piece)
        start, cursor = cursor, cursor + len(piece)
        return start, cursor

    ranges: list[tuple[int, int]] = []
    if instruction:
        push(instruction + "\n\n")
    if passages:
        push("Context:\n")
        for number, passage in enumerate(passages, start=1):
            push(f"[{number}] " if len(passages) > 1 else "")
            ranges.append(push(passage.text))
            push(PASSAGE_SEPARATOR)
    push("Question: ")
    question_range = push(question)
    return "".join(parts), ranges, question_range


def render_chat(tokenizer, user_message: str, system: str | None = None, answer_prefix: str = "") -> str:
    """The full prompt text: the chat template with a generation prompt, or a plain format for base models."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = (system + "\n\n" if system else "") + user_message + "\nAnswer:"
        if answer_prefix:
            text += " "
    return text + answer_prefix


def build_prompt(
    tokenizer,
    question: str,
    passages: Sequence[Passage] = (),
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = None,
    answer_prefix: str = "",
) -> Prompt:
    """Tokenize instruction + passages + question through the chat template, recording provenance.

    Each token whose characters start inside passage ``j`` gets ``passage_index = j`` and its character
    span relative to that passage's text (clipped to the passage); question tokens get segment QUESTION;
    everything else (template, instruction, numbering) is TEMPLATE with passage index -1.
    """
    question = validate_question(question)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("ctxopt needs a fast (Rust) tokenizer for character offsets; load the model's fast tokenizer.")
    passages = list(passages)
    user, ranges, question_range = _user_message(question, passages, instruction)
    text = render_chat(tokenizer, user, system=system, answer_prefix=answer_prefix)
    base = text.find(user)
    if base < 0:
        raise InputError("The chat template rewrote the user message; ctxopt cannot locate the passages in it.")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    offsets = encoded["offset_mapping"]
    passage_index, char_spans, segment = _provenance(offsets, [(base + s, base + e) for s, e in ranges],
                                                     (base + question_range[0], base + question_range[1]))
    return Prompt(
        input_ids=ids,
        passage_index=passage_index,
        char_spans=char_spans,
        segment=segment,
        positions=torch.arange(len(ids)),
        passages=passages,
        question=question,
        text=text,
        instruction=instruction,
        system=system,
        answer_prefix=answer_prefix,
    )


def _provenance(offsets: list[tuple[int, int]], passages: list[tuple[int, int]],
                question: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: passage index, character span inside that passage, and segment, from the tokens' character
    offsets and the passages' and question's character ranges in the prompt text (passages in order, not
    overlapping).

    A token belongs to the first passage that ends after its first character when it overlaps it (BPE tokens
    often carry the preceding space, so their start can sit just before the passage); its span is clipped to
    the passage. A token overlapping the question is QUESTION; everything else, and empty tokens, is TEMPLATE.
    Vectorised: a per-token Python loop cost 0.8 s at 16K tokens, all of it before the prefill.
    """
    spans = torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)
    start, end = spans[:, 0].contiguous(), spans[:, 1].contiguous()
    n = spans.shape[0]
    passage_index = torch.full((n,), -1, dtype=torch.long)
    char_spans = torch.full((n, 2), -1, dtype=torch.long)
    segment = torch.full((n,), TEMPLATE, dtype=torch.long)
    nonempty = end > start
    in_passage = torch.zeros(n, dtype=torch.bool)
    if passages:
        bounds = torch.tensor(passages, dtype=torch.long)
        which = torch.searchsorted(bounds[:, 1].contiguous(), start, right=True)  # first passage ending after start
        found = which < len(passages)
        p_start, p_end = bounds[which.clamp(max=len(passages) - 1)].unbind(1)
        in_passage = nonempty & found & (start < p_end) & (end > p_start)
        passage_index[in_passage] = which[in_passage]
        char_spans[in_passage, 0] = (torch.maximum(start, p_start) - p_start)[in_passage]
        char_spans[in_passage, 1] = (torch.minimum(end, p_end) - p_start)[in_passage]
        segment[in_passage] = CONTEXT
    in_question = nonempty & ~in_passage & (start < question[1]) & (end > question[0])
    segment[in_question] = QUESTION
    return passage_index, char_spans, segment


def reframe_prompt(tokenizer, prompt: Prompt, passages: Sequence[Passage]) -> Prompt:
    """``prompt``'s question, instruction, system message and answer prefix around other ``passages``, in
    ``tokenizer``'s chat template: the prompt a second model reads when only the context differs."""
    instruction = DEFAULT_INSTRUCTION if prompt.instruction is None else prompt.instruction
    return build_prompt(tokenizer, prompt.question, passages, instruction, prompt.system, prompt.answer_prefix)
