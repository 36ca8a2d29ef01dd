"""Retrieval: corpus loading, token-aware chunking, sentence-transformers embeddings, a persisted FAISS store, and
sharded, resumable index builds (in this process or on Ray: ``ray_jobs``)."""
from .chunking import chunk_corpus, chunk_text
from .corpus import SUPPORTED_SUFFIXES, CorpusWarning, Document, iter_corpus
from .embeddings import DEFAULT_EMBEDDER, Embedder, embedder_path, load_embedder
from .jobs import Compression, IndexReport, WorkerSpec, index_corpus
from .store import FaissStore, build_index

__all__ = [
    "DEFAULT_EMBEDDER",
    "SUPPORTED_SUFFIXES",
    "Compression",
    "CorpusWarning",
    "Document",
    "Embedder",
    "FaissStore",
    "IndexReport",
    "WorkerSpec",
    "build_index",
    "chunk_corpus",
    "chunk_text",
    "embedder_path",
    "index_corpus",
    "iter_corpus",
    "load_embedder",
]
