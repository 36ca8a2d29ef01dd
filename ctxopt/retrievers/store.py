"""A FAISS vector store of passages, persisted as plain files (no pickle).

Layout of a saved index folder:

- ``index.faiss``: the FAISS index (``faiss.write_index``);
- ``docstore.json``: the passages (text, source, span, metadata, id), in index order;
- ``manifest.json``: format version, embedder name and width, passage count, index type, chunking
  parameters, and the sha256 of the two files above, checked on load.

Saving is atomic: everything is written into a temporary folder next to the target, which is then swapped
in. An interrupted save leaves the previous index in place (or, if it stopped between the two renames of
the swap, in a backup folder that :meth:`FaissStore.load` restores).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import faiss
from tqdm.auto import tqdm

from .. import __version__
from ..checks import require_int
from ..errors import CorpusError, IndexLoadError, InputError
from ..fileutil import sha256_file
from ..types import Passage
from .chunking import chunk_corpus
from .embeddings import DEFAULT_EMBEDDER, Embedder, load_embedder

FORMAT = "ctxopt-faiss"
FORMAT_VERSION = 1
INDEX_FILE, DOCSTORE_FILE, MANIFEST_FILE = "index.faiss", "docstore.json", "manifest.json"
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64


class FaissStore:
    """Passages and their embeddings in a FAISS inner-product index (cosine similarity on unit vectors).

    Up to ``hnsw_threshold`` passages the index is exact (``IndexFlatIP``); past it the store switches to
    an approximate ``IndexHNSWFlat`` graph, which stays fast on large corpora.
    """

    def __init__(self, embedder: Embedder, hnsw_threshold: int = 50_000) -> None:
        self.embedder = embedder
        self.hnsw_threshold = hnsw_threshold
        self.passages: list[Passage] = []
        self.index: faiss.Index | None = None
        self.chunking: dict[str, Any] | None = None
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def index_type(self) -> str:
        """``"flat"`` (exact) or ``"hnsw"`` (approximate); ``"flat"`` while empty."""
        return "hnsw" if isinstance(self.index, faiss.IndexHNSW) else "flat"

    @classmethod
    def build(
        cls,
        passages: Iterable[Passage],
        embedder: Embedder,
        progress: bool = True,
        hnsw_threshold: int = 50_000,
    ) -> "FaissStore":
        """Embed and index ``passages`` (any iterable, consumed in groups so a generator streams)."""
        store = cls(embedder, hnsw_threshold=hnsw_threshold)
        total = len(passages) if hasattr(passages, "__len__") else None
        group = max(1, embedder.batch_size * 16)
        iterator = iter(passages)
        with tqdm(total=total, desc="embedding passages", unit="passage", disable=not progress) as bar:
            while batch := list(islice(iterator, group)):
                store.add(batch)
                bar.update(len(batch))
        return store

    def add(self, passages: Iterable[Passage], progress: bool = False) -> None:
        """Embed ``passages`` and append them; switch to HNSW once the count passes the threshold."""
        passages = list(passages)
        if not passages:
            return
        vectors = self.embedder.embed([p.text for p in passages], progress=progress)
        with self._lock:
            count = len(self.passages) + len(passages)
            if self.index is None:
                self.index = self._new_index(hnsw=count > self.hnsw_threshold)
            elif count > self.hnsw_threshold and self.index_type == "flat":
                self.index = self._to_hnsw(self.index)
            self.index.add(vectors)
            self.passages.extend(passages)

    def search(self, query: str, k: int = 4) -> list[Passage]:
        """The ``k`` passages most similar to ``query``, best first, as copies with ``score`` set."""
        k = require_int(k, "k", minimum=1)
        vector = self.embedder.embed([query])
        with self._lock:
            if self.index is None or not self.passages:
                return []
            if isinstance(self.index, faiss.IndexHNSW):
                self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
            scores, ids = self.index.search(vector, min(k, len(self.passages)))
            return [self.passages[i].replace(score=float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def retrieve(self, question: str, k: int = 4) -> list[Passage]:
        """Check the question and ``k``, then :meth:`search`."""
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"the question is empty ({question!r}); pass the text to retrieve passages for")
        return self.search(question, k)

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the index, docstore and manifest to a temporary sibling folder, then swap it in.

        Refuses to replace an existing folder that is not a ctxopt index (it would be deleted).
        """
        target = Path(folder)
        _restore_backup(target)
        foreign = target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_FILE).exists()
        if foreign or (target.exists() and not target.is_dir()):
            raise InputError(
                f"{target} exists and is not a ctxopt index folder (no {MANIFEST_FILE}); "
                "choose a new or empty folder, saving replaces the folder's contents"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            with self._lock:
                self._write(staging)
            _swap_in(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _write(self, staging: Path) -> None:
        """Write index.faiss, docstore.json, then manifest.json (with both checksums) into ``staging``."""
        index = self.index if self.index is not None else self._new_index(hnsw=False)
        faiss.write_index(index, str(staging / INDEX_FILE))
        records = [_passage_record(p) for p in self.passages]
        _write_json(staging / DOCSTORE_FILE, {"passages": records})
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ctxopt_version": __version__,
            "embedder": self.embedder.name,
            "dim": self.embedder.dim,
            "count": len(self.passages),
            "index_type": self.index_type,
            "hnsw_threshold": self.hnsw_threshold,
            "chunking": self.chunking,
            "files": {name: {"sha256": sha256_file(staging / name)} for name in (INDEX_FILE, DOCSTORE_FILE)},
        }
        _write_json(staging / MANIFEST_FILE, manifest)
        _fsync_dir(staging)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], embedder: Embedder | None = None) -> "FaissStore":
        """Read a saved index: check the manifest and checksums, read the files, match the embedder.

        ``embedder`` defaults to the one named in the manifest. Any missing, corrupt or inconsistent file
        raises :class:`IndexLoadError` naming it.
        """
        root = Path(folder)
        _restore_backup(root)
        if not root.is_dir():
            raise IndexLoadError(
                f"no index folder at {root}; build one with ctxopt.retrievers.build_index(corpus, {str(root)!r})"
            )
        manifest = _read_manifest(root)
        for name, entry in manifest["files"].items():
            path = root / name
            if not path.is_file():
                raise IndexLoadError(f"{path} is missing; the index folder is incomplete, rebuild it with build_index")
            if sha256_file(path) != entry.get("sha256"):
                raise IndexLoadError(
                    f"{path} does not match the checksum in {MANIFEST_FILE} (corrupt or modified); rebuild the index"
                )
        try:
            index = faiss.read_index(str(root / INDEX_FILE))
        except RuntimeError as exc:
            raise IndexLoadError(
                f"{root / INDEX_FILE} is not a readable FAISS index: {exc}; rebuild the index"
            ) from exc
        passages = _read_docstore(root / DOCSTORE_FILE)
        if not (index.ntotal == len(passages) == manifest["count"]) or index.d != manifest["dim"]:
            raise IndexLoadError(
                f"{root} is inconsistent: {MANIFEST_FILE} says {manifest['count']} passages of dim {manifest['dim']}, "
                f"{INDEX_FILE} holds {index.ntotal} of dim {index.d}, {DOCSTORE_FILE} holds {len(passages)}; rebuild it"
            )
        if embedder is None:
            embedder = load_embedder(manifest["embedder"])
        elif embedder.dim != manifest["dim"]:
            raise IndexLoadError(
                f"{root} was built with embedder {manifest['embedder']!r} ({manifest['dim']}-d) but the given embedder "
                f"{embedder.name!r} is {embedder.dim}-d; pass embedder=None to load {manifest['embedder']!r}"
            )
        elif embedder.name != manifest["embedder"]:
            warnings.warn(
                f"{root} was built with embedder {manifest['embedder']!r}, loading it with {embedder.name!r}; "
                "if they are different models, search results will be meaningless",
                stacklevel=2,
            )
        store = cls(embedder, hnsw_threshold=manifest.get("hnsw_threshold", 50_000))
        store.index = index if index.ntotal else None
        store.passages = passages
        store.chunking = manifest.get("chunking")
        return store

    def _new_index(self, hnsw: bool) -> faiss.Index:
        """An empty exact inner-product index, or an HNSW graph with the inner-product metric."""
        dim = self.embedder.dim
        if not hnsw:
            return faiss.IndexFlatIP(dim)
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index

    def _to_hnsw(self, flat: faiss.Index) -> faiss.Index:
        """The vectors of an exact index, moved into a new HNSW index."""
        index = self._new_index(hnsw=True)
        index.add(flat.reconstruct_n(0, flat.ntotal))
        return index


