"""Compress the context with ctxopt on this machine, then send the shorter prompt to any OpenAI-compatible
chat endpoint (vLLM, llama.cpp's server, Ollama, TGI, OpenAI, ...).

    python examples/compressed_prompt_for_any_engine.py --dry-run          # show the request, send nothing
    python examples/compressed_prompt_for_any_engine.py \\
        --endpoint http://localhost:8000/v1/chat/completions --remote-model Qwen/Qwen2.5-7B-Instruct

The compression is text-level (``CtxoptDocumentCompressor``: ``rag``, ``truncate``, ``gemfilter``,
``specpc``), scored by the local model; the engine only ever sees the kept text. Token counts are in the
local model's tokenizer. The API key, if the endpoint needs one, comes from --api-key or $OPENAI_API_KEY.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from importlib import resources

from langchain_core.documents import Document

from ctxopt.cli import parse_budget
from ctxopt.integrations.langchain import CtxoptDocumentCompressor
from ctxopt.models import LoadedModel, load_model
from ctxopt.prompting import DEFAULT_INSTRUCTION
from ctxopt.retrievers import iter_corpus
from ctxopt.text import count_tokens

DEMO = resources.files("ctxopt") / "data" / "demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="documents to use as context (default: the bundled demo corpus)")
    parser.add_argument("-q", "--question", default="What is the vault code of the Harbour Museum?")
    parser.add_argument("--method", default="gemfilter",
                        help="rag, truncate, gemfilter, specpc, extractive or color (budget: ignored by color)")
    parser.add_argument("--budget", default="0.4", help="tokens (256) or a ratio of the prompt (0.4)")
    parser.add_argument("--endpoint", default="http://127.0.0.1:8000/v1/chat/completions")
    parser.add_argument("--remote-model", default="default", help="the model name the endpoint expects")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length asked of the endpoint")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the endpoint")
    parser.add_argument("--dry-run", action="store_true", help="show the request without sending it")
    parser.add_argument("--model", default="smollm2-135m", help="the local scoring model: registry name or folder")
    return parser.parse_args(argv)


def chat_request(question: str, documents: list[Document], remote_model: str, max_tokens: int) -> dict:
    """The /v1/chat/completions body: ctxopt's instruction, then the kept context and the question."""
    context = "\n\n".join(f"[{i}] ({d.metadata['source']}) {d.page_content}" for i, d in enumerate(documents, 1))
    return {
        "model": remote_model,
        "messages": [
            {"role": "system", "content": DEFAULT_INSTRUCTION},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def post(endpoint: str, body: dict, api_key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def main(argv: list[str] | None = None, lm: LoadedModel | None = None) -> int:
    args = parse_args(argv)
    lm = lm or load_model(args.model)
    with resources.as_file(DEMO / "corpus") as demo:
        documents = [
            Document("".join(text for _, text in d.pieces), metadata={"source": d.source, **d.metadata})
            for d in iter_corpus(args.folder or demo)
        ]
    compressor = CtxoptDocumentCompressor(model=lm, method=args.method, budget=parse_budget(args.budget))
    kept = compressor.compress_documents(documents, args.question)
    before = count_tokens(lm.tokenizer, [d.page_content for d in documents])
    after = sum(d.metadata["ctxopt_tokens_out"] for d in kept)

    body = chat_request(args.question, kept, args.remote_model, args.max_tokens)
    print(f"request to {args.endpoint}:\n{json.dumps(body, indent=2, ensure_ascii=False)}")
    print(f"\ncontext: {before} -> {after} tokens ({len(kept)} of {len(documents)} documents kept); "
          f"saved {before - after} tokens ({1 - after / before:.0%}) with {args.method} (budget {args.budget})")
    if args.dry_run:
        return 0
    try:
        reply = post(args.endpoint, body, args.api_key, args.timeout)
    except (urllib.error.URLError, TimeoutError) as error:
        print(f"could not reach {args.endpoint}: {error}. Start an OpenAI-compatible server there, pass --endpoint, "
              "or use --dry-run.", file=sys.stderr)
        return 1
    print(f"\nanswer: {reply['choices'][0]['message']['content']}")
    if "usage" in reply:
        print(f"endpoint usage: {reply['usage']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
