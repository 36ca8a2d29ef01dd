"""An ordinary LangChain RAG chain (retriever | prompt | chat model), then the same chain with ctxopt
compression dropped in: one line changes.

    python examples/langchain_rag.py                                   # the bundled demo corpus and questions
    python examples/langchain_rag.py --method gemfilter --budget 0.5 -k 3
    python examples/langchain_rag.py my_docs/ -q "Who founded the town?"

Prints each answer, then per chain the answers correct against the demo's gold answers, prompt tokens, TTFT
and its ratio to the plain chain's. The default drop-in, ``rag`` at 224 prompt tokens (template and question
included, about 130 of context), keeps the context chunks most similar to the question; token-level methods
(gemfilter, specpc) and KV-cache methods (snapkv, speckv) plug in the same way, but on two retrieved passages
(~300 tokens) none of them can answer sooner on a CPU: the table's notes say why. Runs offline on the local
model; only langchain-core is needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnablePassthrough

from ctxopt.bench.compare import MethodRow, contains_answer, kv_positions, method_notes, method_table
from ctxopt.cli import parse_budget
from ctxopt.integrations.langchain import CtxoptChatModel, CtxoptRetriever
from ctxopt.models import LoadedModel
from ctxopt.models.registry import EXAMPLE_MODEL
from ctxopt.retrievers import build_index

DEMO = resources.files("ctxopt") / "data" / "demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="folder of .txt/.md/.jsonl files (default: the bundled demo corpus)")
    parser.add_argument("-q", "--question", action="append", help="repeatable; default: the demo questions")
    parser.add_argument("-k", type=int, default=2, help="documents to retrieve")
    parser.add_argument("--method", default="rag", help="the ctxopt method dropped into the chain")
    parser.add_argument("--budget", default="224", help="prompt tokens (224), or a ratio of the prompt (0.5)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default=EXAMPLE_MODEL, help="registry name, model folder or .gguf file")
    return parser.parse_args(argv)


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(f"[{i}] {doc.page_content}" for i, doc in enumerate(docs, 1))


def rag_chain(retriever: CtxoptRetriever, llm: CtxoptChatModel) -> Runnable:
    """question -> retrieved documents -> prompt -> chat model -> AIMessage."""
    # An earlier human message carries the context (a system message would be the system prompt); CtxoptChatModel
    # adds its own short-answer instruction.
    prompt = ChatPromptTemplate.from_messages([("human", "{context}"), ("human", "{question}")])
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm


def main(argv: list[str] | None = None, lm: LoadedModel | None = None) -> int:
    args = parse_args(argv)
    if args.question:
        items = [{"question": q, "answers": []} for q in args.question]
    elif args.folder:
        sys.exit("give at least one --question for your own folder")
    else:
        items = json.loads((DEMO / "questions.json").read_text(encoding="utf-8"))
    with resources.as_file(DEMO / "corpus") as demo:
        retriever = CtxoptRetriever(store=build_index(Path(args.folder or demo), progress=False), k=args.k)
    model = lm or args.model

    plain = rag_chain(retriever, CtxoptChatModel(model=model, max_new_tokens=args.max_new_tokens))
    # The one changed line: the same chat model, with ctxopt compressing the context before it is read.
    optimised = rag_chain(retriever, CtxoptChatModel(model=model, method=args.method, budget=parse_budget(args.budget),
                                                     max_new_tokens=args.max_new_tokens))

    label = f"ctxopt {args.method} {args.budget}"
    rows = {name: MethodRow(name, [], [], [], []) for name in ("plain", label)}
    for item in items:
        print(f"\nQ: {item['question']}")
        for name, chain in (("plain", plain), (label, optimised)):
            reply = chain.invoke(item["question"])
            stats, row = reply.response_metadata["ctxopt"], rows[name]
            row.correct.append(contains_answer(reply.content, item["answers"]) if item["answers"] else None)
            row.ttfts.append(stats["ttft_seconds"])
            row.prompt_tokens.append(reply.usage_metadata["input_tokens"])
            row.kv.append(kv_positions(stats["stats"]["stages"]))
            print(f"  {name}: {reply.content!r}")
    read = {name: sum(row.prompt_tokens) for name, row in rows.items()}
    table = list(rows.values())
    print(f"\n{len(items)} questions, {args.k} retrieved documents each:\n" + method_table(table, "plain"))
    for note in method_notes(table, "plain"):
        print("- " + note)
    saved = read["plain"] - read[label]
    print(f"saved {saved} of {read['plain']} prompt tokens ({saved / read['plain']:.0%}) with {args.method} "
          f"(budget {args.budget}) over {len(items)} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