def build_index(
    corpus_folder: str | os.PathLike[str],
    out_folder: str | os.PathLike[str] | None = None,
    embedder: Embedder | str | None = None,
    chunk_tokens: int = 200,
    overlap: int = 40,
    progress: bool = True,
) -> FaissStore:
    """Chunk a corpus folder with the embedder's tokenizer, embed and index it, and save it if asked.

    Chunks must fit the embedder: ``chunk_tokens`` above its limit (max tokens less the special tokens it
    adds) is lowered to that limit with a warning.
    """
    if embedder is None or isinstance(embedder, str):
        embedder = load_embedder(embedder or DEFAULT_EMBEDDER)
    limit = embedder.max_tokens - embedder.tokenizer.num_special_tokens_to_add(pair=False)
    if 0 < limit < chunk_tokens:
        warnings.warn(
            f"chunk_tokens={chunk_tokens} exceeds what {embedder.name!r} can embed ({limit} tokens); using {limit}",
            stacklevel=2,
        )
        if overlap >= limit:
            raise InputError(
                f"overlap={overlap} must be smaller than chunk_tokens, which was lowered to {limit} to fit "
                f"{embedder.name!r}; pass a smaller overlap (e.g. {limit // 5})"
            )
        chunk_tokens = limit
    passages = chunk_corpus(corpus_folder, embedder.tokenizer, chunk_tokens, overlap)
    store = FaissStore.build(passages, embedder, progress=progress)
    if not len(store):
        raise CorpusError(f"the corpus {corpus_folder} produced no passages (its files hold no tokenizable text)")
    store.chunking = {"chunk_tokens": chunk_tokens, "overlap": overlap, "tokenizer": embedder.name}
    if out_folder is not None:
        store.save(out_folder)
    return store


