"""LangChain components over ctxopt (langchain-core only).

- ``CtxoptRetriever``: top-k passages of a ctxopt ``FaissStore`` as Documents.
- ``CtxoptDocumentCompressor``: ctxopt's text-level stages (passage stages such as ``rag``, token stages
  such as ``gemfilter`` and ``specpc``) applied to Documents; metadata kept, plus what compression did.
- ``CtxoptCompressionRetriever``: any LangChain retriever followed by a ``CtxoptDocumentCompressor``.
- ``CtxoptChatModel``: the whole ctxopt pipeline (any method, including ``speckv`` and ``rapid``) as a chat
  model: the last human message is the question, system messages are the system prompt, and the context comes
  from the other earlier messages, the ``documents=`` keyword or the chat model's retriever; with none it
  answers as a plain chat model.

Every component refuses a constructor argument it does not know (a misspelt ``budjet=`` is an error, not a
default silently kept).

Every model forward made through these components runs under one process-wide lock (``MODEL_LOCK``), except
the chat model's decode steps: the stages are not safe for concurrent forwards (they cache drafts and adapters),
so compression, prefill and cache stages run one call at a time. The decode steps of concurrent chat-model calls
are shared instead: each call's prefilled cache joins the model's one decode batch
(``ctxopt.decoding.SharedDecoder``) and every step advances all of them, so concurrent calls decode together,
each answer the one it gets alone (a RAPID decoder, with drafts of its own, still runs under the lock). With
``engine=`` only ctxopt's own passes (the compression) take the lock: generation goes to the serving engine,
which answers concurrent calls concurrently.
"""
from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from .. import __version__
from ..chat import ChatTurn, plain_prompt, split_chat
from ..compress import GAP as GAP  # re-exported: the marker between the kept pieces of one document
from ..compress import INPUT_KEY, MODEL_LOCK, compress_texts, text_stages
from ..errors import InputError
from ..generators.local import LocalGenerator
from ..methods import build_stages
from ..models import DEFAULT_GENERATOR, LoadedModel
from ..pipeline import Pipeline
from ..prompting import validate_question
from ..retrievers import FaissStore
from ..text import StreamTrimmer
from ..types import Answer, Passage

CONTEXT_MARK = "ctxopt_context"  # additional_kwargs key: this message (a system message too) is context
STRICT = ConfigDict(arbitrary_types_allowed=True, extra="forbid")  # an unknown constructor argument is an error


def passage_to_document(passage: Passage) -> Document:
    """A Document holding the passage text; metadata = the passage's, plus its source, span, score and id."""
    metadata = {
        "source": passage.source,
        **passage.metadata,
        "span": list(passage.span),
        "score": passage.score,
        "id": passage.id,
    }
    return Document(page_content=passage.text, metadata=metadata, id=passage.id)


def document_to_passage(document: Document, index: int) -> Passage:
    """A Passage holding the document text and a copy of its metadata; source from metadata, id or position."""
    source = document.metadata.get("source") or document.id or f"document[{index}]"
    return Passage(text=document.page_content, source=str(source), metadata=dict(document.metadata), id=document.id)


class CtxoptRetriever(BaseRetriever):
    """The ``k`` passages of a ctxopt ``FaissStore`` most similar to the query, best first.

    ``k`` is a field and an ``invoke`` keyword (``retriever.invoke(query, k=2)``).
    """

    model_config = STRICT

    store: FaissStore
    k: int = Field(default=4, ge=1)

    @classmethod
    def from_index(cls, folder: str, k: int = 4) -> "CtxoptRetriever":
        """A retriever over an index folder written by ``build_index`` / ``ctxopt index``."""
        return cls(store=FaissStore.load(folder), k=k)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        return [passage_to_document(p) for p in self.store.retrieve(query, self.k if k is None else k)]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        return await asyncio.to_thread(self._get_relevant_documents, query, run_manager=run_manager.get_sync(), k=k)


