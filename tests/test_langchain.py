"""LangChain components on the tiny random model and a tiny FaissStore embedded with the real MiniLM."""
import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_tests.integration_tests import RetrieversIntegrationTests
from pydantic import BaseModel, ValidationError

from ctxopt.compressors.gemfilter import GemFilter
from ctxopt.integrations.langchain import (
    GAP,
    CtxoptChatModel,
    CtxoptCompressionRetriever,
    CtxoptDocumentCompressor,
    CtxoptRetriever,
    context_message,
    split_messages,
)
from ctxopt.pipeline import Pipeline
from ctxopt.prompting import build_prompt
from ctxopt.retrievers import FaissStore, load_embedder
from ctxopt.types import Passage

BOXES = [("red", 3), ("blue", 7), ("green", 11), ("yellow", 2), ("black", 5), ("white", 9)]
QUESTION = "How many marbles are in the blue box?"


@cache
def store() -> FaissStore:
    passages = [
        Passage(f"The {colour} box holds {count} marbles. It sits on shelf {i} of the north room.",
                source=f"boxes/{colour}.txt", metadata={"shelf": i, "colour": colour})
        for i, (colour, count) in enumerate(BOXES)
    ]
    return FaissStore.build(passages, load_embedder(), progress=False)


def documents() -> list[Document]:
    return CtxoptRetriever(store=store(), k=len(BOXES)).invoke(QUESTION)


def context_messages(question: str = QUESTION) -> list:
    return [HumanMessage("\n".join(d.page_content for d in documents())), HumanMessage(question)]


@pytest.mark.asyncio  # for its async test; the sync ones warn about the mark, hence the filter
@pytest.mark.filterwarnings("ignore:.*marked with '@pytest.mark.asyncio' but it is not an async function")
class TestCtxoptRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[CtxoptRetriever]:
        return CtxoptRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"store": store()}

    @property
    def retriever_query_example(self) -> str:
        return QUESTION


def test_retriever_documents_carry_passage_metadata_and_provenance():
    docs = CtxoptRetriever(store=store(), k=2).invoke(QUESTION)
    assert docs[0].page_content.startswith("The blue box")
    meta = docs[0].metadata
    assert (meta["colour"], meta["shelf"], meta["source"]) == ("blue", 1, "boxes/blue.txt")
    assert meta["span"] == [0, len(docs[0].page_content)] and meta["score"] >= docs[1].metadata["score"]
    assert docs[0].id == meta["id"] == store().passages[1].id
    assert asyncio.run(CtxoptRetriever(store=store()).ainvoke(QUESTION, k=2)) == docs


def test_compressor_rejects_methods_that_do_not_act_on_text(tiny_lm):
    with pytest.raises(ValueError, match="do not act on text"):
        CtxoptDocumentCompressor(model=tiny_lm, method="speckv", budget=32)


def test_rag_compressor_inside_compression_retrievers_keeps_metadata(tiny_lm):
    fixed = len(Pipeline(tiny_lm).build_prompt(QUESTION, []))  # the budget counts the prompt around the context
    compressor = CtxoptDocumentCompressor(model=tiny_lm, method="rag", budget=fixed + 40, options={"chunk_tokens": 24})
    base = CtxoptRetriever(store=store(), k=4)
    ours = CtxoptCompressionRetriever(base_retriever=base, compressor=compressor)
    docs = ours.invoke(QUESTION)
    assert 0 < len(docs) < 4
    retrieved = {d.id: d for d in base.invoke(QUESTION)}
    for doc in docs:
        original = retrieved[doc.id]
        assert doc.metadata == {**original.metadata, "ctxopt_method": "rag", "ctxopt_budget": fixed + 40,
                                "ctxopt_tokens_in": doc.metadata["ctxopt_tokens_in"],
                                "ctxopt_tokens_out": doc.metadata["ctxopt_tokens_out"]}
        assert all(piece in original.page_content for piece in doc.page_content.split(GAP))
    assert sum(d.metadata["ctxopt_tokens_out"] for d in docs) <= 40
    assert asyncio.run(ours.ainvoke(QUESTION)) == docs
    assert len(ours.invoke(QUESTION, k=1)) == 1  # invoke keywords reach the base retriever

    classic = pytest.importorskip("langchain_classic.retrievers")
    theirs = classic.ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base)
    assert theirs.invoke(QUESTION) == docs


