"""Precomputed chunk embeddings [P, section 2: "chunk embeddings can be precomputed and cached"].

Each passage is tokenized on its own with the decoder's tokenizer, cut into k-token chunks, encoded and
projected once; a query then pays only the decoder prefill. Entries are keyed by passage id and the chunk's
character span inside the passage, so a chunk of a prompt finds its entry whenever the prompt tokenized the
passage the same way (a chunk that tokenized differently at a passage edge is encoded on the fly).

On disk (``refrag-chunks.safetensors``, beside a FAISS index's files): per passage ``<id>.spans`` (n, 2) int64
and ``<id>.embeds`` (n, decoder width) float32; the metadata holds the adapter fingerprint and chunk size,
checked on use so a cache never serves embeddings of other weights.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...errors import IndexLoadError
from ...types import Passage
from .layout import chunk_offsets
from .model import DEFAULT_ADAPTER, Adapter, load_adapter

CACHE_FILE = "refrag-chunks.safetensors"
FORMAT = "ctxopt-refrag-chunks"


class ChunkCache:
    """Chunk embeddings per passage id, for one adapter (``fingerprint``) and chunk size."""

    def __init__(self, fingerprint: str, chunk_tokens: int):
        self.fingerprint = fingerprint
        self.chunk_tokens = chunk_tokens
        self.entries: dict[str, dict[tuple[int, int], torch.Tensor]] = {}

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.entries.values())

    @classmethod
    def build(
        cls, passages: Iterable[Passage], adapter: Adapter, tokenizer, chunk_tokens: int | None = None,
        progress: bool = False,
    ) -> "ChunkCache":
        """Encode and project every chunk of every passage once."""
        chunk_tokens = chunk_tokens or adapter.config.chunk_tokens
        cache = cls(adapter.fingerprint(), chunk_tokens)
        with torch.inference_mode():
            for passage in tqdm(list(passages), desc="refrag chunk embeddings", unit="passage", disable=not progress):
                encoded = tokenizer(passage.text, add_special_tokens=False, return_offsets_mapping=True)
                offsets = encoded["offset_mapping"]
                spans = [(lo, hi) for _, _, lo, hi in chunk_offsets(offsets, chunk_tokens)]
                embeds = adapter.embed_chunks([passage.text[lo:hi] for lo, hi in spans]).float().cpu()
                cache.entries[passage.id] = dict(zip(spans, embeds))
        return cache

    def lookup(self, passage_id: str, span: tuple[int, int]) -> torch.Tensor | None:
        return self.entries.get(passage_id, {}).get(tuple(span))

    def check(self, adapter: Adapter, chunk_tokens: int) -> None:
        """Refuse a cache made with other weights or another chunk size."""
        if self.fingerprint != adapter.fingerprint() or self.chunk_tokens != chunk_tokens:
            raise IndexLoadError(
                f"the REFRAG chunk cache was built for adapter {self.fingerprint} at k={self.chunk_tokens}, not "
                f"{adapter.fingerprint()} at k={chunk_tokens}; rebuild it (ctxopt index ... --refrag)."
            )

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (a folder gets ``refrag-chunks.safetensors`` inside it)."""
        from safetensors.torch import save_file

        path = Path(path)
        path = path / CACHE_FILE if path.is_dir() else path
        tensors = {}
        for passage_id, rows in self.entries.items():
            tensors[f"{passage_id}.spans"] = torch.tensor(list(rows.keys()), dtype=torch.long).reshape(-1, 2)
            tensors[f"{passage_id}.embeds"] = torch.stack(list(rows.values())) if rows else torch.zeros(0, 1)
        metadata = {"format": FORMAT, "fingerprint": self.fingerprint, "chunk_tokens": str(self.chunk_tokens),
                    "passages": json.dumps(sorted(self.entries))}
        save_file(tensors, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ChunkCache":
        """Read a file written by :meth:`save` (or the one inside an index folder)."""
        from safetensors import safe_open

        path = Path(path)
        path = path / CACHE_FILE if path.is_dir() else path
        if not path.is_file():
            raise IndexLoadError(f"no REFRAG chunk cache at {path}; build one with `ctxopt index ... --refrag`.")
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise IndexLoadError(f"{path} is not a REFRAG chunk cache.")
            cache = cls(metadata["fingerprint"], int(metadata["chunk_tokens"]))
            for passage_id in json.loads(metadata["passages"]):
                spans = handle.get_tensor(f"{passage_id}.spans").tolist()
                embeds = handle.get_tensor(f"{passage_id}.embeds")
                cache.entries[passage_id] = {tuple(s): e for s, e in zip(spans, embeds)}
        return cache


def decoder_tokenizer(name: str):
    """The tokenizer of the decoder an adapter was trained for (a registry name or a folder), without the model."""
    from transformers import AutoTokenizer

    from ...models import REGISTRY, registry_path

    return AutoTokenizer.from_pretrained(str(registry_path(name)) if name in REGISTRY else name)


def save_index_cache(
    passages: Iterable[Passage], index_folder: str | Path, adapter_folder: str | Path | None = None,
) -> Path:
    """``ctxopt index --refrag``: precompute every passage's chunk embeddings into the index folder."""
    adapter = load_adapter(adapter_folder or DEFAULT_ADAPTER)
    tokenizer = decoder_tokenizer(adapter.config.decoder)
    return ChunkCache.build(passages, adapter, tokenizer, progress=True).save(Path(index_folder) / CACHE_FILE)
