"""REFRAG (arXiv 2509.01092): compress context chunks to single decoder input embeddings. See ``stage``."""
from .cache import CACHE_FILE, ChunkCache
from .model import (
    DEFAULT_ADAPTER,
    Adapter,
    AdapterConfig,
    ChunkEncoder,
    ExpansionPolicy,
    Projector,
    load_adapter,
    load_encoder,
)
from .stage import REFRAG

__all__ = [
    "CACHE_FILE", "DEFAULT_ADAPTER", "REFRAG", "Adapter", "AdapterConfig", "ChunkCache", "ChunkEncoder",
    "ExpansionPolicy", "Projector", "load_adapter", "load_encoder",
]
