"""Retrieval: corpus loading, token-aware chunking, sentence-transformers embeddings, a persisted FAISS store."""
from .chunking import chunk_corpus, chunk_text
from .corpus import SUPPORTED_SUFFIXES, CorpusWarning, Document, iter_corpus
from .embeddings import DEFAULT_EMBEDDER, Embedder, embedder_path, load_embedder
from .store import FaissStore, build_index

__all__ = [
    "DEFAULT_EMBEDDER",
    "SUPPORTED_SUFFIXES",
    "CorpusWarning",
    "Document",
    "Embedder",
    "FaissStore",
    "build_index",
    "chunk_corpus",
    "chunk_text",
    "embedder_path",
    "iter_corpus",
    "load_embedder",
]
