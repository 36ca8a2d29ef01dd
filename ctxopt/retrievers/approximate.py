"""Approximate search for large indexes: an inverted-file (IVF) index trained on a sample of the vectors, and
its recall against exact search, measured when it is built.

The index is FAISS's ``IVF<nlist>,Flat`` with the inner-product metric: k-means on a seeded sample of
``TRAIN_POINTS_PER_LIST`` vectors per list cuts the space into ``nlist`` (about the square root of the count)
cells; a query scans the ``nprobe`` cells nearest to it. Vectors are stored uncompressed, so scores are exact
and only the candidate set is approximate (and ``reconstruct`` gives every vector back exactly).

``nprobe`` is chosen at build time: the smallest power of two whose recall@k reaches ``target``, measured on
a seeded sample of the indexed vectors used as queries (each query's own row left out of both answers),
against exact inner-product search over all the vectors. Real questions are not passages, so the figure is an
estimate of the recall a question sees, not a guarantee.
"""
from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

DEFAULT_THRESHOLD = 50_000  # passages above which a built index is approximate
TARGET_RECALL = 0.95
RECALL_K = 10
RECALL_QUERIES = 200
TRAIN_POINTS_PER_LIST = 40  # k-means wants at least 39 points per centroid
SEED = 0


def ivf_lists(count: int) -> int:
    """How many cells for ``count`` vectors: about sqrt(count), and never fewer than 40 training points each."""
    return max(1, min(round(math.sqrt(count)), count // TRAIN_POINTS_PER_LIST))


def build_ivf(vectors: np.ndarray, nlist: int | None = None, seed: int = SEED) -> faiss.Index:
    """An ``IVF<nlist>,Flat`` inner-product index trained on a seeded sample of ``vectors``, holding them all."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    nlist = nlist or ivf_lists(count)
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = min(count, nlist * TRAIN_POINTS_PER_LIST)
    rows = np.sort(np.random.default_rng(seed).choice(count, sample, replace=False))
    index.train(vectors[rows])
    index.add(vectors)
    return index


def query_rows(count: int, queries: int = RECALL_QUERIES, seed: int = SEED) -> np.ndarray:
    """The seeded sample of rows whose vectors serve as recall queries."""
    return np.sort(np.random.default_rng(seed + 1).choice(count, min(count, queries), replace=False))


def exact_neighbours(vectors: np.ndarray, rows: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """For each query row, the ``k`` rows of highest inner product with it, itself left out (exact search)."""
    _, found = faiss.knn(vectors[rows], vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return _without_self(found, rows, k)


def recall(index: faiss.Index, vectors: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's exact neighbours (``truth``) that ``index`` returns among its first k."""
    k = truth.shape[1]
    if k == 0:
        return 1.0
    _, found = index.search(np.ascontiguousarray(vectors[rows]), k + 1)
    found = _without_self(found, rows, k)
    hits = [len(set(got[got >= 0].tolist()) & set(want.tolist())) for got, want in zip(found, truth)]
    return float(np.mean(hits)) / k


def tune_nprobe(
    index: faiss.Index, vectors: np.ndarray, target: float = TARGET_RECALL, k: int = RECALL_K,
    queries: int = RECALL_QUERIES, seed: int = SEED,
) -> dict[str, Any]:
    """Set ``index.nprobe`` to the smallest power of two (up to nlist) whose measured recall@k reaches ``target``.

    Returns the report kept in the index manifest: cells, nprobe, recall at each nprobe tried, the queries.
    """
    count = len(vectors)
    k = min(k, count - 1)
    rows = query_rows(count, queries, seed)
    truth = exact_neighbours(vectors, rows, k)
    ivf = faiss.extract_index_ivf(index)
    tried: dict[str, float] = {}
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        tried[str(nprobe)] = round(recall(index, vectors, rows, truth), 4)
        if tried[str(nprobe)] >= target or nprobe >= ivf.nlist:
            break
        nprobe = min(nprobe * 2, ivf.nlist)
    return {
        "type": "ivf", "nlist": int(ivf.nlist), "nprobe": int(nprobe), "k": int(k),
        "recall": tried[str(nprobe)], "target": target, "recall_by_nprobe": tried, "queries": int(len(rows)),
        "train_sample": int(min(count, ivf.nlist * TRAIN_POINTS_PER_LIST)),
        "measured_on": "indexed vectors as queries, each query's own row left out",
    }


def _without_self(found: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each result row with the query's own id removed (or its last entry, if absent), cut to ``k``."""
    out = np.empty((len(rows), k), dtype=np.int64)
    for i, (got, own) in enumerate(zip(found, rows)):
        rest = got[got != own]
        out[i] = rest[:k]
    return out
