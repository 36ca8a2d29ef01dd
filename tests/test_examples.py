"""Each example runs end to end on the tiny random model (its main takes the model as ``lm``) and prints what
it saved; one runs on the real SmolLM2 and must answer the demo questions."""
import importlib.util
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rag_over_folder(tiny_lm, capsys):
    argv = ["-q", "What is the vault code of the Harbour Museum?", "--max-new-tokens", "4"]
    assert example("rag_over_folder").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    assert "source: harbour_museum.md" in out and "saved " in out and "with the whole folder" in out


def test_rag_over_folder_own_folder(tiny_lm, tmp_path, capsys):
    (tmp_path / "notes.md").write_text("The ferry leaves at nine.\n\nThe bakery opens at six.")
    argv = [str(tmp_path), "-q", "When does the ferry leave?", "-k", "1", "--method", "truncate", "--budget", "60",
            "--no-full", "--max-new-tokens", "3"]
    assert example("rag_over_folder").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    assert "source: notes.md" in out and "saved " in out and "correct" not in out


@pytest.mark.real_model
def test_rag_over_folder_answers_the_demo_questions(smollm, capsys):
    assert example("rag_over_folder").main(["--no-full"], lm=smollm) == 0
    assert "correct: 3/3 with retrieval" in capsys.readouterr().out


def test_langchain_rag(tiny_lm, capsys):
    argv = ["-q", "What is the vault code of the Harbour Museum?", "--budget", "40", "--max-new-tokens", "4"]
    assert example("langchain_rag").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "ctxopt" in out and "saved " in out and "with rag (budget 40)" in out
    saved = int(re.search(r"saved (\d+) of", out).group(1))
    assert saved > 0  # the context reaches the compressor (a system message would be the system prompt)


def test_long_document_qa(tiny_lm, capsys):
    argv = ["--length", "400", "--budget", "128", "--methods", "full,gemfilter,speckv", "--max-new-tokens", "4"]
    assert example("long_document_qa").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    assert "gemfilter saved" in out and "speckv saved" in out and "KV cache 128 positions" in out


def test_compare_methods(tiny_lm, tmp_path, capsys):
    plot, questions = tmp_path / "methods.png", tmp_path / "questions.json"
    questions.write_text(json.dumps([{"question": "Who founded the town of Eldermoor?", "answers": ["Mara Quill"]}]))
    argv = ["--questions", str(questions), "--methods", "full,rag,gemfilter,snapkv", "--budget", "200",
            "--max-new-tokens", "3", "--plot", str(plot)]
    assert example("compare_methods").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    assert "gemfilter saved" in out and "snapkv saved 0 prompt tokens and" in out and plot.stat().st_size > 0


def test_compressed_prompt_for_any_engine(tiny_lm, capsys):
    received = []

    class Engine(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.path, self.headers.get("Authorization"), body))
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "4817"}}],
                                "usage": {"prompt_tokens": 99, "completion_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
        argv = ["--endpoint", endpoint, "--api-key", "sk-test", "--remote-model", "stand-in", "--budget", "0.5"]
        assert example("compressed_prompt_for_any_engine").main(argv, lm=tiny_lm) == 0
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    [(path, auth, body)] = received
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "stand-in"
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][1]["content"].endswith("Question: What is the vault code of the Harbour Museum?")
    assert "answer: 4817" in out and "saved " in out and '"role": "user"' in out


def test_compressed_prompt_dry_run_and_unreachable_endpoint(tiny_lm, capsys):
    module = example("compressed_prompt_for_any_engine")
    assert module.main(["--dry-run", "--method", "rag", "--budget", "120"], lm=tiny_lm) == 0
    assert "saved " in capsys.readouterr().out
    assert module.main(["--endpoint", "http://127.0.0.1:9/v1/chat/completions", "--budget", "0.5"], lm=tiny_lm) == 1
    assert "could not reach" in capsys.readouterr().err


def test_long_document_qa_on_a_file(tiny_lm, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("The lighthouse keeper was called Ansel. " * 30 + "The boat was painted red. " * 30)
    argv = ["--file", str(book), "-q", "Who kept the lighthouse?", "--answer", "Ansel", "--methods", "full,gemfilter",
            "--budget", "0.5", "--max-new-tokens", "3"]
    assert example("long_document_qa").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    assert "expected: Ansel" in out and "gemfilter saved" in out