def test_token_compressor_keeps_what_the_pipeline_keeps(tiny_lm):
    docs = documents()
    compressor = CtxoptDocumentCompressor(model=tiny_lm, method="gemfilter", budget=30)
    out = compressor.compress_documents(docs, QUESTION)
    passages = [Passage(d.page_content, source=d.metadata["source"]) for d in docs]
    prompt = Pipeline(tiny_lm, stages=[GemFilter(30)], max_new_tokens=1).ask(QUESTION, context=passages).prompt
    expected = {docs[i].id: prompt.kept_text(i) for i in prompt.passages_kept()}
    assert {d.id: d.page_content for d in out} == expected
    assert 0 < len(out) < len(docs)  # documents with nothing kept are dropped
    for doc in out:
        index = [d.id for d in docs].index(doc.id)
        assert doc.metadata["ctxopt_tokens_out"] == int((prompt.passage_index == index).sum())
        assert doc.metadata["ctxopt_tokens_out"] < doc.metadata["ctxopt_tokens_in"]
        assert doc.metadata["colour"] == docs[index].metadata["colour"]


def test_full_compressor_returns_documents_unchanged(tiny_lm):
    docs = documents()
    out = CtxoptDocumentCompressor(model=tiny_lm, method="full", budget=None).compress_documents(docs, QUESTION)
    assert [d.page_content for d in out] == [d.page_content for d in docs]
    assert all(d.metadata["ctxopt_tokens_in"] == d.metadata["ctxopt_tokens_out"] for d in out)


def test_split_messages():
    question, passages, system = split_messages([
        SystemMessage("Answer tersely."),
        HumanMessage(content=[{"type": "text", "text": "Doc one."}, {"type": "text", "text": "Doc two."}]),
        AIMessage("ok"),
        SystemMessage("Shelf notes.", additional_kwargs={"ctxopt_context": True}),
        SystemMessage("Use digits."),
        HumanMessage("Which doc?"),
    ])
    assert question == "Which doc?"
    assert system == "Answer tersely.\n\nUse digits."  # system messages are the system prompt, not context
    assert [(p.source, p.text) for p in passages] == [
        ("human[1].block[0]", "Doc one."), ("human[1].block[1]", "Doc two."), ("ai[2]", "ok"),
        ("system[3]", "Shelf notes."),
    ]
    assert split_messages([context_message("Gulls nest on the pier."), HumanMessage("Q?")])[1][0].text.startswith(
        "Gulls")
    assert split_messages([SystemMessage("Be brief."), HumanMessage("Q?")]) == ("Q?", [], "Be brief.")
    with pytest.raises(ValueError, match="must be a human message"):
        split_messages([HumanMessage("Q?"), AIMessage("A")])


def test_chat_model_streams_what_it_answers_and_reports_tokens_saved(tiny_lm):
    chat = CtxoptChatModel(model=tiny_lm, method="gemfilter", budget=48, max_new_tokens=8)
    messages = context_messages()
    reply = chat.invoke(messages)
    chunks = list(chat.stream(messages))
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == reply.content != ""
    original = len(Pipeline(tiny_lm).build_prompt(QUESTION, [Passage(messages[0].content)]))
    meta = reply.response_metadata
    assert reply.usage_metadata == {"input_tokens": 48, "output_tokens": 8, "total_tokens": 56}
    assert meta["prompt_tokens_original"] == original and meta["tokens_saved"] == original - 48 > 0
    assert meta["ctxopt"]["method"] == "gemfilter" and "gemfilter" in meta["ctxopt"]["summary"]
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert streamed.usage_metadata == reply.usage_metadata
    assert streamed.response_metadata["tokens_saved"] == meta["tokens_saved"]


def test_chat_model_stop_strings_and_early_close(tiny_lm):
    chat = CtxoptChatModel(model=tiny_lm, max_new_tokens=8)
    messages = context_messages()
    text = chat.invoke(messages).content
    stop = text.split()[2]
    assert chat.invoke(messages, stop=[stop]).content == text[: text.index(stop)].strip()
    stream = chat.stream(messages)
    next(stream)
    stream.close()  # the worker stops at its next token and releases the model
    assert chat.invoke(messages).content == text


def test_chat_model_async_matches_sync(tiny_lm):
    chat = CtxoptChatModel(model=tiny_lm, method="speckv", budget=64, options={"window": 8}, max_new_tokens=6)
    messages = context_messages()
    expected = chat.invoke(messages)

    ticks = 0

    async def ticker():  # keeps counting only while the event loop is free
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    async def run():
        task = asyncio.create_task(ticker())
        chunks = [c async for c in chat.astream(messages)]
        reply = await chat.ainvoke(messages)
        task.cancel()
        return reply, "".join(c.content for c in chunks)

    reply, streamed = asyncio.run(run())
    assert reply.content == streamed == expected.content
    assert reply.usage_metadata == expected.usage_metadata
    assert ticks > 10


