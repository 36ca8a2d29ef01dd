"""REFRAG (arXiv 2509.01092): compress context chunks to single decoder input embeddings. See ``stage``."""
from .cache import CACHE_FILE, ChunkCache
from .model import Adapter, AdapterConfig, ChunkEncoder, ExpansionPolicy, Projector, load_encoder
from .stage import DEFAULT_ADAPTER, REFRAG, load_adapter, refrag_stages

__all__ = [
    "CACHE_FILE", "DEFAULT_ADAPTER", "REFRAG", "Adapter", "AdapterConfig", "ChunkCache", "ChunkEncoder",
    "ExpansionPolicy", "Projector", "load_adapter", "load_encoder", "refrag_stages",
]
