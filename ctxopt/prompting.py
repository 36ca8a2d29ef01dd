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
    n = len(ids)
    passage_index = torch.full((n,), -1, dtype=torch.long)
    char_spans = torch.full((n, 2), -1, dtype=torch.long)
    segment = torch.full((n,), TEMPLATE, dtype=torch.long)
    absolute = [(base + s, base + e) for s, e in ranges]
    q_start, q_end = base + question_range[0], base + question_range[1]
    which = 0
    for i, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        while which < len(absolute) and absolute[which][1] <= start:
            which += 1
        # A token belongs to a passage when its characters overlap the passage's (BPE tokens often
        # carry the preceding space, so their start can sit just before the passage).
        if which < len(absolute) and start < absolute[which][1] and end > absolute[which][0]:
            p_start, p_end = absolute[which]
            passage_index[i] = which
            char_spans[i, 0] = max(start, p_start) - p_start
            char_spans[i, 1] = min(end, p_end) - p_start
            segment[i] = CONTEXT
        elif start < q_end and end > q_start:
            segment[i] = QUESTION
    return Prompt(
        input_ids=ids,
        passage_index=passage_index,
        char_spans=char_spans,
        segment=segment,
        positions=torch.arange(n),
        passages=passages,
        question=question,
        text=text,
        instruction=instruction,
        system=system,
        answer_prefix=answer_prefix,
    )


def reframe_prompt(tokenizer, prompt: Prompt, passages: Sequence[Passage]) -> Prompt:
    """``prompt``'s question, instruction, system message and answer prefix around other ``passages``, in
    ``tokenizer``'s chat template: the prompt a second model reads when only the context differs."""
    instruction = DEFAULT_INSTRUCTION if prompt.instruction is None else prompt.instruction
    return build_prompt(tokenizer, prompt.question, passages, instruction, prompt.system, prompt.answer_prefix)