class CtxoptDocumentCompressor(BaseDocumentCompressor):
    """Compress Documents with a ctxopt method's text-level stages, given the query.

    ``method`` is any registered method whose stages are passage stages (``rag``: the best chunks by embedder
    similarity; ``color``: each document rewritten by the CoLoR compressor; ``extractive``: the documents'
    sentences most similar to the query, ranked together) or token stages (``truncate``, ``gemfilter``,
    ``specpc``); ``budget`` (tokens of ``model``, or a ratio) means what it means in a Pipeline, for every
    method: the tokens of the whole prompt built from the query and the kept text (instruction and query
    included), or a ratio of the uncompressed prompt's; ``options`` go to the method (``layer=``, ``draft=``).
    Token stages score the ctxopt prompt built from the query and all documents, and each document keeps the
    text of its kept tokens (gaps marked " … "); a document with nothing kept is dropped. Returned Documents
    keep their metadata and id, and add ``ctxopt_method``, ``ctxopt_budget``, ``ctxopt_tokens_in`` and
    ``ctxopt_tokens_out`` (tokens of ``model``'s tokenizer).
    """

    model_config = STRICT

    model: Any = DEFAULT_GENERATOR
    method: str = "rag"
    budget: int | float | None = 512
    options: dict[str, Any] = Field(default_factory=dict)
    embedder: Any = None
    _pipe: Pipeline = PrivateAttr()

    @model_validator(mode="after")
    def _build_ctxopt_compressor(self) -> "CtxoptDocumentCompressor":
        stages = text_stages(self.method, self.budget, self.options, "A document compressor")
        self._pipe = Pipeline(self.model, stages=stages, embedder=self.embedder)
        return self

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> list[Document]:
        if not documents:
            return []
        passages = [
            document_to_passage(d, i).replace(metadata={**d.metadata, INPUT_KEY: i}) for i, d in enumerate(documents)
        ]
        _, kept = compress_texts(self._pipe, query, passages)
        return [
            Document(
                page_content=kept[i].text,
                metadata={
                    **document.metadata,
                    "ctxopt_method": self.method,
                    "ctxopt_budget": self.budget,
                    "ctxopt_tokens_in": kept[i].tokens_in,
                    "ctxopt_tokens_out": kept[i].tokens_out,
                },
                id=document.id,
            )
            for i, document in enumerate(documents)
            if i in kept
        ]


class CtxoptCompressionRetriever(BaseRetriever):
    """Documents from ``base_retriever`` (any LangChain retriever), compressed by ``compressor`` for the query.

    Keyword arguments of ``invoke`` (``k=...``) go to the base retriever.
    """

    model_config = STRICT

    base_retriever: BaseRetriever
    compressor: CtxoptDocumentCompressor

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        documents = self.base_retriever.invoke(query, {"callbacks": run_manager.get_child()}, **kwargs)
        return self.compressor.compress_documents(documents, query)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        documents = await self.base_retriever.ainvoke(query, {"callbacks": run_manager.get_child()}, **kwargs)
        return list(await self.compressor.acompress_documents(documents, query))


def message_texts(message: BaseMessage) -> list[str]:
    """The text of a message: its string content, or each text block of a list content."""
    if isinstance(message.content, str):
        return [message.content]
    texts = []
    for block in message.content:
        if isinstance(block, str):
            texts.append(block)
        elif block.get("type") == "text":
            texts.append(block["text"])
        else:
            raise InputError(
                f"CtxoptChatModel reads text only; a {message.type} message holds a {block.get('type')!r} block."
            )
    return texts


def context_message(text: str) -> HumanMessage:
    """A message that ``CtxoptChatModel`` reads as context (marked with ``additional_kwargs``), whatever its
    place among the earlier messages."""
    return HumanMessage(text, additional_kwargs={CONTEXT_MARK: True})


def split_messages(messages: Sequence[BaseMessage]) -> tuple[str, list[Passage], str | None]:
    """The question, the context and the system prompt of a chat.

    The last message, a human one, is the question. Of the earlier messages, a system message is the system
    prompt (several are joined by blank lines) unless it is marked as context
    (``additional_kwargs={"ctxopt_context": True}``, see ``context_message``); every other message (human, AI,
    tool, and marked system messages) is context, one passage per text block.
    """
    if not messages or not isinstance(messages[-1], HumanMessage):
        last = messages[-1].type if messages else "nothing"
        raise InputError(
            f"CtxoptChatModel answers the last message, which must be a human message holding the question; got {last}."
        )
    question = validate_question("".join(message_texts(messages[-1])))
    turns = [
        ChatTurn(m.type, message_texts(m), f"{m.type}[{i}]", as_context=bool(m.additional_kwargs.get(CONTEXT_MARK)))
        for i, m in enumerate(messages[:-1])
    ]
    passages, system = split_chat(turns, part="block")
    return question, passages, system


def as_context_passages(documents: Sequence[Document | str]) -> list[Passage]:
    """The ``documents=`` keyword of CtxoptChatModel: Documents (or strings) -> passages."""
    if isinstance(documents, (str, Document)):
        documents = [documents]
    return [
        document_to_passage(d, i) if isinstance(d, Document) else Passage(text=str(d), source=f"documents[{i}]")
        for i, d in enumerate(documents)
    ]


UNSUPPORTED = (
    "CtxoptChatModel does not support {what}: it answers a question over its context in plain text, with the "
    "local model it hosts. Parse the text reply (an output parser), or compress the context with ctxopt "
    "(CtxoptDocumentCompressor, ctxopt.compress_prompt) and hand it to a chat model that supports {what}."
)


