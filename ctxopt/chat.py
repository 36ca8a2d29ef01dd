"""How ctxopt reads a chat: which earlier messages are the system prompt and which are context.

One rule for every chat front end (``CtxoptChatModel`` in ctxopt.integrations.langchain and ``ctxopt serve``):
the last message, the user's, is the question; of the messages before it, a system (or OpenAI ``developer``)
message is the system prompt, several joined by blank lines, unless it is marked as context; every other message
(user, assistant, tool, and marked system messages) is context, one passage per non-blank text block.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .measure import measure
from .types import Passage, Prompt, Stats

SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True)
class ChatTurn:
    """One message before the question: its role (OpenAI's or LangChain's message type), its text blocks, the
    name its passages get (``messages[0]``), whether it is marked as context, and metadata for its passages."""

    role: str
    texts: Sequence[str]
    source: str
    as_context: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


def split_chat(turns: Sequence[ChatTurn], part: str = "block") -> tuple[list[Passage], str | None]:
    """The context passages and the system prompt (None without one) of the messages before the question.

    A passage is named after its message (``source``), with ``.{part}[j]`` added when the message holds several
    text blocks, and carries the turn's metadata."""
    passages: list[Passage] = []
    system: list[str] = []
    for turn in turns:
        if turn.role in SYSTEM_ROLES and not turn.as_context:
            system += [text for text in turn.texts if text.strip()]
            continue
        for j, text in enumerate(turn.texts):
            if text.strip():
                source = turn.source + (f".{part}[{j}]" if len(turn.texts) > 1 else "")
                passages.append(Passage(text=text, source=source, metadata=dict(turn.metadata)))
    return passages, "\n\n".join(system) or None


def plain_prompt(pipe, question: str) -> Prompt:
    """The prompt of a chat with no context, built by ``pipe`` (a Pipeline without stages or instruction, so the
    model answers as a plain chat model), its ``prompt`` step recorded in its stats."""
    with measure("prompt", pipe.lm.device) as record:
        prompt = pipe.build_prompt(question, [])
        record.tokens_out = len(prompt)
    prompt.stats = Stats(stages=[record])
    return prompt
