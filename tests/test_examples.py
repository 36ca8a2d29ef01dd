"""Each example runs end to end on the tiny random model (its main takes the model as ``lm``) and prints its
comparison table: per method the answers correct, prompt tokens, KV positions, TTFT and the ratio to full
context's. One runs on the real SmolLM2 and must answer the demo questions."""
import importlib.util
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctxopt.bench.compare import COLUMNS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(out: str) -> dict[str, list[str]]:
    """The printed comparison table: its header has COLUMNS; each row, split on runs of 2+ spaces, by method."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if re.split(r"\s{2,}", line.strip()) == list(COLUMNS))
    rows = {}
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(COLUMNS):
            break
        rows[cells[0]] = cells
    return rows


def ratio(cells: list[str]) -> float:
    return float(cells[5].rstrip("x"))


def test_rag_over_folder(tiny_lm, capsys):
    argv = ["-q", "What is the vault code of the Harbour Museum?", "--max-new-tokens", "4"]
    assert example("rag_over_folder").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert set(rows) == {"rag k=2", "full"} and "source: harbour_museum.md" in out
    assert rows["full"][1] == "-" and ratio(rows["full"]) == 1.0  # no gold answer for a question of one's own
    assert int(rows["rag k=2"][2]) < int(rows["full"][2])  # two passages instead of the whole folder


def test_rag_over_folder_own_folder(tiny_lm, tmp_path, capsys):
    (tmp_path / "notes.md").write_text("The ferry leaves at nine.\n\nThe bakery opens at six.")
    argv = [str(tmp_path), "-q", "When does the ferry leave?", "-k", "1", "--method", "truncate", "--budget", "60",
            "--no-full", "--max-new-tokens", "3"]
    assert example("rag_over_folder").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert list(rows) == ["rag k=1 + truncate 60"] and rows["rag k=1 + truncate 60"][5] == "-"
    assert "source: notes.md" in out and "(not run: --no-full)" in out


@pytest.mark.real_model
def test_rag_over_folder_answers_the_demo_questions(smollm, capsys):
    assert example("rag_over_folder").main(["--no-full"], lm=smollm) == 0
    assert table(capsys.readouterr().out)["rag k=2"][1] == "3/3"


def test_langchain_rag(tiny_lm, capsys):
    argv = ["--budget", "120", "--max-new-tokens", "4"]
    assert example("langchain_rag").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert set(rows) == {"plain", "ctxopt rag 120"}
    assert re.fullmatch(r"\d/3", rows["plain"][1]) and ratio(rows["plain"]) == 1.0
    assert int(rows["ctxopt rag 120"][2]) < int(rows["plain"][2])  # the context reaches the compressor
    saved = int(re.search(r"saved (\d+) of", out).group(1))
    assert saved > 0


def test_long_document_qa(tiny_lm, capsys):
    argv = ["--length", "400", "--budget", "128", "--methods", "full,gemfilter,snapkv", "--max-new-tokens", "4"]
    assert example("long_document_qa").main(argv, lm=tiny_lm) == 0
    rows = table(capsys.readouterr().out)
    assert list(rows) == ["full", "gemfilter", "snapkv"]
    assert rows["full"][2] == rows["full"][3] == rows["snapkv"][2]  # snapkv prefills everything ...
    assert rows["snapkv"][3] == "128" and rows["gemfilter"][2] == rows["gemfilter"][3] == "128"  # ... keeps 128


def test_long_document_qa_drafts_with_the_registry_pairing():
    """Only a model's name matters to the pairing: Qwen 0.5B's SmolLM2 draft has another tokenizer, which SpecPC
    maps by text and RAPID cannot take (nothing passed: the stage warns and drafts with the target); the 1.5B's
    smaller cross-tokenizer draft for SpecPC, its same-tokenizer one for RAPID; --draft wins."""
    draft_options = example("long_document_qa").draft_options
    qwen05, qwen15 = SimpleNamespace(name="qwen2.5-coder-0.5b"), SimpleNamespace(name="qwen2.5-coder-1.5b")
    assert draft_options("specpc", qwen05, None) == {"draft": "smollm2-135m"}
    assert draft_options("rapid", qwen05, None) == {"draft": None}
    assert draft_options("specpc", qwen15, None) == {"draft": "smollm2-135m"}  # the 1.5B's cross_draft
    assert draft_options("rapid", qwen15, None) == {"draft": "qwen2.5-coder-0.5b"}  # same tokenizer family
    assert draft_options("specpc", qwen05, "self") == {"draft": "self"}
    assert draft_options("gemfilter", qwen05, None) == {}


def test_compare_methods(tiny_lm, tmp_path, capsys):
    plot, questions = tmp_path / "methods.png", tmp_path / "questions.json"
    questions.write_text(json.dumps([{"question": "Who founded the town of Eldermoor?", "answers": ["Mara Quill"]}]))
    argv = ["--questions", str(questions), "--methods", "full,rag,gemfilter,snapkv", "--budget", "200",
            "--max-new-tokens", "3", "--plot", str(plot)]
    assert example("compare_methods").main(argv, lm=tiny_lm) == 0
    rows = table(capsys.readouterr().out)
    assert list(rows) == ["full", "rag", "gemfilter", "snapkv"] and plot.stat().st_size > 0
    assert all(re.fullmatch(r"[01]/1", cells[1]) for cells in rows.values())
    assert rows["snapkv"][2] == rows["full"][2] and rows["snapkv"][3] == "200"


def test_compare_methods_writes_its_plot_outside_the_repository(tiny_lm):
    plot = Path(example("compare_methods").parse_args([]).plot)
    assert EXAMPLES.parent not in plot.resolve().parents


class SSE(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that streams '4817' in two pieces, then usage, as vLLM does."""

    received: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.path, self.headers.get("Authorization"), body))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        prompt = len(body["messages"][1]["content"]) // 4
        for event in ({"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{"delta": {"content": "48"}}]},
                      {"choices": [{"delta": {"content": "17"}}]},
                      {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": 2}}):
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


def test_compressed_prompt_for_any_engine(tiny_lm, capsys):
    SSE.received = []
    server = HTTPServer(("127.0.0.1", 0), SSE)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
        argv = ["--endpoint", endpoint, "--api-key", "sk-test", "--remote-model", "stand-in", "--budget", "120"]
        assert example("compressed_prompt_for_any_engine").main(argv, lm=tiny_lm) == 0
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    (path, auth, full), (_, _, kept) = SSE.received
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and full["model"] == "stand-in"
    assert full["stream"] and [m["role"] for m in kept["messages"]] == ["system", "user"]
    assert kept["messages"][1]["content"].endswith("Question: What is the vault code of the Harbour Museum?")
    assert len(kept["messages"][1]["content"]) < len(full["messages"][1]["content"])
    rows = table(out)
    assert rows["full"][1] == rows["rag 120"][1] == "1/1"  # '48' + '17' joined, graded against the demo's 4817
    assert int(rows["rag 120"][2]) < int(rows["full"][2]) and '"role": "user"' in out


def test_compressed_prompt_dry_run_and_unreachable_endpoint(tiny_lm, capsys):
    module = example("compressed_prompt_for_any_engine")
    assert module.main(["--dry-run", "--method", "rag", "--budget", "120"], lm=tiny_lm) == 0
    assert "saved " in capsys.readouterr().out
    assert module.main(["--endpoint", "http://127.0.0.1:9/v1/chat/completions", "--budget", "120"], lm=tiny_lm) == 1
    assert "scripts/serve_engine.sh" in capsys.readouterr().err


def test_long_document_qa_on_a_file(tiny_lm, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("The lighthouse keeper was called Ansel. " * 30 + "The boat was painted red. " * 30)
    argv = ["--file", str(book), "-q", "Who kept the lighthouse?", "--answer", "Ansel", "--methods", "full,gemfilter",
            "--budget", "0.5", "--max-new-tokens", "3"]
    assert example("long_document_qa").main(argv, lm=tiny_lm) == 0
    out = capsys.readouterr().out
    assert "expected: Ansel" in out and list(table(out)) == ["full", "gemfilter"]