def test_chat_model_threads_give_sequential_results(tiny_lm):
    chat = CtxoptChatModel(model=tiny_lm, method="gemfilter", budget=40, max_new_tokens=6)
    questions = [f"How many marbles are in the {colour} box?" for colour, _ in BOXES[:4]]
    sequential = [chat.invoke(context_messages(q)).content for q in questions]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda q: chat.invoke(context_messages(q)).content, questions * 2))
    assert threaded == sequential * 2


def test_chat_model_concurrent_calls_share_decode_steps(tiny_lm):
    """Calls from several threads (SnapKV-pruned caches of different lengths, and a plain chat with no context
    through the chat model's other pipeline) decode in one batch of the model: every step feeds all their rows, so
    the batch runs as many forwards as the longest answer, not as all answers together; each call's answer is the
    one it gets alone."""
    import threading
    import time

    from ctxopt.generators.local import shared_decoder

    chat = CtxoptChatModel(model=tiny_lm, method="snapkv", budget=48, options={"window": 8}, max_new_tokens=8)
    chats = [context_messages(f"How many marbles are in the {colour} box?") for colour, _ in BOXES[:3]]
    chats.append([HumanMessage("Name a colour.")])
    alone = [chat.invoke(messages) for messages in chats]
    shared = shared_decoder(chat._pipe.lm)
    forwards = shared.forwards
    replies: list = [None] * len(chats)

    def call(i):
        replies[i] = chat.invoke(chats[i])

    with shared._step_lock:  # every call prefills and queues its request before the first step: all join it
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(chats))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(shared._queued) < len(chats):
            assert time.monotonic() < deadline, "not every call reached the decode batch: one holds a lock there"
            threading.Event().wait(0.001)
    for thread in threads:
        thread.join()
    assert [r.content for r in replies] == [a.content for a in alone]
    assert [r.usage_metadata for r in replies] == [a.usage_metadata for a in alone]
    decodes = [next(s for s in r.response_metadata["ctxopt"]["stats"]["stages"] if s["stage"] == "decode")
               for r in replies]
    assert [d["extra"]["batch_size"] for d in decodes] == [len(chats)] * len(chats)
    passes = [d["extra"]["forward_passes"] for d in decodes]
    assert shared.forwards - forwards == max(passes) < sum(passes)


def test_chat_model_retriever_and_lcel_chain(tiny_lm):
    retriever = CtxoptRetriever(store=store(), k=2)
    chat = CtxoptChatModel(model=tiny_lm, method="rapid", retriever=retriever, max_new_tokens=6)
    reply = chat.invoke(QUESTION)
    sources = [s["source"] for s in reply.response_metadata["ctxopt"]["sources"]]
    assert sources == [d.metadata["source"] for d in retriever.invoke(QUESTION)]
    assert reply.response_metadata["ctxopt"]["stats"]["stages"][-1]["stage"] == "decode:rapid"
    assert reply.response_metadata["ctxopt"]["context_from"] == "retriever"

    model = CtxoptChatModel(model=tiny_lm, max_new_tokens=6)
    prompt = ChatPromptTemplate.from_messages([("human", "{context}"), ("human", "{question}")])
    chain = prompt | model | StrOutputParser()
    answer = chain.invoke({"context": "The blue box holds 7 marbles.", "question": QUESTION})
    assert answer == model.invoke([HumanMessage("The blue box holds 7 marbles."), HumanMessage(QUESTION)]).content


def test_chat_model_without_context_is_a_plain_chat_model(tiny_lm):
    chat = CtxoptChatModel(model=tiny_lm, method="gemfilter", budget=48, max_new_tokens=6)
    reply = chat.invoke(QUESTION)  # no context, no retriever: answered, not an error
    plain = Pipeline(tiny_lm, instruction="", max_new_tokens=6)
    expected = plain.generate(plain.build_prompt(QUESTION, []))
    assert reply.content == expected.text != ""
    meta = reply.response_metadata
    assert meta["ctxopt"]["context_from"] == "none" and meta["ctxopt"]["sources"] == []
    assert reply.usage_metadata["input_tokens"] == len(expected.prompt) == meta["prompt_tokens_original"]
    assert meta["tokens_saved"] == 0
    assert [s["stage"] for s in meta["ctxopt"]["stats"]["stages"]] == ["prompt", "prefill", "decode"]

    system = "You are a terse assistant who answers in digits."
    with_system = chat.invoke([SystemMessage(system), HumanMessage(QUESTION)])
    framed = build_prompt(tiny_lm.tokenizer, QUESTION, [], instruction="", system=system)
    assert with_system.usage_metadata["input_tokens"] == len(framed) > len(expected.prompt)
    assert with_system.content == Pipeline(tiny_lm, instruction="", max_new_tokens=6).generate(framed).text
    assert "".join(c.content for c in chat.stream(QUESTION)) == reply.content


