"""``ctxopt serve`` with ctxopt's own generator, over real HTTP on 127.0.0.1: a uvicorn server per configuration,
the real ``openai`` client and LangChain's ``ChatOpenAI``. The model is the tiny random Llama (its answers are
gibberish, so "correct" means: exactly what ``Pipeline.ask`` answers for the same context and settings).

Every test ends with its server idle (no request still admitted), so no two gateways ever use the shared model
at once. The gateway against a real vLLM engine is tested in test_server_engine.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctxopt.methods import build_stages
from ctxopt.pipeline import Pipeline
from ctxopt.server import BackgroundServer, create_app
from ctxopt.types import Passage

CONTEXT = " ".join(f"Box {i} is blue." for i in range(40))
QUESTION = "What color is box 3?"
LONG = 3000  # answer tokens that take the tiny model several seconds: a request still running when we act
SETTLE_S = 10.0  # the most any test waits for a server to become idle or ready


def chat(context: str = CONTEXT, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": context}, {"role": "user", "content": question}]


def expected(lm, passages: list[Passage], method: str = "full", budget=None, max_new_tokens: int = 8,
             question: str = QUESTION, **options):
    """What the pipeline itself answers: the gateway must give exactly this."""
    pipe = Pipeline(lm, stages=build_stages(method, budget, **options), max_new_tokens=max_new_tokens)
    return pipe.ask(question, context=passages)


def message_passages(context: str = CONTEXT) -> list[Passage]:
    return [Passage(text=context, source="messages[0]")]


@contextmanager
def gateway(**settings):
    settings.setdefault("max_new_tokens", 8)
    with BackgroundServer(create_app(**settings)) as server:
        try:
            yield server
        finally:
            wait_idle(server)


def health(server) -> httpx.Response:
    return httpx.get(f"{server.base_url}/health", timeout=5)


def wait_idle(server, within: float = SETTLE_S) -> float:
    """Seconds until no request is admitted any more (fails past ``within``)."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        if health(server).json()["admitted"] == 0:
            return time.monotonic() - began
        time.sleep(0.02)
    raise AssertionError(f"requests still admitted after {within} s: {health(server).json()}")


def wait_admitted(server, count: int) -> None:
    deadline = time.monotonic() + SETTLE_S
    while health(server).json()["admitted"] != count:
        assert time.monotonic() < deadline, f"never {count} admitted: {health(server).json()}"
        time.sleep(0.01)


def post(server, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.base_url}/v1/chat/completions", content=content, headers=headers,
                      timeout=kwargs.pop("timeout", 60), **kwargs)


def client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60)


