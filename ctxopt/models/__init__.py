"""Load generator and draft models offline (registry short names, local folders, GGUF files, hub ids).

Everything still lives in ``registry``; this package re-exports what the rest of ctxopt imports.
"""
from .registry import (  # noqa: F401 (re-exports)
    _CPU_DEFAULT_DTYPE,
    DEFAULT_GENERATOR,
    GGUF_MAGIC,
    MARKER,
    REGISTRY,
    LoadedModel,
    RegistryEntry,
    _assemble,
    _gguf_string,
    _verify_gguf,
    cache_dir,
    load_model,
    pip_download,
    registry_entry,
    registry_path,
    resolve_device_dtype,
)
