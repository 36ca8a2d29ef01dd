"""Compress the context with ctxopt on this machine, then send the shorter prompt to any OpenAI-compatible
chat endpoint (vLLM, llama.cpp's server, Ollama, TGI, OpenAI, ...), beside the same question with the whole
context, and compare the two answers and their TTFT (time to the first streamed token).

    bash scripts/serve_engine.sh qwen2.5-coder-0.5b 8000 &                # an engine to send to (vLLM CPU build)
    python examples/compressed_prompt_for_any_engine.py                    # ... then this, against it
    python examples/compressed_prompt_for_any_engine.py --dry-run          # show the request, send nothing
    python examples/compressed_prompt_for_any_engine.py \\
        --endpoint http://localhost:8000/v1/chat/completions --remote-model Qwen/Qwen2.5-7B-Instruct

The compression is text-level (``CtxoptDocumentCompressor``: ``rag``, ``extractive``, ``truncate``,
``gemfilter``, ``specpc``), scored locally; the engine only ever sees the kept text. The default, ``rag`` at
256 tokens, keeps the passage with the vault code. Token counts are in the local model's tokenizer, except
the table's, which are the engine's. The API key, if the endpoint needs one, comes from --api-key or
$OPENAI_API_KEY.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from importlib import resources

from langchain_core.documents import Document

from ctxopt.bench.compare import MethodRow, contains_answer, method_notes, method_table
from ctxopt.cli import parse_budget
from ctxopt.integrations.langchain import CtxoptDocumentCompressor
from ctxopt.methods import budget_for
from ctxopt.models import LoadedModel, load_model
from ctxopt.models.registry import EXAMPLE_MODEL
from ctxopt.prompting import DEFAULT_INSTRUCTION
from ctxopt.retrievers import iter_corpus
from ctxopt.text import count_tokens

DEMO = resources.files("ctxopt") / "data" / "demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="documents to use as context (default: the bundled demo corpus)")
    parser.add_argument("-q", "--question", default="What is the vault code of the Harbour Museum?")
    parser.add_argument("--answer", action="append", help="a gold answer, to grade (default: the demo question's)")
    parser.add_argument("--method", default="rag",
                        help="rag, truncate, gemfilter, specpc, extractive or color (budget: ignored by color)")
    parser.add_argument("--budget", default="256", help="tokens (256) or a ratio of the prompt (0.4)")
    parser.add_argument("--endpoint", default="http://127.0.0.1:8000/v1/chat/completions")
    parser.add_argument("--remote-model", default=EXAMPLE_MODEL,
                        help="the model name the endpoint expects (scripts/serve_engine.sh serves the registry name)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length asked of the endpoint")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the endpoint")
    parser.add_argument("--dry-run", action="store_true", help="show the request without sending it")
    parser.add_argument("--model", default=EXAMPLE_MODEL, help="the local scoring model: registry name or folder")
    return parser.parse_args(argv)


def chat_request(question: str, documents: list[Document], remote_model: str, max_tokens: int) -> dict:
    """The streamed /v1/chat/completions body: ctxopt's instruction, then the kept context and the question."""
    context = "\n\n".join(f"[{i}] ({d.metadata['source']}) {d.page_content}" for i, d in enumerate(documents, 1))
    return {
        "model": remote_model,
        "messages": [
            {"role": "system", "content": DEFAULT_INSTRUCTION},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def post(endpoint: str, body: dict, api_key: str | None, timeout: float) -> tuple[str, float, dict]:
    """Send ``body`` and read the server-sent events: (answer text, seconds to its first piece, usage)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    began, first, pieces, usage = time.perf_counter(), None, [], {}
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            data = line.decode("utf-8").strip().removeprefix("data:").strip()
            if not data or data == "[DONE]":
                continue
            event = json.loads(data)
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - began
                    pieces.append(piece)
    return "".join(pieces), first if first is not None else time.perf_counter() - began, usage


def gold_answers(args: argparse.Namespace) -> list[str]:
    """--answer, else the demo's gold answers when the question is a demo question."""
    if args.answer:
        return args.answer
    demo = json.loads((DEMO / "questions.json").read_text(encoding="utf-8"))
    return next((item["answers"] for item in demo if item["question"] == args.question), [])


def main(argv: list[str] | None = None, lm: LoadedModel | None = None) -> int:
    args = parse_args(argv)
    lm = lm or load_model(args.model)
    with resources.as_file(DEMO / "corpus") as demo:
        documents = [
            Document("".join(text for _, text in d.pieces), metadata={"source": d.source, **d.metadata})
            for d in iter_corpus(args.folder or demo)
        ]
    budget = budget_for(args.method, parse_budget(args.budget))  # color takes none
    compressor = CtxoptDocumentCompressor(model=lm, method=args.method, budget=budget)
    kept = compressor.compress_documents(documents, args.question)
    before = count_tokens(lm.tokenizer, [d.page_content for d in documents])
    after = sum(d.metadata["ctxopt_tokens_out"] for d in kept)

    body = chat_request(args.question, kept, args.remote_model, args.max_tokens)
    print(f"request to {args.endpoint}:\n{json.dumps(body, indent=2, ensure_ascii=False)}")
    print(f"\ncontext: {before} -> {after} tokens ({len(kept)} of {len(documents)} documents kept); "
          f"saved {before - after} tokens ({1 - after / before:.0%}) with {args.method} (budget {args.budget})")
    if args.dry_run:
        return 0
    golds, label = gold_answers(args), f"{args.method} {args.budget}"
    rows = []
    for name, docs in (("full", documents), (label, kept)):
        request = chat_request(args.question, docs, args.remote_model, args.max_tokens)
        try:
            text, ttft, usage = post(args.endpoint, request, args.api_key, args.timeout)
        except (urllib.error.URLError, TimeoutError) as error:
            print(f"could not reach {args.endpoint}: {error}. Start an OpenAI-compatible server there (`bash "
                  f"scripts/serve_engine.sh {args.remote_model} 8000` serves a registry model with vLLM's CPU build, "
                  "docs/engine.md), pass --endpoint, or use --dry-run.", file=sys.stderr)
            return 1
        prompt = usage.get("prompt_tokens") or count_tokens(lm.tokenizer, [m["content"] for m in request["messages"]])
        rows.append(MethodRow(name, [contains_answer(text, golds) if golds else None], [ttft], [prompt], [prompt]))
        print(f"\n{name}: {text!r}" + (f"  (expected {golds[0]})" if golds else ""))
    print(f"\nthrough {args.endpoint} (prompt tokens as the engine counts them):\n" + method_table(rows))
    for note in method_notes(rows):
        print("- " + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
