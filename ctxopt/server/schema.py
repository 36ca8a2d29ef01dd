"""The wire format of the gateway: an OpenAI chat-completions body in, OpenAI-shaped responses, stream chunks and
error bodies out.

``parse_chat_request`` checks a decoded JSON body by hand (every message names the field, as OpenAI's ``param``)
and returns a :class:`ChatRequest`: the question (the last message, a user one), the context it carries (an
extra ``documents`` field, or the earlier messages other than system ones: ``ctxopt.chat.split_chat``, the rule
of ``CtxoptChatModel``), the system prompt, the decoding settings and the per-request ``ctxopt`` overrides
(``method``, ``budget``, ``options``, ``k``). Fields that would change the answer in a way ctxopt cannot honour
(``n`` > 1, tools, log-probabilities, a JSON response format, sampling penalties) are refused rather than
ignored; fields that change nothing here (``user``, ``metadata``, ``store``) are ignored.
"""
from __future__ import annotations

import json
import numbers
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..chat import ChatTurn, split_chat
from ..types import Passage

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TEXT_PART_TYPES = ("text", "input_text")
OVERRIDE_KEYS = ("method", "budget", "options", "k")
MAX_STOP_STRINGS = 16
MAX_K = 100
# Sampling knobs ctxopt's decoders do not have: accepted only at the value that means "off".
UNSUPPORTED_AT = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "logprobs": False,
                  "top_logprobs": 0, "tools": [], "functions": []}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status; ``headers`` go on the response."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code=code, param=param)


@dataclass
class ChatRequest:
    """A checked chat request. ``context``: the passages the request carries (None: the server's index, else
    none); ``system``: the system prompt (the system messages)."""

    question: str
    context: list[Passage] | None
    context_from: str  # "documents", "messages" or "none"
    system: str | None = None
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    generation: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)


# -- small typed readers --------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def _int(body: dict, name: str, minimum: int | None = None, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        span = f" in {minimum}..{maximum}" if maximum is not None else f" >= {minimum}" if minimum is not None else ""
        raise bad_request(f"{name} must be an integer{span}; got {value!r}.", param=name)
    return int(value)


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or value > high or value < low or (low_open and value == low):
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad_request(f"{name} must be a number in {span}; got {value!r}.", param=name)
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false; got {value!r}.", param=name)
    return value


# -- messages, documents, overrides ---------------------------------------------------------------------------
def message_texts(message: dict, where: str) -> list[str]:
    """The text of one message: a string content, or the text of each text part of a list content."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of text parts.", param=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise bad_request(f"ctxopt reads text only; {where}.content[{j}] is a {kind!r} part.",
                              param=f"{where}.content[{j}]")
        texts.append(part["text"])
    return texts


def split_messages(messages: Any) -> tuple[str, list[Passage], str | None]:
    """The question (the last message, which must be the user's), the context and the system prompt of the
    earlier messages (``ctxopt.chat.split_chat``: system and developer messages are the system prompt, every
    other message is context, one passage per text block)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object with role and content.", param=f"messages[{i}]")
        if message.get("role") not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {message.get('role')!r}.",
                              param=f"messages[{i}].role")
    last = len(messages) - 1
    if messages[last]["role"] != "user":
        raise bad_request(f"The last message must be the user's question; got a {messages[last]['role']} message.",
                          param=f"messages[{last}]")
    question = "".join(message_texts(messages[last], f"messages[{last}]")).strip()
    if not question:
        raise bad_request("The last user message (the question) is empty.", param=f"messages[{last}].content")
    turns = [ChatTurn(message["role"], message_texts(message, f"messages[{i}]"), f"messages[{i}]",
                      metadata={"role": message["role"]}) for i, message in enumerate(messages[:last])]
    passages, system = split_chat(turns, part="content")
    return question, passages, system


def parse_documents(documents: Any) -> list[Passage]:
    """The ``documents`` field: strings, or objects with ``text`` and optional ``source`` and ``metadata``."""
    if not isinstance(documents, list) or not documents:
        raise bad_request("documents must be a non-empty list of strings or {text, source, metadata} objects.",
                          param="documents")
    passages = []
    for i, item in enumerate(documents):
        where = f"documents[{i}]"
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be a string or an object with text.", param=where)
        unknown = sorted(set(item) - {"text", "source", "metadata", "id"})
        if unknown:
            raise bad_request(f"{where} has unknown fields {unknown}; it takes text, source, metadata.", param=where)
        text, source, metadata = item.get("text"), item.get("source"), item.get("metadata")
        if not isinstance(text, str):
            raise bad_request(f"{where}.text must be a string.", param=f"{where}.text")
        if source is not None and not isinstance(source, str):
            raise bad_request(f"{where}.source must be a string.", param=f"{where}.source")
        if metadata is not None and not isinstance(metadata, dict):
            raise bad_request(f"{where}.metadata must be an object.", param=f"{where}.metadata")
        if text.strip():
            passages.append(Passage(text=text, source=source or where, metadata=dict(metadata or {})))
    if not passages:
        raise bad_request("Every document is empty: send some text, or leave documents out.", param="documents")
    return passages


