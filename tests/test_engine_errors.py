"""The engine generator's failure paths that a healthy vLLM server cannot be made to show on demand: nothing
listening at the URL, a server that stalls, and an error event in the middle of a stream. They run against real
HTTP servers on localhost (a stub that speaks just enough of the OpenAI API to fail the way a broken engine
does); the paths a real engine can show are tested against vLLM in test_engine.py."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ctxopt.errors import ContextTooLongError, EngineError, InputError
from ctxopt.generators.engine import EngineGenerator
from ctxopt.methods import build_stages
from ctxopt.pipeline import Pipeline

DOC = " ".join(f"Box {i} is blue." for i in range(40))


class Broken(BaseHTTPRequestHandler):
    """/v1/models lists "tiny"; /v1/completions does what the server's ``mode`` says."""

    def log_message(self, *args):  # keep the test output clean
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
        try:
            self._answer()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first (the timeout test)
            pass

    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self.path.endswith("/completions"):  # no /tokenize: the check falls back to the model list
            self._json(404, {"detail": "Not Found"})
            return
        mode = self.server.mode
        if mode == "too-long":
            self._json(400, {"error": {"message": "This model's maximum context length is 8 tokens.",
                                       "type": "BadRequestError", "code": 400}})
            return
        if mode == "stall":
            time.sleep(3)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        first = {"choices": [{"index": 0, "text": " Box", "finish_reason": None}]}
        self.wfile.write(f"data: {json.dumps(first)}\n\n".encode())
        self.wfile.flush()
        if mode == "mid-stream-error":
            error = {"error": {"message": "engine core died", "type": "InternalServerError", "code": 500}}
            self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def broken_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    server.mode = "ok"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def test_nothing_listening_names_the_url_and_does_not_hang(tiny_lm, broken_server):
    dead = url(broken_server)
    broken_server.shutdown()
    broken_server.server_close()
    began = time.perf_counter()
    with pytest.raises(EngineError, match=f"engine at {dead} is not reachable"):
        Pipeline(tiny_lm, engine=dead).ask("Which box?", context=DOC)
    assert time.perf_counter() - began < 10


def test_an_error_event_mid_stream_is_raised_with_its_message(tiny_lm, broken_server):
    broken_server.mode = "mid-stream-error"
    pieces = []
    with pytest.raises(EngineError, match="failed mid-answer: engine core died"):
        Pipeline(tiny_lm, engine=url(broken_server)).ask("Which box?", context=DOC, on_text=pieces.append)
    assert pieces == [" Box"]  # what arrived before the error was streamed


def test_a_stalled_engine_times_out(tiny_lm, broken_server):
    broken_server.mode = "stall"
    pipe = Pipeline(tiny_lm, engine=url(broken_server))
    pipe.generator = EngineGenerator(url(broken_server), timeout=0.5)
    with pytest.raises(EngineError, match="timed out"):
        pipe.ask("Which box?", context=DOC)


def test_a_too_long_refusal_is_a_context_error(tiny_lm, broken_server):
    broken_server.mode = "too-long"
    with pytest.raises(ContextTooLongError, match="refused the prompt as too long: .*maximum context length"):
        Pipeline(tiny_lm, engine=url(broken_server)).ask("Which box?", context=DOC)


def test_methods_that_need_the_kv_cache_are_refused_before_any_request(tiny_lm):
    for method in ("snapkv", "speckv", "rapid"):
        with pytest.raises(InputError, match="cannot run on a serving engine.*these methods do: rag, truncate"):
            Pipeline(tiny_lm, stages=build_stages(method, 64), engine="http://127.0.0.1:9/v1")
    with pytest.raises(InputError, match="http"):
        EngineGenerator("127.0.0.1:8000")
