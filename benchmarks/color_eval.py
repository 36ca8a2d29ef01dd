"""CoLoR against its baselines on HotpotQA distractor (the eval-side samples ``ctxopt bench`` uses).

Per method and sample: context tokens before and after compression (generator tokenizer), compression
seconds per passage, answer EM/F1 (``ctxopt.bench.metrics.score``, the bench's prompt: HotpotQA instruction,
32 new tokens), seconds to answer, and in-context retrieval (the LOFT-style request of ``ctxopt train
color-data`` over the sample's compressed passages; a hit when the ID the model names is a supporting one),
and evidence kept: of the supporting passages that contain a gold answer or bridge entity (the title of the
other supporting passage), the share whose compressed text still contains all of it (the ``evidence`` judge
of ``ctxopt train color-data``; a dropped passage keeps nothing). ``--no-answer`` measures only compression
(tokens, seconds, evidence kept), which needs no generator calls.

    OMP_NUM_THREADS=1 python benchmarks/color_eval.py --samples 6 --out color-eval.json

Methods: ``original`` (no compression), ``color-untrained`` (the prompt alone), ``color`` (the packaged
adapter, or ``--adapter``; both run ``--compressor``, SmolLM2-135M by default), ``extractive``
(``--extractive-ratio`` of each passage, 0.5 by default), ``embeddings-filter`` (LangChain's EmbeddingsFilter over
the same MiniLM embedder, top 5 of the 10 passages; its ``compress_documents`` imports langchain-community, which
ctxopt does not install).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from ctxopt.bench.datasets import load_hotpotqa
from ctxopt.bench.metrics import score
from ctxopt.compressors.color import CoLoR
from ctxopt.compressors.extractive import Extractive
from ctxopt.decoding import GenerationConfig
from ctxopt.models import load_model
from ctxopt.pipeline import Pipeline
from ctxopt.retrievers.embeddings import load_embedder
from ctxopt.stages import Run
from ctxopt.text import count_tokens
from ctxopt.training.color import EvidenceJudge, JudgeCase, pick_id
from ctxopt.types import Passage, Stats


def embeddings_filter(k: int):
    """LangChain's EmbeddingsFilter (top ``k`` documents by cosine similarity) as a passage compressor."""
    from langchain_classic.retrievers.document_compressors import EmbeddingsFilter
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings

    embedder = load_embedder()

    class MiniLM(Embeddings):
        def embed_documents(self, texts):
            return embedder.embed(list(texts)).tolist()

        def embed_query(self, text):
            return embedder.embed([text])[0].tolist()

    # Its default similarity function lives in langchain-community; MiniLM rows are unit vectors, so a dot
    # product is the same cosine similarity.
    keep = EmbeddingsFilter(embeddings=MiniLM(), k=k, similarity_fn=lambda a, b: np.asarray(a) @ np.asarray(b).T)

    def compress(question: str, passages: list[Passage], run: Run) -> list[Passage]:
        documents = [Document(page_content=p.text, metadata={"index": i}) for i, p in enumerate(passages)]
        kept = sorted(d.metadata["index"] for d in keep.compress_documents(documents, question))
        return [passages[i] for i in kept]

    return compress


def evidence_kept(sample, passages: list[Passage]) -> list[bool]:
    """Per supporting passage with evidence to keep: whether its compressed version (matched by title; absent
    when the method dropped it) still holds all of it."""
    judge = EvidenceJudge()
    by_title = {p.metadata["title"]: p.text for p in passages}
    supporting = [p for p in sample.passages if p.metadata["supporting"]]
    verdicts = []
    for passage in supporting:
        bridges = [p.metadata["title"] for p in supporting if p is not passage]
        case = JudgeCase(sample.id, sample.id, sample.question, sample.answers, passage.text, [], 0, bridges)
        if judge.spans(case):
            verdicts.append(judge(case, by_title.get(passage.metadata["title"], "")))
    return verdicts