def samples(server) -> dict[tuple[str, tuple], float]:
    """The /metrics samples by (name, sorted labels)."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def server(tiny_lm):
    with gateway(model=tiny_lm, max_body_bytes=256 * 1024) as running:
        yield running


# -- answers --------------------------------------------------------------------------------------------------
def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny-llama"]
    assert client(server).models.retrieve("tiny-llama").id == "tiny-llama"
    response = health(server)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_openai_client_gets_the_pipelines_answer(server, tiny_lm):
    want = expected(tiny_lm, message_passages())
    reply = client(server).chat.completions.create(model="tiny-llama", messages=chat(), temperature=0)
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason == "length"  # the random model never stops by itself
    assert reply.usage.prompt_tokens == len(want.prompt)
    assert reply.usage.completion_tokens == len(want.token_ids) == 8
    extra = reply.model_extra["ctxopt"]
    assert extra["method"] == "full" and extra["context"] == "messages"
    assert extra["prompt_tokens_original"] == len(want.prompt) and extra["tokens_saved"] == 0
    assert extra["sources"] == [{"source": "messages[0]", "id": want.sources[0].id, "span": [0, len(CONTEXT)],
                                 "metadata": {"role": "user"}}]
    assert [s["stage"] for s in extra["stages"]] == ["queue", "queue_generate", "prompt", "prefill", "decode"]
    assert all(s["seconds"] >= 0 for s in extra["stages"]) and extra["ttft_seconds"] > 0


def test_streamed_answer_equals_the_whole_one(server, tiny_lm):
    want = expected(tiny_lm, message_passages(), max_new_tokens=12)
    chunks = list(client(server).chat.completions.create(
        model="tiny-llama", messages=chat(), max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["ctxopt"]["prompt_tokens"] == len(want.prompt)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_langchain_chat_openai(server, tiny_lm):
    chat_openai = pytest.importorskip("langchain_openai").ChatOpenAI
    want = expected(tiny_lm, message_passages()).text
    llm = chat_openai(model="tiny-llama", base_url=f"{server.base_url}/v1", api_key="none", max_tokens=8,
                      temperature=0, max_retries=0, timeout=60)
    messages = [("human", CONTEXT), ("human", QUESTION)]
    reply = llm.invoke(messages)
    assert reply.content == want
    assert reply.usage_metadata["output_tokens"] == 8
    assert "".join(chunk.content for chunk in llm.stream(messages)) == want


def test_documents_field_is_the_context_with_its_provenance(server, tiny_lm):
    documents = [{"text": "The vault code is 4817.", "source": "vault.txt", "metadata": {"page": 3}},
                 "Lighthouses guide ships at night."]
    want = expected(tiny_lm, [Passage(text=documents[0]["text"], source="vault.txt"),
                              Passage(text=documents[1], source="documents[1]")], question="What is the code?")
    reply = client(server).chat.completions.create(
        model="tiny-llama", messages=chat("with documents, this message is not context", "What is the code?"),
        extra_body={"documents": documents})
    assert reply.choices[0].message.content == want.text
    extra = reply.model_extra["ctxopt"]
    assert extra["context"] == "documents"
    assert [(s["source"], s.get("metadata")) for s in extra["sources"]] == [("vault.txt", {"page": 3}),
                                                                          ("documents[1]", None)]


@pytest.mark.parametrize("method,budget,options", [
    ("truncate", 64, {}),
    ("snapkv", 48, {"window": 8}),            # a cache stage: only ctxopt's own generator can run it
    ("rapid", None, {"gamma": 3, "threshold": None}),  # a decoder (self-drafting RAPID)
])
def test_per_request_method_budget_and_options(server, tiny_lm, method, budget, options):
    want = expected(tiny_lm, message_passages(), method, budget, **options)
    overrides = {"method": method, "options": options, **({"budget": budget} if budget is not None else {})}
    reply = client(server).chat.completions.create(model="tiny-llama", messages=chat(),
                                                   extra_body={"ctxopt": overrides})
    assert reply.choices[0].message.content == want.text
    extra = reply.model_extra["ctxopt"]
    assert (extra["method"], extra["budget"], extra["options"]) == (method, budget, options)
    assert extra["prompt_tokens_original"] == len(expected(tiny_lm, message_passages()).prompt)
    if method == "truncate":
        assert reply.usage.prompt_tokens == 64
        assert extra["tokens_saved"] == extra["prompt_tokens_original"] - 64 > 0


def test_index_gives_the_context_when_the_request_has_none(tiny_lm, tmp_path):
    from ctxopt.retrievers import build_index

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "vault.txt").write_text("The vault code is 4817. It opens the north door.")
    (corpus / "ships.txt").write_text("Lighthouses guide ships along the rocky coast at night.")
    (corpus / "fruit.txt").write_text("The orchard grows apples, pears and plums every autumn.")
    store = build_index(corpus, tmp_path / "index", progress=False)
    question = "What is the vault code?"
    passages = store.retrieve(question, 1)
    want = expected(tiny_lm, passages, question=question)
    with gateway(model=tiny_lm, index=str(tmp_path / "index"), k=1) as server:
        reply = client(server).chat.completions.create(model="tiny-llama",
                                                       messages=[{"role": "user", "content": question}])
    assert reply.choices[0].message.content == want.text
    extra = reply.model_extra["ctxopt"]
    assert extra["context"] == "index" and [s["source"] for s in extra["sources"]] == ["vault.txt"]
    assert [s["stage"] for s in extra["stages"]][:2] == ["queue", "retrieve"]


def test_system_and_developer_messages_are_the_system_prompt_not_context(server, tiny_lm):
    """CtxoptChatModel's rule: system (and OpenAI developer) messages are the system prompt, every other earlier
    message is context; with no context the model answers as a plain chat model."""
    system = "You are terse.\n\nAnswer in one word."
    pipe = Pipeline(tiny_lm, system=system, max_new_tokens=8)
    want = pipe.ask(QUESTION, context=[Passage(text=CONTEXT, source="messages[2]")])
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "developer", "content": "Answer in one word."},
                {"role": "user", "content": CONTEXT}, {"role": "user", "content": QUESTION}]
    reply = client(server).chat.completions.create(model="tiny-llama", messages=messages)
    assert reply.choices[0].message.content == want.text
    extra = reply.model_extra["ctxopt"]
    assert [s["source"] for s in extra["sources"]] == ["messages[2]"] and extra["context"] == "messages"
    assert reply.usage.prompt_tokens == len(want.prompt)

    plain = Pipeline(tiny_lm, instruction="", system=system, max_new_tokens=8)
    want = plain.generate(plain.build_prompt(QUESTION, []))
    reply = client(server).chat.completions.create(model="tiny-llama", messages=messages[:2] + messages[3:])
    assert reply.choices[0].message.content == want.text
    extra = reply.model_extra["ctxopt"]
    assert (extra["context"], extra["sources"], extra["tokens_saved"]) == ("none", [], 0)
    assert reply.usage.prompt_tokens == len(want.prompt)


def test_gateway_reads_a_chat_as_ctxopt_chat_model_does():
    """The gateway's messages and LangChain's give the same question, context and system prompt."""
    messages_module = pytest.importorskip("langchain_core.messages")
    from ctxopt.integrations.langchain import split_messages as langchain_split
    from ctxopt.server.schema import split_messages

    kinds = {"system": messages_module.SystemMessage, "user": messages_module.HumanMessage,
             "assistant": messages_module.AIMessage}
    chats = [
        [("system", "Be brief."), ("user", "Doc one."), ("assistant", "Noted."), ("system", "Cite."), ("user", "Q?")],
        [("user", [{"type": "text", "text": "Part A."}, {"type": "text", "text": " "}, {"type": "text", "text": "B."}]),
         ("user", "Q?")],
        [("system", "  "), ("user", "Q?")],
    ]
    for chat_ in chats:
        ours = split_messages([{"role": role, "content": content} for role, content in chat_])
        theirs = langchain_split([kinds[role](content) for role, content in chat_])
        assert (ours[0], [p.text for p in ours[1]], ours[2]) == (theirs[0], [p.text for p in theirs[1]], theirs[2])


def test_concurrent_requests_all_answered_each_with_its_own_context(server, tiny_lm):
    contexts = [" ".join(f"Crate {i}-{j} holds {j * i} apples." for j in range(30)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda c: client(server).chat.completions.create(
            model="tiny-llama", messages=chat(c)).choices[0].message.content, contexts))
    assert replies == [expected(tiny_lm, message_passages(c)).text for c in contexts]


def test_a_request_decodes_beside_a_long_running_one_not_after_it(tiny_lm):
    """Without an engine, requests share the model's decode batch: a short request admitted while a long
    answer streams is answered (exactly as alone) while that answer is still running, instead of queueing
    behind its 3,000 tokens."""
    other = " ".join(f"Crate {j} holds {3 * j} apples." for j in range(30))
    alone = expected(tiny_lm, message_passages(other), max_new_tokens=16).text
    with gateway(model=tiny_lm) as server:
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=60,
                          json=good(stream=True, max_tokens=LONG)) as running:
            lines = running.iter_lines()
            next(lines)  # the long answer is decoding now
            short = post(server, good(messages=chat(other), max_tokens=16))
            assert short.status_code == 200 and short.json()["choices"][0]["message"]["content"] == alone
            assert health(server).json()["admitted"] == 1  # the long one is still running
            running.close()
        wait_idle(server)
        assert samples(server)[("ctxopt_requests_total", (("method", "full"), ("status", "499")))] == 1


# -- bad input ------------------------------------------------------------------------------------------------
def good(**changes) -> dict:
    return {"model": "tiny-llama", "messages": chat(), **changes}


BAD_REQUESTS = {
    "not json": (b"{not json", 400, None),
    "empty body": (b"", 400, None),
    "array body": ([], 400, None),
    "no messages": ({"model": "tiny-llama"}, 400, None),
    "last message not the user's": (good(messages=chat() + [{"role": "assistant", "content": "x"}]), 400, None),
    "unknown role": (good(messages=[{"role": "robot", "content": "x"}]), 400, None),
    "empty question": (good(messages=[{"role": "system", "content": CONTEXT}, {"role": "user", "content": " "}]),
                       400, None),
    "image part": (good(messages=[{"role": "system", "content": CONTEXT}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, None),
    "unknown method": (good(ctxopt={"method": "zip"}), 400, "unknown_method"),
    "unknown option": (good(ctxopt={"method": "truncate", "budget": 64, "options": {"windw": 3}}), 400,
                       "unknown_option"),
    "server-only option": (good(ctxopt={"method": "specpc", "budget": 64, "options": {"draft": "gpt2"}}), 400,
                           "option_not_allowed"),
    "method without its budget": (good(ctxopt={"method": "truncate"}), 400, None),
    "budget 0": (good(ctxopt={"method": "truncate", "budget": 0}), 400, "budget_out_of_range"),
    "budget negative": (good(ctxopt={"method": "truncate", "budget": -5}), 400, "budget_out_of_range"),
    "budget ratio over 1": (good(ctxopt={"method": "truncate", "budget": 1.5}), 400, "budget_out_of_range"),
    "budget over the positions": (good(ctxopt={"method": "truncate", "budget": 10**6}), 400, "budget_out_of_range"),
    "budget text": (good(ctxopt={"method": "truncate", "budget": "half"}), 400, "budget_out_of_range"),
    "budget bool": (good(ctxopt={"method": "truncate", "budget": True}), 400, "budget_out_of_range"),
    "unknown ctxopt field": (good(ctxopt={"methd": "full"}), 400, None),
    "bad option value": (good(ctxopt={"method": "snapkv", "budget": 64, "options": {"window": -1}}), 400, None),
    "n 2": (good(n=2), 400, None),
    "tools": (good(tools=[{"type": "function", "function": {"name": "f"}}]), 400, None),
    "max_tokens 0": (good(max_tokens=0), 400, None),
    "temperature -1": (good(temperature=-1), 400, None),
    "top_p 0": (good(top_p=0), 400, None),
    "stop not text": (good(stop=123), 400, None),
    "stream not bool": (good(stream="yes"), 400, None),
    "empty documents": (good(documents=[]), 400, None),
    "document without text": (good(documents=[{"source": "a"}]), 400, None),
    "unknown model": (good(model="gpt-4o"), 404, "model_not_found"),
}


@pytest.mark.parametrize("body,status,code", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_gets_its_status_and_an_openai_error(server, body, status, code):
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if code:
        assert error["code"] == code


def test_bad_input_raises_the_matching_openai_exception(server):
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).chat.completions.create(model="tiny-llama", messages=chat(),
                                               extra_body={"ctxopt": {"method": "zip"}})
    assert "zip" in raised.value.message and raised.value.body["param"] == "ctxopt.method"
    with pytest.raises(openai.BadRequestError):  # streamed: the status still comes before any chunk
        client(server).chat.completions.create(model="tiny-llama", messages=chat(), stream=True,
                                               extra_body={"ctxopt": {"method": "zip"}})
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4o", messages=chat())


def test_context_over_the_models_length(server):
    long = " ".join(f"Box {i} is blue." for i in range(1200))  # ~6000 tokens; the tiny model has 4096 positions
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            client(server).chat.completions.create(model="tiny-llama", messages=chat(long), stream=stream)
        assert raised.value.code == "context_length_exceeded" and "4096" in raised.value.message


def test_body_over_the_limit_is_413(server):
    response = post(server, good(documents=["x" * 300_000]))
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert post(server, good()).status_code == 200  # the server is fine afterwards


def test_unknown_route_is_an_openai_404(server):
    response = httpx.get(f"{server.base_url}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


# -- admission, cancellation, time limits ---------------------------------------------------------------------
def test_full_queue_answers_429_with_retry_after(tiny_lm):
    with gateway(model=tiny_lm, concurrency=1, max_queue=1) as server:  # one running + one waiting
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=60,
                          json=good(stream=True, max_tokens=LONG)) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # (kept: dropping the iterator would close the stream)
            next(lines)  # the first chunk: the request holds the worker now
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(post, server, good(max_tokens=4))
                wait_admitted(server, 2)
                rejected = post(server, good())
                assert rejected.status_code == 429
                assert int(rejected.headers["Retry-After"]) >= 1
                assert rejected.json()["error"]["code"] == "queue_full"
                running.close()  # the client leaves: the running request stops, the waiting one goes
                assert waiting.result(timeout=SETTLE_S).status_code == 200
        counts = samples(server)
        assert counts[("ctxopt_requests_total", (("method", "full"), ("status", "429")))] == 1
        assert counts[("ctxopt_requests_total", (("method", "full"), ("status", "499")))] == 1


def test_client_that_goes_away_cancels_its_generation(tiny_lm):
    with gateway(model=tiny_lm) as server:
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=60,
                          json=good(stream=True, max_tokens=LONG)) as response:
            for line in response.iter_lines():  # up to the first answer text, then away
                if '"content":"' in line and '"content":""' not in line:
                    break
        assert wait_idle(server, within=3.0) < 3.0  # the whole answer would take several more seconds
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
            post(server, good(max_tokens=LONG), timeout=0.5)
        assert wait_idle(server, within=3.0) < 3.0
        assert samples(server)[("ctxopt_requests_total", (("method", "full"), ("status", "499")))] == 2
        assert post(server, good()).status_code == 200


def test_request_timeout(tiny_lm):
    with gateway(model=tiny_lm, request_timeout=0.5) as server:
        began = time.monotonic()
        response = post(server, good(max_tokens=LONG))
        assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - began < 3.0
        wait_idle(server, within=3.0)
        # streamed: the first text came in time, so the stream is under way; it ends with an error event
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=60,
                          json=good(stream=True, max_tokens=LONG)) as streamed:
            events = [line[len("data: "):] for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        with pytest.raises(openai.APIError):
            for _ in client(server).chat.completions.create(model="tiny-llama", messages=chat(), stream=True,
                                                            max_tokens=LONG):
                pass
        wait_idle(server, within=3.0)
        assert post(server, good()).status_code == 200


# -- keys, health, metrics, the engine's faults ---------------------------------------------------------------
def test_api_key(tiny_lm):
    with gateway(model=tiny_lm, api_key="s3cret") as server:
        assert health(server).status_code == 200  # probes need no key
        assert post(server, good()).status_code == 401
        assert post(server, good(), headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").chat.completions.create(model="tiny-llama", messages=chat())
        reply = client(server, "s3cret").chat.completions.create(model="tiny-llama", messages=chat())
        assert reply.choices[0].message.content


def test_health_is_ready_only_once_the_model_is_loaded(tiny_lm):
    loaded = threading.Event()

    def slow_load():
        assert loaded.wait(SETTLE_S)
        return tiny_lm

    with gateway(model=slow_load) as server:
        response = health(server)
        assert response.status_code == 503 and response.json()["status"] == "loading"
        early = post(server, good(model=None))
        assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
        loaded.set()
        deadline = time.monotonic() + SETTLE_S
        while health(server).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert post(server, good()).status_code == 200


def test_metrics_count_requests_tokens_and_latency(tiny_lm):
    with gateway(model=tiny_lm) as server:
        full = client(server).chat.completions.create(model="tiny-llama", messages=chat())
        cut = client(server).chat.completions.create(model="tiny-llama", messages=chat(),
                                                     extra_body={"ctxopt": {"method": "truncate", "budget": 64}})
        post(server, good(ctxopt={"method": "zip"}))
        counts = samples(server)
    full_extra, cut_extra = full.model_extra["ctxopt"], cut.model_extra["ctxopt"]

    def value(name, **labels):
        return counts[(name, tuple(sorted(labels.items())))]

    assert value("ctxopt_requests_total", method="full", status="200") == 1
    assert value("ctxopt_requests_total", method="truncate", status="200") == 1
    assert value("ctxopt_requests_total", method="invalid", status="400") == 1
    assert value("ctxopt_prompt_tokens_original_total", method="full") == full_extra["prompt_tokens_original"]
    assert value("ctxopt_prompt_tokens_total", method="truncate") == 64
    assert value("ctxopt_tokens_saved_total", method="truncate") == cut_extra["tokens_saved"] > 0
    assert value("ctxopt_tokens_saved_total", method="full") == 0
    assert value("ctxopt_completion_tokens_total", method="full") == 8
    for method in ("full", "truncate"):
        assert value("ctxopt_request_seconds_count", method=method) == 1
        assert value("ctxopt_time_to_first_token_seconds_count", method=method) == 1
        assert value("ctxopt_prepare_seconds_count", method=method) == 1
    assert value("ctxopt_requests_admitted") == 0
    assert value("ctxopt_requests_admitted_limit") == 16 + 16  # concurrency + max_queue


class BrokenEngine(BaseHTTPRequestHandler):
    """An OpenAI-compatible engine that lists its model and fails every completion with HTTP 500."""

    def log_message(self, *args):
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.endswith("/completions"):
            self._json(500, {"error": {"message": "engine core died", "type": "InternalServerError"}})
        else:
            self._json(404, {"detail": "Not Found"})


def test_engine_down_is_503_and_failing_is_502_naming_it(tiny_lm):
    broken = ThreadingHTTPServer(("127.0.0.1", 0), BrokenEngine)
    threading.Thread(target=broken.serve_forever, daemon=True).start()
    dead = ThreadingHTTPServer(("127.0.0.1", 0), BrokenEngine)
    dead_url = f"http://127.0.0.1:{dead.server_address[1]}/v1"
    dead.server_close()  # nothing listens there now
    try:
        with gateway(model=tiny_lm, engine=dead_url) as server:
            wait_ready(server, engine_down=True)
            response = health(server)
            assert response.status_code == 503 and response.json()["status"] == "engine_unavailable"
            for stream in (False, True):
                down = post(server, good(stream=stream))
                assert down.status_code == 503 and dead_url in down.json()["error"]["message"]
        broken_url = f"http://127.0.0.1:{broken.server_address[1]}/v1"
        with gateway(model=tiny_lm, engine=broken_url, engine_model="tiny", served_name="tiny") as server:
            wait_ready(server)
            failing = post(server, good(model="tiny"))
            assert failing.status_code == 502
            message = failing.json()["error"]["message"]
            assert broken_url in message and "engine core died" in message
            local_only = post(server, good(model="tiny", ctxopt={"method": "snapkv", "budget": 64}))
            assert local_only.status_code == 400 and "serving engine" in local_only.json()["error"]["message"]
    finally:
        broken.shutdown()
        broken.server_close()


def wait_ready(server, engine_down: bool = False) -> None:
    """Until the model is loaded (with the engine down, /health stays 503 but names the engine)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        response = health(server)
        if response.json()["status"] in (("engine_unavailable",) if engine_down else ("ok",)):
            return
        assert time.monotonic() < deadline, response.text
        time.sleep(0.02)


# -- the command and SIGTERM ------------------------------------------------------------------------------------
def test_sigterm_drains_the_request_in_flight(tiny_lm, tmp_path):
    folder = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(folder)
    tiny_lm.tokenizer.save_pretrained(folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ctxopt.server", "--model", str(folder), "--served-name", "tiny", "--port", str(port),
         "--max-new-tokens", "8", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)
        body = good(model="tiny", stream=True, max_tokens=300, stream_options={"include_usage": True})
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(first[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["usage"]["completion_tokens"] == 300  # answered in full
        assert process.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