def test_chat_model_system_message_is_the_system_prompt_not_context(tiny_lm):
    system, context = "You are a terse assistant.", "The blue box holds 7 marbles."
    chat = CtxoptChatModel(model=tiny_lm, max_new_tokens=6)
    reply = chat.invoke([SystemMessage(system), HumanMessage(context), HumanMessage(QUESTION)])
    meta = reply.response_metadata
    assert [s["source"] for s in meta["ctxopt"]["sources"]] == ["human[1]"]
    expected = Pipeline(tiny_lm, system=system, max_new_tokens=6).ask(QUESTION, context=[Passage(context)])
    assert meta["prompt_tokens_original"] == len(expected.prompt) and reply.content == expected.text
    # the system prompt lasts one call: the next call without one reads the prompt without it
    bare = chat.invoke([HumanMessage(context), HumanMessage(QUESTION)]).response_metadata
    assert bare["prompt_tokens_original"] == len(Pipeline(tiny_lm).build_prompt(QUESTION, [Passage(context)]))
    marked = chat.invoke([SystemMessage(context, additional_kwargs={"ctxopt_context": True}), HumanMessage(QUESTION)])
    assert marked.response_metadata["ctxopt"]["sources"][0]["source"] == "system[0]"


def test_chat_model_documents_keyword_is_context(tiny_lm):
    docs = documents()[:2]
    chat = CtxoptChatModel(model=tiny_lm, method="gemfilter", budget=40, max_new_tokens=4,
                           retriever=CtxoptRetriever(store=store(), k=4))
    reply = chat.invoke(QUESTION, documents=docs)  # the keyword wins over the retriever
    meta = reply.response_metadata["ctxopt"]
    assert meta["context_from"] == "documents"
    assert {s["source"] for s in meta["sources"]} <= {d.metadata["source"] for d in docs}
    assert reply.response_metadata["prompt_tokens_original"] == len(
        Pipeline(tiny_lm).build_prompt(QUESTION, [Passage(d.page_content) for d in docs]))


def test_unknown_arguments_and_unsupported_features_are_errors(tiny_lm):
    with pytest.raises(ValidationError, match="budjet"):
        CtxoptChatModel(model=tiny_lm, method="truncate", budjet=64)
    with pytest.raises(ValidationError, match="methd"):
        CtxoptDocumentCompressor(model=tiny_lm, methd="rag")
    with pytest.raises(ValidationError, match="top_k"):
        CtxoptRetriever(store=store(), top_k=2)
    compressor = CtxoptDocumentCompressor(model=tiny_lm, method="rag", budget=40)
    with pytest.raises(ValidationError, match="compresor"):
        CtxoptCompressionRetriever(base_retriever=CtxoptRetriever(store=store()), compresor=compressor)

    class Count(BaseModel):
        marbles: int

    chat = CtxoptChatModel(model=tiny_lm)
    with pytest.raises(NotImplementedError, match="does not support structured output"):
        chat.with_structured_output(Count)
    with pytest.raises(NotImplementedError, match="does not support tool calling"):
        chat.bind_tools([Count])


def test_compression_retriever_wraps_any_langchain_retriever(tiny_lm):
    class Fixed(BaseRetriever):
        docs: list[Document]

        def _get_relevant_documents(self, query, *, run_manager):
            return self.docs

    docs = [Document("The vault code is 4817. " * 4, metadata={"page": 3}), Document("Gulls nest on the pier.")]
    compressor = CtxoptDocumentCompressor(model=tiny_lm, method="truncate", budget=60)
    retriever = CtxoptCompressionRetriever(base_retriever=Fixed(docs=docs), compressor=compressor)
    out = retriever.invoke("What is the vault code?")
    assert out[0].metadata["page"] == 3 and out[0].page_content.startswith("The vault code is 4817.")