def methods(compressor: str, adapter: str | None, extractive_ratio: float) -> dict:
    return {
        "original": lambda question, passages, run: passages,
        "color-untrained": CoLoR(compressor=compressor, adapter=None).compress,
        "color": CoLoR(compressor=compressor, adapter=adapter or "auto").compress,
        "extractive": Extractive(extractive_ratio).compress,
        "embeddings-filter": embeddings_filter(5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offset", type=int, default=0, help="skip this many of the seed's questions (a later page)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--compressor", default="smollm2-135m", help="CoLoR's compressor model")
    parser.add_argument("--adapter", default=None, help="CoLoR adapter folder (default: the packaged one)")
    parser.add_argument("--methods", default="original,color-untrained,color,extractive")
    parser.add_argument("--extractive-ratio", type=float, default=0.5, help="share of each passage extractive keeps")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-answer", action="store_true", help="compression only: skip answering and retrieval")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = load_model(args.model)
    embedder = load_embedder()
    samples = load_hotpotqa(args.samples, seed=args.seed, split_offset=args.offset)
    table = methods(args.compressor, args.adapter, args.extractive_ratio)
    results = {}
    for name in args.methods.split(","):
        compress = table[name]
        rows = []
        for sample in samples:
            run = Run(lm=lm, question=sample.question, config=GenerationConfig(), stats=Stats(),
                      embedder=lambda: embedder)
            began = time.perf_counter()
            passages = compress(sample.question, sample.passages, run)
            compress_seconds = time.perf_counter() - began
            kept = evidence_kept(sample, passages)
            row = {"id": sample.id, "tokens_in": count_tokens(lm.tokenizer, sample.passages),
                   "tokens_out": count_tokens(lm.tokenizer, passages),
                   "compress_seconds_per_passage": compress_seconds / len(sample.passages),
                   "evidence_kept": sum(kept), "evidence_passages": len(kept)}
            if not args.no_answer:
                began = time.perf_counter()
                answer = Pipeline(lm, instruction=sample.instruction, max_new_tokens=32).ask(
                    sample.question, context=passages)
                row["answer_seconds"] = time.perf_counter() - began
                picked = pick_id(lm, sample.question, [p.text for p in passages])
                row.update(retrieval_hit=float(passages[picked].metadata["supporting"]), prediction=answer.text,
                           **score(sample, answer.text))
            rows.append(row)
            print(name, row["id"], row["tokens_in"], row["tokens_out"], f"evidence {sum(kept)}/{len(kept)}",
                  round(row.get("f1", float("nan")), 3), row.get("retrieval_hit"), flush=True)

        def mean(key: str) -> float:
            return statistics.mean(r[key] for r in rows)

        results[name] = {
            "samples": len(rows), "ratio": sum(r["tokens_in"] for r in rows) / sum(r["tokens_out"] for r in rows),
            "evidence_kept": sum(r["evidence_kept"] for r in rows) / max(1, sum(r["evidence_passages"] for r in rows)),
            "evidence_passages": sum(r["evidence_passages"] for r in rows),
            "compress_seconds_per_passage": mean("compress_seconds_per_passage"), "rows": rows,
        }
        if not args.no_answer:
            results[name].update(f1=mean("f1"), em=mean("em"), retrieval_accuracy=mean("retrieval_hit"),
                                 answer_seconds=mean("answer_seconds"))
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"command": vars(args), "results": results}, handle, indent=2)
    for name, r in results.items():
        line = (f"{name:18s} ratio {r['ratio']:.2f}x  evidence kept {r['evidence_kept']:.2f} of "
                f"{r['evidence_passages']}  compress {r['compress_seconds_per_passage']:.2f} s/passage")
        if "f1" in r:
            line += (f"  F1 {r['f1']:.3f}  EM {r['em']:.3f}  retrieval {r['retrieval_accuracy']:.2f}"
                     f"  answer {r['answer_seconds']:.1f} s")
        print(line)


if __name__ == "__main__":
    main()