def share_decoding(pipe: Pipeline) -> None:
    """Have ``pipe``'s local generator run its prefill and cache stages under ``MODEL_LOCK`` and decode outside it,
    in the model's batch shared by concurrent calls (an engine generator is left as it is)."""
    if isinstance(pipe.generator, LocalGenerator):
        pipe.generator.prepare_lock = MODEL_LOCK


class _StreamClosed(Exception):
    """Raised inside the decode loop once the consumer of a stream has gone away."""


class CtxoptChatModel(BaseChatModel):
    """A chat model that answers through the ctxopt pipeline on the model it hosts.

    The last message must be a human message: the question. System messages are the system prompt. The context
    is, in order: the ``documents`` invoke keyword (Documents or strings, ``llm.invoke(question, documents=docs)``)
    and every other earlier message (human, AI, and system messages marked
    ``additional_kwargs={"ctxopt_context": True}``, see ``context_message``), one passage per text block; with
    none, ``retriever`` (any LangChain retriever) supplies it, one passage per Document. With no context and no
    retriever the model answers as a plain chat model (nothing to compress; ``tokens_saved`` 0).
    ``method``/``budget``/``options`` pick the compression (any
    registered method, see ``ctxopt methods``). ``stop`` and the invoke keywords ``max_new_tokens``,
    ``temperature``, ``top_p`` and ``seed`` reach the decoder. ``engine`` (a base URL such as
    ``http://127.0.0.1:8000/v1``) sends the compressed prompt to an OpenAI-compatible server serving ``model``
    (``engine_model``: its served name, when it serves several). Concurrent calls (threads, ``batch``, async)
    compress and prefill one at a time and decode together, sharing each decode step of the model.

    The reply carries ``usage_metadata`` (input tokens = positions prefilled after compression; a REFRAG chunk
    embedding is one) and
    ``response_metadata``: ``tokens_saved`` (prompt tokens without compression minus tokens prefilled),
    ``prompt_tokens_original``, ``prompt_tokens_prefilled`` and ``ctxopt`` (method, budget, where the context
    came from, per-stage stats, their summary, TTFT and the sources kept).

    Tool calling and structured output (``bind_tools``, ``with_structured_output``) are not supported: they
    raise NotImplementedError saying so.
    """

    model_config = STRICT

    model: Any = DEFAULT_GENERATOR
    method: str = "full"
    budget: int | float | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    retriever: BaseRetriever | None = None
    max_new_tokens: int = Field(default=64, ge=1)
    truncate: bool = False
    embedder: Any = None
    engine: str | None = None
    engine_model: str | None = None
    _pipe: Pipeline = PrivateAttr()
    _plain: Pipeline | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _build_ctxopt_pipeline(self) -> "CtxoptChatModel":
        self._pipe = Pipeline(
            self.model,
            stages=build_stages(self.method, self.budget, **self.options),
            max_new_tokens=self.max_new_tokens,
            truncate=self.truncate,
            embedder=self.embedder,
            engine=self.engine,
            engine_model=self.engine_model,
        )
        share_decoding(self._pipe)
        self._add_version("ctxopt", __version__)
        return self

    @property
    def _llm_type(self) -> str:
        return "ctxopt"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model.name if isinstance(self.model, LoadedModel) else str(self.model),
            "method": self.method,
            "budget": self.budget,
            "options": {k: v.name if isinstance(v, LoadedModel) else v for k, v in self.options.items()},
        }

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any) -> Any:
        raise NotImplementedError(UNSUPPORTED.format(what="tool calling (bind_tools)"))

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError(UNSUPPORTED.format(what="structured output (with_structured_output)"))

    def _context(self, question: str, passages: list[Passage]) -> tuple[list[Passage], str]:
        """The passages to answer over and where they came from ("messages", "retriever" or "none")."""
        if passages:
            return passages, "messages"
        if self.retriever is None:
            return [], "none"
        documents = self.retriever.invoke(question)
        if not documents:
            raise InputError(f"The retriever returned no documents for {question!r}.")
        return [document_to_passage(d, i) for i, d in enumerate(documents)], "retriever"

    def _plain_pipeline(self) -> Pipeline:
        """The pipeline of a chat with no context: the same model and generator, no stages, no RAG instruction."""
        if self._plain is None:
            self._plain = Pipeline(
                self._pipe.lm, instruction="", max_new_tokens=self.max_new_tokens, embedder=self.embedder,
                engine=self.engine, engine_model=self.engine_model,
            )
            share_decoding(self._plain)
        return self._plain

    def _answer(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        generation: dict[str, Any],
        on_text: Callable[[str], None] | None = None,
    ) -> AIMessage:
        """Run the pipeline for the messages; the reply with usage and ctxopt metadata."""
        generation = dict(generation)
        documents = generation.pop("documents", None)
        question, passages, system = split_messages(messages)
        if documents:
            passages, source = as_context_passages(documents) + passages, "documents"
        else:
            passages, source = self._context(question, passages)
        generation["stop_strings"] = tuple(stop or ())
        with MODEL_LOCK:
            pipe = self._pipe if passages else self._plain_pipeline()
            pipe.system = system  # this call's system prompt: every prompt of this pipeline is built under the lock
            try:
                if passages:
                    prompt = pipe.compress(question, passages, **generation)
                    original = prompt.prompt_tokens  # the uncompressed prompt's length, measured by compress()
                else:
                    prompt = plain_prompt(pipe, question)
                    original = len(prompt)
            finally:
                pipe.system = None
        # Not under the lock: the local generator takes it for its prefill and cache stages (share_decoding) and
        # decodes in the model's shared batch; an engine batches concurrent calls itself.
        answer = pipe.generate(prompt, on_text, **generation)
        return AIMessage(
            content=answer.text,
            usage_metadata=self._usage(pipe, answer),
            response_metadata=self._metadata(pipe, answer, original, source),
        )

    @staticmethod
    def _prefilled(pipe: Pipeline, answer: Answer) -> int:
        """Positions the model prefilled: the prompt's tokens, or fewer where an input stage (REFRAG) reads one
        embedding per chunk."""
        stage = pipe.generator.input_stage
        record = answer.stats.get(stage.name) if stage is not None else None
        return record.tokens_out if record is not None and record.tokens_out is not None else len(answer.prompt)

    def _usage(self, pipe: Pipeline, answer: Answer) -> UsageMetadata:
        prefilled, generated = self._prefilled(pipe, answer), len(answer.token_ids)
        return UsageMetadata(input_tokens=prefilled, output_tokens=generated, total_tokens=prefilled + generated)

    def _metadata(self, pipe: Pipeline, answer: Answer, original: int, source: str) -> dict[str, Any]:
        prefilled = self._prefilled(pipe, answer)
        return {
            "model_name": self._pipe.lm.name,
            "tokens_saved": original - prefilled,
            "prompt_tokens_original": original,
            "prompt_tokens_prefilled": prefilled,
            "ctxopt": {
                "method": self.method,
                "budget": self.budget,
                "context_from": source,
                "summary": answer.stats.summary(),
                "ttft_seconds": answer.stats.ttft_seconds,
                "stats": answer.stats.to_dict(),
                "sources": [{"source": p.source, "span": list(p.span), "id": p.id} for p in answer.sources],
            },
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._answer(messages, stop, kwargs))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _produce(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        generation: dict[str, Any],
        emit: Callable[[tuple[str, Any]], None],
        closed: threading.Event,
    ) -> None:
        """Worker thread of a stream: emit ("text", piece)... then ("done", AIMessage) or ("error", exception)."""

        def on_text(piece: str) -> None:
            if closed.is_set():
                raise _StreamClosed
            emit(("text", piece))

        try:
            message = self._answer(messages, stop, generation, on_text)
        except _StreamClosed:
            return
        except Exception as error:  # re-raised in the consumer's thread
            item: tuple[str, Any] = ("error", error)
        else:
            item = ("done", message)
        if not closed.is_set():
            emit(item)

    @staticmethod
    def _chunk(kind: str, value: Any, trimmer: StreamTrimmer) -> ChatGenerationChunk | None:
        """The chunk to yield for one item from the worker (None for whitespace held back)."""
        if kind == "error":
            raise value
        if kind == "done":
            message = AIMessageChunk(
                content="", usage_metadata=value.usage_metadata, response_metadata=value.response_metadata,
                chunk_position="last",
            )
            return ChatGenerationChunk(message=message)
        text = trimmer.feed(value)
        return ChatGenerationChunk(message=AIMessageChunk(content=text)) if text else None

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        closed = threading.Event()
        args = (self._produce, messages, stop, kwargs, items.put, closed)
        threading.Thread(target=contextvars.copy_context().run, args=args, daemon=True).start()
        trimmer = StreamTrimmer()
        try:
            while True:
                kind, value = items.get()
                chunk = self._chunk(kind, value, trimmer)
                if chunk is not None:
                    if run_manager and kind == "text":
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
                if kind == "done":
                    return
        finally:
            closed.set()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        closed = threading.Event()

        def emit(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        args = (self._produce, messages, stop, kwargs, emit, closed)
        threading.Thread(target=contextvars.copy_context().run, args=args, daemon=True).start()
        trimmer = StreamTrimmer()
        try:
            while True:
                kind, value = await items.get()
                chunk = self._chunk(kind, value, trimmer)
                if chunk is not None:
                    if run_manager and kind == "text":
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
                if kind == "done":
                    return
        finally:
            closed.set()