def _passage_record(passage: Passage) -> dict[str, Any]:
    """A passage as JSON-ready data; metadata must be JSON-serialisable."""
    record = {
        "id": passage.id,
        "text": passage.text,
        "source": passage.source,
        "span": list(passage.span) if passage.span is not None else None,
        "metadata": passage.metadata,
    }
    try:
        json.dumps(passage.metadata)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"metadata of passage {passage.id} from {passage.source!r} is not JSON-serialisable ({exc}); "
            "use strings, numbers, lists and dicts"
        ) from exc
    return record


def _write_json(path: Path, data: Any) -> None:
    """Write JSON as UTF-8 and flush it to disk."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk where the platform allows it."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _backup_path(target: Path) -> Path:
    """Where the previous index waits during a swap."""
    return target.parent / f".{target.name}.old"


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging``: move the old folder away, move the new one in, delete the old one."""
    backup = _backup_path(target)
    if target.exists():
        if backup.exists():
            shutil.rmtree(backup)
        os.rename(target, backup)
    try:
        os.rename(staging, target)
    except OSError:
        if backup.exists():
            os.rename(backup, target)
        raise
    _fsync_dir(target.parent)
    if backup.exists():
        shutil.rmtree(backup, ignore_errors=True)


def _restore_backup(target: Path) -> None:
    """Put back the previous index if a save stopped after moving it away and before moving the new one in."""
    backup = _backup_path(target)
    if not target.exists() and (backup / MANIFEST_FILE).is_file():
        os.rename(backup, target)
        warnings.warn(f"restored the index at {target} from {backup}, left there by an interrupted save", stacklevel=3)


def _read_manifest(root: Path) -> dict[str, Any]:
    """Read and check manifest.json: format, version and the fields load needs."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise IndexLoadError(f"{path} is missing; {root} is not a ctxopt index folder (build one with build_index)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexLoadError(f"{path} is not valid JSON ({exc}); the index is corrupt, rebuild it") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexLoadError(f"{path} is not a ctxopt index manifest (format is not {FORMAT!r}); rebuild the index")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexLoadError(
            f"{path} has format version {manifest.get('format_version')!r}, this ctxopt reads version "
            f"{FORMAT_VERSION}; rebuild the index with this version"
        )
    missing = [key for key in ("embedder", "dim", "count", "files") if key not in manifest]
    files = manifest.get("files")
    if missing or not isinstance(files, dict) or set(files) != {INDEX_FILE, DOCSTORE_FILE}:
        raise IndexLoadError(
            f"{path} is incomplete (missing {', '.join(missing) or 'file checksums'}); the index is corrupt, rebuild it"
        )
    return manifest


def _read_docstore(path: Path) -> list[Passage]:
    """Read docstore.json back into passages, in index order."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["passages"]
        return [
            Passage(
                text=r["text"],
                source=r["source"],
                span=tuple(r["span"]) if r["span"] is not None else None,
                metadata=r["metadata"],
                id=r["id"],
            )
            for r in records
        ]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise IndexLoadError(f"{path} is not a valid docstore ({exc!r}); the index is corrupt, rebuild it") from exc
