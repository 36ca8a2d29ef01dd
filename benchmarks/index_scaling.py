"""Index builds at corpus scale: passages per second in one process against Ray with 1 and 2 workers, and the
approximate (IVF) index's recall@10 and query latency at 100K and 1M passages.

Throughput (``--part throughput``): the corpus is this repository's own prose (README, docs/, the benchmark
journal), chunked at 200 tokens with MiniLM's tokenizer; the first ``--passages`` passages are written as one
JSONL record each, so every build indexes exactly those passages. Each configuration is one ``index_corpus``
run into a fresh folder: embedding plus query-free extractive compression (ratio 0.5) over ``--passages``, and
embedding plus CoLoR (``--compressor``, its packaged adapter) over the first ``--color-passages``. Reported:
wall seconds of the build once the workers have loaded their models (for Ray: the cluster start and the actors'
model loads are reported apart), passages per wall second, and each step's passages per worker-second (the
per-worker rate, from which N machines are estimated on paper: N x workers x rate, while the driver keeps up).

Approximate index (``--part approx``): synthetic unit vectors of width 384, clustered (``--clusters`` Gaussian
centres, ``--noise`` 1.0 per coordinate before normalising: two vectors of a cluster have cosine about 0.5), an
easy case with neighbourhoods, and uniform random unit vectors, the hardest case (no structure: every vector is
almost equally far from every other). Both are timed and their recall measured. The IVF index is the one
``ctxopt index`` builds past its threshold (``approximate.build_ivf``, nprobe tuned to recall@10 >= 0.95 by
``tune_nprobe``); latency is one query at a time, k = 10, median and p95 over ``--queries`` queries that are
not in the index, against exact search (``IndexFlatIP``) over the same vectors.

    OMP_NUM_THREADS=1 python benchmarks/index_scaling.py --part throughput --passages 96 --color-passages 4 \\
        --shard-size 16 --color-shard-size 1 --out runs/index-scaling-throughput.json
    OMP_NUM_THREADS=1 python benchmarks/index_scaling.py --part approx --sizes 100000,1000000 \\
        --out runs/index-scaling-approx.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(folder: Path, passages: int) -> int:
    """The first ``passages`` 200-token passages of the repository's prose, one JSONL record each."""
    from ctxopt.retrievers import chunk_corpus, load_embedder

    source = folder / "source"
    source.mkdir(parents=True)
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "JOURNAL.md"]:
        shutil.copy(path, source / path.name)
    records = []
    for passage in chunk_corpus(source, load_embedder().tokenizer, 200, 40):
        records.append(json.dumps({"text": passage.text, "from": passage.source}))
        if len(records) == passages:
            break
    shutil.rmtree(source)
    (folder / "corpus").mkdir()
    (folder / "corpus" / "passages.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    return len(records)


def one_build(corpus: Path, out: Path, spec, executor_kind: str, workers: int, shard_size: int) -> dict:
    """One build into ``out``: start-up (cluster, models) and build timed apart."""
    from ctxopt.retrievers.jobs import LocalExecutor, index_corpus

    began = time.perf_counter()
    if executor_kind == "local":
        executor = LocalExecutor(spec)
    else:
        from ctxopt.retrievers.ray_jobs import RayExecutor

        executor = RayExecutor(spec, workers=workers)
    executor.fingerprint()  # every worker has loaded its models
    startup = time.perf_counter() - began
    try:
        report = index_corpus(corpus, out, executor=executor, chunk_tokens=256, overlap=40, shard_size=shard_size,
                              progress=False)
    finally:
        executor.close()
    return {
        "executor": executor_kind, "workers": workers, "passages": report.passages, "startup_s": round(startup, 2),
        "build_s": round(report.seconds, 2), "passages_per_s": round(report.passages / report.seconds, 2),
        "per_worker_rate": {step: round(rate, 2) for step, rate in report.rates().items()},
        "step_seconds": {step: round(s, 2) for step, s in report.step_seconds.items()},
    }


def throughput(args) -> list[dict]:
    from ctxopt.retrievers.jobs import Compression, WorkerSpec

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count = write_corpus(tmp / "big", args.passages)
        small = write_corpus(tmp / "small", args.color_passages)
        jobs = [("extractive", tmp / "big" / "corpus", WorkerSpec(compression=Compression.parse("extractive:0.5")),
                 args.shard_size),
                ("color", tmp / "small" / "corpus",
                 WorkerSpec(compression=Compression.parse(f"color:{args.compressor}")), args.color_shard_size)]
        for label, corpus, spec, shard_size in jobs:
            for kind, workers in [("local", 1), ("ray", 1), ("ray", 2)]:
                row = one_build(corpus, tmp / f"{label}-{kind}-{workers}", spec, kind, workers, shard_size)
                row["job"] = label
                print(json.dumps(row), flush=True)
                rows.append(row)
        print(f"corpus: {count} passages (embedding + extractive), {small} passages (CoLoR)")
    return rows


def clustered(count: int, dim: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    """Unit vectors around ``clusters`` Gaussian centres: two of a cluster have cosine about 1 / (1 + noise^2)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = np.empty((count, dim), dtype=np.float32)
    for lo in range(0, count, 100_000):
        hi = min(count, lo + 100_000)
        vectors[lo:hi] = centres[rng.integers(0, clusters, hi - lo)]
        vectors[lo:hi] += noise * rng.standard_normal((hi - lo, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def latency_ms(index, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    times = []
    for query in queries:
        began = time.perf_counter()
        index.search(query[None, :], k)
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def approx(args) -> list[dict]:
    import faiss

    from ctxopt.retrievers.approximate import build_ivf, tune_nprobe

    rows = []
    for size in args.sizes:
        for kind in ("clustered", "random"):
            if kind == "clustered":
                data = clustered(size + args.queries, 384, args.clusters, args.noise, seed=0)
            else:
                data = np.random.default_rng(1).standard_normal((size + args.queries, 384)).astype(np.float32)
                data /= np.linalg.norm(data, axis=1, keepdims=True)
            vectors, queries = data[:size], data[size:]
            began = time.perf_counter()
            index = build_ivf(vectors)
            build_s = time.perf_counter() - began
            row = {"passages": size, "vectors": kind, "ivf_build_s": round(build_s, 1)}
            began = time.perf_counter()
            report = tune_nprobe(index, vectors)
            row.update(nlist=report["nlist"], nprobe=report["nprobe"], recall_at_10=report["recall"],
                       recall_by_nprobe=report["recall_by_nprobe"], tune_s=round(time.perf_counter() - began, 1))
            # recall for held-out queries (not indexed) at the tuned nprobe
            _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
            _, found = index.search(queries, 10)
            row["recall_at_10_held_out"] = round(float(np.mean(
                [len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())])), 4)
            row["ivf_p50_ms"], row["ivf_p95_ms"] = (round(x, 3) for x in latency_ms(index, queries))
            flat = faiss.IndexFlatIP(384)
            flat.add(vectors)
            row["exact_p50_ms"], row["exact_p95_ms"] = (round(x, 3) for x in latency_ms(flat, queries[:50]))
            del flat, index, data, vectors
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["throughput", "approx", "all"], default="all")
    parser.add_argument("--passages", type=int, default=320)
    parser.add_argument("--color-passages", type=int, default=12)
    parser.add_argument("--compressor", default="smollm2-135m")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--color-shard-size", type=int, default=2)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100_000, 1_000_000])
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    if args.part in ("throughput", "all"):
        results["throughput"] = throughput(args)
    if args.part in ("approx", "all"):
        results["approx"] = approx(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