def parse_overrides(value: Any) -> dict[str, Any]:
    """The ``ctxopt`` object: ``method``, ``budget``, ``options`` and ``k`` for this request only. The budget's
    range is checked by the gateway, which knows the model."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request("ctxopt must be an object with method, budget, options or k.", param="ctxopt")
    unknown = sorted(set(value) - set(OVERRIDE_KEYS))
    if unknown:
        raise bad_request(f"ctxopt has unknown fields {unknown}; it takes {', '.join(OVERRIDE_KEYS)} "
                          "(method options go in ctxopt.options).", param="ctxopt")
    overrides = {key: item for key, item in value.items() if item is not None}
    if "method" in overrides and (not isinstance(overrides["method"], str) or not overrides["method"].strip()):
        raise bad_request(f"ctxopt.method must be a method name; got {overrides['method']!r}.", param="ctxopt.method")
    if "options" in overrides and not isinstance(overrides["options"], dict):
        raise bad_request("ctxopt.options must be an object of method options.", param="ctxopt.options")
    if "k" in overrides:
        overrides["k"] = _int(overrides, "k", 1, MAX_K)
    return overrides


def parse_chat_request(body: Any) -> ChatRequest:
    """Check an OpenAI chat-completions body (already JSON-decoded); raise ApiError(400) naming the bad field."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object (an OpenAI chat-completions request).")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string.", param="model")
    for name, off in UNSUPPORTED_AT.items():
        value = body.get(name)
        if value is not None and value != off:
            raise bad_request(f"{name} is not supported by the ctxopt gateway; leave it out.", param=name)
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise bad_request("n must be 1: the gateway answers with one choice.", param="n")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise bad_request("response_format other than {\"type\": \"text\"} is not supported.", param="response_format")

    question, message_context, system = split_messages(body.get("messages"))
    if body.get("documents") is not None:
        context, context_from = parse_documents(body["documents"]), "documents"
    elif message_context:
        context, context_from = message_context, "messages"
    else:
        context, context_from = None, "none"

    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object.", param="stream_options")
    include_usage = bool((options or {}).get("include_usage"))

    generation: dict[str, Any] = {}
    max_tokens = _int(body, "max_completion_tokens", 1)
    max_tokens = _int(body, "max_tokens", 1) if max_tokens is None else max_tokens
    if max_tokens is not None:
        generation["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        generation["temperature"] = temperature
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if top_p is not None:
        generation["top_p"] = top_p
    seed = _int(body, "seed")
    if seed is not None:
        generation["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings.", param="stop")
        generation["stop_strings"] = tuple(s for s in stops if s)
    return ChatRequest(
        question=question, context=context, context_from=context_from, system=system, model=model, stream=stream,
        include_usage=include_usage, generation=generation, overrides=parse_overrides(body.get("ctxopt")),
    )


def decode_json(raw: bytes) -> Any:
    """The body as JSON, or ApiError(400) saying where it stops being JSON."""
    if not raw.strip():
        raise bad_request("The request body is empty; send an OpenAI chat-completions JSON object.")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise bad_request("The request body is not UTF-8 JSON.") from None
    except ValueError as error:
        raise bad_request(f"The request body is not valid JSON: {error}.") from None


# -- responses ---------------------------------------------------------------------------------------------
FINISH_REASONS = {"max_new_tokens": "length"}


def finish_reason(stopped_by: str | None) -> str:
    """OpenAI's finish reason for a decoder's ``stopped_by`` (eos, stop string, engine stop -> "stop")."""
    return FINISH_REASONS.get(stopped_by or "", "stop")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish: str, use: dict, extra: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": use,
        "ctxopt": extra,
    }


def chunk_body(rid: str, created: int, model: str, delta: dict | None, finish: str | None = None,
               **extra: Any) -> dict:
    """One ``chat.completion.chunk``; ``delta=None`` makes the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **extra}


def sse(data: dict | str) -> bytes:
    """One server-sent event carrying ``data`` (a dict as compact JSON)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def now() -> int:
    return int(time.time())
