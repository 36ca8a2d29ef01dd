"""Prompt assembly: instruction + passages + question through the model's chat template, as token ids
whose every token remembers which passage and which character span it came from.

Tokenization is most of the cost of a prompt (the gateway pays it on every request). For byte-level BPE
tokenizers (SmolLM2, Qwen2.5, Llama 3, GPT-2) ``_encode`` asks the Rust tokenizer for ids only, which skips its
offset tracking, and derives each token's character span from the bytes the token stands for; it first checks
that the tokens spell the text byte for byte, and otherwise (or for any other tokenizer) asks the tokenizer for
offsets as before. Both give the same ids and offsets (tests/test_prompting.py compares them).
"""
from __future__ import annotations

import itertools
import threading
import unicodedata
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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
    ids, offsets = _encode(tokenizer, text)
    passage_index, char_spans, segment = _provenance(offsets, [(base + s, base + e) for s, e in ranges],
                                                     (base + question_range[0], base + question_range[1]))
    return Prompt(
        input_ids=torch.from_numpy(ids),
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


def _provenance(offsets, passages: list[tuple[int, int]],
                question: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: passage index, character span inside that passage, and segment, from the tokens' character
    offsets (pairs, or an (n, 2) array) and the passages' and question's character ranges in the prompt text
    (passages in order, not overlapping).

    A token belongs to the first passage that ends after its first character when it overlaps it (BPE tokens
    often carry the preceding space, so their start can sit just before the passage); its span is clipped to
    the passage. A token overlapping the question is QUESTION; everything else, and empty tokens, is TEMPLATE.
    Vectorised (numpy): a per-token Python loop cost 0.8 s at 16K tokens, all of it before the prefill.
    """
    spans = _offsets_array(offsets)
    start, end = spans[:, 0], spans[:, 1]
    n = len(spans)
    passage_index = np.full(n, -1, dtype=np.int64)
    char_spans = np.full((n, 2), -1, dtype=np.int64)
    segment = np.full(n, TEMPLATE, dtype=np.int64)
    nonempty = end > start
    in_passage = np.zeros(n, dtype=bool)
    if passages:
        bounds = np.asarray(passages, dtype=np.int64).reshape(-1, 2)
        which = np.searchsorted(bounds[:, 1], start, side="right")  # the first passage ending after start
        p_start, p_end = bounds[np.minimum(which, len(bounds) - 1)].T
        in_passage = nonempty & (which < len(bounds)) & (start < p_end) & (end > p_start)
        passage_index[in_passage] = which[in_passage]
        char_spans[in_passage, 0] = (np.maximum(start, p_start) - p_start)[in_passage]
        char_spans[in_passage, 1] = (np.minimum(end, p_end) - p_start)[in_passage]
        segment[in_passage] = CONTEXT
    in_question = nonempty & ~in_passage & (start < question[1]) & (end > question[0])
    segment[in_question] = QUESTION
    return torch.from_numpy(passage_index), torch.from_numpy(char_spans), torch.from_numpy(segment)


def _offsets_array(offsets) -> np.ndarray:
    """Character offsets as an (n, 2) int64 array (from a list of pairs without a per-pair conversion)."""
    if isinstance(offsets, np.ndarray):
        return offsets.reshape(-1, 2)
    flat = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
    return flat.reshape(-1, 2)


# -- tokenization ---------------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and (n, 2) character offsets of ``text``, no special tokens added: those of
    ``tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)``, by the byte-level fast path
    where it applies and is verified, else by that call."""
    table = _byte_table(tokenizer)
    if table is not None and _encodes_as_called(tokenizer, text):
        ids = np.array(tokenizer.backend_tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids,
                       dtype=np.int64)
        offsets = table.offsets(ids, text)
        if offsets is not None:
            return ids, offsets
    return _encode_with_offsets(tokenizer, text)


def _encode_with_offsets(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids and offsets from the tokenizer's own offset tracking (any fast tokenizer): the reference."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.array(encoded["input_ids"], dtype=np.int64), _offsets_array(encoded["offset_mapping"])


@dataclass(frozen=True)
class _ByteTable:
    """The bytes each token id stands for in a byte-level BPE vocabulary: ``lengths`` (-1 for an id that is
    not a byte string), and every id's bytes laid end to end in ``flat`` from ``first[id]``."""

    size: int
    lengths: np.ndarray
    first: np.ndarray
    flat: np.ndarray

    def offsets(self, ids: np.ndarray, text: str) -> np.ndarray | None:
        """Each token's character span in ``text``, or None unless the tokens spell ``text`` byte for byte.

        A token's bytes start where the previous token's end (the tokens spell the text, checked); a token
        that begins or ends inside a multi-byte character spans that whole character, as the tokenizer's own
        byte-to-character offsets do."""
        if len(ids) and (ids.max() >= self.size or ids.min() < 0):
            return None
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        lengths = self.lengths[ids]
        if (lengths < 1).any() or int(lengths.sum()) != len(raw):
            return None
        ends = np.cumsum(lengths)
        starts = ends - lengths
        spelled = self.flat[np.repeat(self.first[ids] - starts, lengths) + np.arange(len(raw))]
        if not np.array_equal(spelled, raw):
            return None
        if len(raw) == len(text):  # ASCII: a byte is a character
            return np.stack([starts, ends], axis=1)
        char_of_byte = np.cumsum((raw & 0xC0) != 0x80) - 1  # UTF-8 continuation bytes are 10xxxxxx
        return np.stack([char_of_byte[starts], char_of_byte[ends - 1] + 1], axis=1)


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def _byte_table(tokenizer) -> _ByteTable | None:
    """The byte table of a byte-level BPE tokenizer whose offsets the fast path reproduces (ByteLevel decoder,
    no normalizer or NFC, a post-processor that leaves offsets alone), built once per tokenizer and vocabulary
    size; None for any other tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    size = backend.get_vocab_size(with_added_tokens=True)
    with _TABLES_LOCK:
        table = _TABLES.get(tokenizer, False)
    if table is not False and (table is None or table.size == size):
        return table
    table = _build_byte_table(backend, size) if _offsets_reproducible(tokenizer, backend) else None
    with _TABLES_LOCK:
        _TABLES[tokenizer] = table
    return table


def _offsets_reproducible(tokenizer, backend) -> bool:
    """Whether this tokenizer's offsets are the spans of its tokens' bytes: a ByteLevel decoder (byte-string
    vocabulary), no normalizer or NFC (identity on NFC text, checked per text), a post-processor that adds
    nothing without special tokens and trims no offsets, and the library's own encode call (no subclass
    reworking the text)."""
    from tokenizers import decoders, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    post = backend.post_processor
    return (
        isinstance(backend.decoder, decoders.ByteLevel)
        and (backend.normalizer is None or isinstance(backend.normalizer, normalizers.NFC))
        and (post is None or isinstance(post, processors.TemplateProcessing)
             or (isinstance(post, processors.ByteLevel) and not post.trim_offsets))
        and type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
        and type(tokenizer)._encode_plus is PreTrainedTokenizerFast._encode_plus
    )


def _encodes_as_called(tokenizer, text: str) -> bool:
    """Whether the Rust tokenizer, called directly, encodes ``text`` as ``tokenizer(text)`` would: special tokens
    in the text treated as the tokenizer says, and an NFC normalizer (if any) that leaves this text as it is.
    (Truncation or padding left set on it would change the tokens, which then do not spell the text.)"""
    backend = tokenizer.backend_tokenizer
    return backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False)) and (
        backend.normalizer is None or unicodedata.is_normalized("NFC", text)
    )


def _build_byte_table(backend, size: int) -> _ByteTable:
    """Bytes per id: a vocabulary entry's byte-level characters mapped back to bytes (GPT-2's byte alphabet),
    an added token's text as UTF-8."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {char: chr(byte) for byte, char in bytes_to_unicode().items()}
    decode = str.maketrans(to_byte)
    alphabet = set(to_byte)
    pieces: list[bytes | None] = [None] * size
    for piece, i in backend.get_vocab(with_added_tokens=False).items():
        if i < size and alphabet.issuperset(piece):
            pieces[i] = piece.translate(decode).encode("latin-1")
    for i, token in backend.get_added_tokens_decoder().items():
        if i < size:
            pieces[i] = token.content.encode("utf-8")
    lengths = np.array([-1 if p is None else len(p) for p in pieces], dtype=np.int64)
    first = np.cumsum(np.maximum(lengths, 0)) - np.maximum(lengths, 0)
    flat = np.frombuffer(b"".join(p for p in pieces if p is not None), dtype=np.uint8)
    return _ByteTable(size=size, lengths=lengths, first=first, flat=flat)


def reframe_prompt(tokenizer, prompt: Prompt, passages: Sequence[Passage]) -> Prompt:
    """``prompt``'s question, instruction, system message and answer prefix around other ``passages``, in
    ``tokenizer``'s chat template: the prompt a second model reads when only the context differs."""
    instruction = DEFAULT_INSTRUCTION if prompt.instruction is None else prompt.instruction
    return build_prompt(tokenizer, prompt.question, passages, instruction, prompt.system, prompt.answer_prefix)
