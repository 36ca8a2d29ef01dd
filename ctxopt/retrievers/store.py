"""A FAISS vector store of passages, persisted as plain files (no pickle).

Layout of a saved index folder:

- ``index.faiss``: the FAISS index (``faiss.write_index``);
- ``docstore.json``: the passages (text, source, span, metadata, id), in index order;
- ``manifest.json``: format version, embedder name and width, passage count, index type, chunking
  parameters, and the sha256 of every other file, checked on load;
- optionally ``compressed.json``: each passage's pre-compressed text (``ctxopt index --compress``), served by
  :meth:`FaissStore.search` in place of the original, which the docstore keeps; and other files the build
  attached (``refrag-chunks.safetensors``: REFRAG chunk embeddings), listed and checksummed in the manifest.

Past ``approximate.DEFAULT_THRESHOLD`` passages an index built from all its vectors at once
(:meth:`FaissStore.from_vectors`, what ``ctxopt index`` does) is an IVF index whose recall against exact search
was measured at build time (``manifest["approximate"]``); an index grown passage group by passage group
(:meth:`FaissStore.add`) switches to HNSW past ``hnsw_threshold``.

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
import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..checks import require_int
from ..errors import CorpusError, IndexLoadError, InputError
from ..fileutil import sha256_file
from ..types import Passage
from .approximate import DEFAULT_THRESHOLD, TARGET_RECALL, build_ivf, tune_nprobe
from .chunking import chunk_corpus
from .embeddings import DEFAULT_EMBEDDER, Embedder, load_embedder

FORMAT = "ctxopt-faiss"
FORMAT_VERSION = 2  # 2: optional compressed.json, attached files, IVF indexes; version 1 folders still load
READABLE_VERSIONS = (1, 2)
INDEX_FILE, DOCSTORE_FILE, MANIFEST_FILE = "index.faiss", "docstore.json", "manifest.json"
COMPRESSED_FILE = "compressed.json"
# Metadata key of a passage served pre-compressed: {"method": "color" | "extractive", "fingerprint": ...}. A
# passage stage that would compress it again can see that it already was.
PRECOMPRESSED = "ctxopt_precompressed"
# Manifest keys a build may add (FaissStore.info), kept through load and save.
INFO_KEYS = ("artefacts", "approximate", "build")
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64


class FaissStore:
    """Passages and their embeddings in a FAISS inner-product index (cosine similarity on unit vectors).

    Up to ``hnsw_threshold`` passages the index is exact (``IndexFlatIP``); past it the store switches to
    an approximate ``IndexHNSWFlat`` graph, which stays fast on large corpora. :meth:`from_vectors` builds an
    IVF index instead past its threshold, with a measured recall.

    ``compressed`` maps passage ids to pre-compressed texts (``compression`` says how they were made); while
    ``serve_compressed`` is true, :meth:`search` returns those texts, marked in the metadata under
    :data:`PRECOMPRESSED`. ``attachments`` are further files written into the folder on save (name -> a function
    writing that file at the path it is given); ``info`` holds manifest fields a build records.
    """

    def __init__(self, embedder: Embedder, hnsw_threshold: int = 50_000) -> None:
        self.embedder = embedder
        self.hnsw_threshold = hnsw_threshold
        self.passages: list[Passage] = []
        self.index: faiss.Index | None = None
        self.chunking: dict[str, Any] | None = None
        self.compressed: dict[str, str] = {}
        self.compression: dict[str, Any] | None = None
        self.serve_compressed = True
        self.attachments: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.folder: Path | None = None
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def index_type(self) -> str:
        """``"flat"`` (exact), ``"hnsw"`` or ``"ivf"`` (approximate); ``"flat"`` while empty."""
        if isinstance(self.index, faiss.IndexHNSW):
            return "hnsw"
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    @classmethod
    def from_vectors(
        cls,
        passages: list[Passage],
        vectors: np.ndarray,
        embedder: Embedder,
        approx_threshold: int = DEFAULT_THRESHOLD,
        target_recall: float = TARGET_RECALL,
    ) -> "FaissStore":
        """A store of ``passages`` with their precomputed unit ``vectors`` (row i embeds passage i).

        Up to ``approx_threshold`` passages the index is exact; past it, an IVF index trained on a sample, its
        ``nprobe`` tuned until the recall@10 measured against exact search reaches ``target_recall``; the
        measurement is kept in ``info["approximate"]`` (and the manifest). Where only a scan of every cell reaches
        the target (vectors without neighbourhood structure), the index stays exact (``kept_exact``).
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(passages), embedder.dim):
            raise InputError(
                f"{len(passages)} passages need {len(passages)} vectors of width {embedder.dim}; got {vectors.shape}"
            )
        store = cls(embedder, hnsw_threshold=approx_threshold)
        store.passages = list(passages)
        if len(passages) > approx_threshold:
            index = build_ivf(vectors)
            report = tune_nprobe(index, vectors, target=target_recall)
            if report["nprobe"] < report["nlist"]:
                store.index = index
            else:  # the target needs every cell scanned: exact search costs no more and is exact
                report["kept_exact"] = True
            store.info["approximate"] = report
        if store.index is None and len(passages):
            store.index = store._new_index(hnsw=False)
            store.index.add(vectors)
        return store

    def vectors(self) -> np.ndarray:
        """The indexed vectors, row i for passage i, exactly as stored (flat, HNSW and IVF-Flat keep them whole)."""
        with self._lock:
            if self.index is None or not self.index.ntotal:
                return np.zeros((0, self.embedder.dim), dtype=np.float32)
            if isinstance(self.index, faiss.IndexIVF):
                self.index.make_direct_map()
            return self.index.reconstruct_n(0, self.index.ntotal)

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
            elif isinstance(self.index, faiss.IndexIVF):
                self.index.nprobe = int(self.info.get("approximate", {}).get("nprobe", self.index.nprobe))
            scores, ids = self.index.search(vector, min(k, len(self.passages)))
            return [self._served(self.passages[i]).replace(score=float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def _served(self, passage: Passage) -> Passage:
        """``passage`` as search returns it: its pre-compressed text, marked, when the store serves those."""
        text = self.compressed.get(passage.id) if self.serve_compressed else None
        if text is None:
            return passage
        return passage.replace(text=text, metadata={**passage.metadata, PRECOMPRESSED: dict(self.compression or {})})

    def retrieve(self, question: str, k: int = 4) -> list[Passage]:
        """Check the question and ``k``, then :meth:`search`."""
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"the question is empty ({question!r}); pass the text to retrieve passages for")
        return self.search(question, k)

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the index, docstore and manifest to a temporary sibling folder, then swap it in.

        Refuses to replace an existing folder that is not a ctxopt index (it would be deleted).
        """
        target = check_target(folder)
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
        """Write index.faiss, docstore.json, compressed.json and the attachments, then manifest.json (with every
        file's checksum) into ``staging``."""
        index = self.index if self.index is not None else self._new_index(hnsw=False)
        faiss.write_index(index, str(staging / INDEX_FILE))
        records = [_passage_record(p) for p in self.passages]
        _write_json(staging / DOCSTORE_FILE, {"passages": records})
        names = [INDEX_FILE, DOCSTORE_FILE]
        if self.compressed:
            known = {p.id for p in self.passages}
            texts = {key: text for key, text in self.compressed.items() if key in known}
            _write_json(staging / COMPRESSED_FILE, {"compression": self.compression, "texts": texts})
            names.append(COMPRESSED_FILE)
        for name, write in sorted(self.attachments.items()):
            _check_file_name(name)
            write(staging / name)
            names.append(name)
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
            **{key: self.info[key] for key in INFO_KEYS if key in self.info},
            "files": {name: {"sha256": sha256_file(staging / name)} for name in names},
        }
        _write_json(staging / MANIFEST_FILE, manifest)
        _fsync_dir(staging)

    @classmethod
    def load(
        cls, folder: str | os.PathLike[str], embedder: Embedder | None = None, serve_compressed: bool = True
    ) -> "FaissStore":
        """Read a saved index: check the manifest and checksums, read the files, match the embedder.

        ``embedder`` defaults to the one named in the manifest. Any missing, corrupt or inconsistent file
        raises :class:`IndexLoadError` naming it. An index built with pre-compressed passages serves them unless
        ``serve_compressed`` is false; files other than the core ones are kept as attachments (copied on save).
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
        store.info = {key: manifest[key] for key in INFO_KEYS if key in manifest}
        store.folder = root
        store.serve_compressed = serve_compressed
        if COMPRESSED_FILE in manifest["files"]:
            store.compression, store.compressed = _read_compressed(root / COMPRESSED_FILE)
        for name in manifest["files"]:
            if name not in (INDEX_FILE, DOCSTORE_FILE, COMPRESSED_FILE):
                store.attachments[name] = _copier(root / name)
        return store

    def attachment(self, name: str) -> Path | None:
        """The path of an attached file (``refrag-chunks.safetensors``) in the folder this store was loaded from."""
        if self.folder is None or name not in self.attachments:
            return None
        return self.folder / name

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
    chunk_tokens = fit_chunk_tokens(embedder, chunk_tokens, overlap)
    passages = chunk_corpus(corpus_folder, embedder.tokenizer, chunk_tokens, overlap)
    store = FaissStore.build(passages, embedder, progress=progress)
    if not len(store):
        raise CorpusError(f"the corpus {corpus_folder} produced no passages (its files hold no tokenizable text)")
    store.chunking = {"chunk_tokens": chunk_tokens, "overlap": overlap, "tokenizer": embedder.name}
    if out_folder is not None:
        store.save(out_folder)
    return store


def check_target(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path, after checking that saving an index there replaces nothing but an index.

    Also puts back an index left in its backup folder by an interrupted save.
    """
    target = Path(folder)
    _restore_backup(target)
    foreign = target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_FILE).exists()
    if foreign or (target.exists() and not target.is_dir()):
        raise InputError(
            f"{target} exists and is not a ctxopt index folder (no {MANIFEST_FILE}); "
            "choose a new or empty folder, saving replaces the folder's contents"
        )
    return target


def fit_chunk_tokens(embedder: Embedder, chunk_tokens: int, overlap: int) -> int:
    """``chunk_tokens``, lowered (with a warning) to what the embedder can embed: its max tokens less the special
    tokens it adds. Raises when ``overlap`` no longer fits under the lowered size."""
    limit = embedder.max_tokens - embedder.tokenizer.num_special_tokens_to_add(pair=False)
    if 0 < limit < chunk_tokens:
        warnings.warn(
            f"chunk_tokens={chunk_tokens} exceeds what {embedder.name!r} can embed ({limit} tokens); using {limit}",
            stacklevel=3,
        )
        if overlap >= limit:
            raise InputError(
                f"overlap={overlap} must be smaller than chunk_tokens, which was lowered to {limit} to fit "
                f"{embedder.name!r}; pass a smaller overlap (e.g. {limit // 5})"
            )
        chunk_tokens = limit
    return chunk_tokens


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
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise IndexLoadError(
            f"{path} has format version {manifest.get('format_version')!r}, this ctxopt reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild the index with this version"
        )
    missing = [key for key in ("embedder", "dim", "count", "files") if key not in manifest]
    files = manifest.get("files")
    if missing or not isinstance(files, dict) or not {INDEX_FILE, DOCSTORE_FILE} <= set(files):
        raise IndexLoadError(
            f"{path} is incomplete (missing {', '.join(missing) or 'file checksums'}); the index is corrupt, rebuild it"
        )
    for name in files:
        if not isinstance(name, str) or not _plain_name(name) or not isinstance(files[name], dict):
            raise IndexLoadError(f"{path} lists a file {name!r} that is not a plain file name; the index is corrupt")
    return manifest


def _plain_name(name: str) -> bool:
    """A file name without folders or a leading dot, so a manifest can only name files inside its own folder."""
    return bool(name) and name not in (MANIFEST_FILE,) and "/" not in name and "\\" not in name and name[0] != "."


def _check_file_name(name: str) -> None:
    """Refuse an attachment name that is not a plain file name or that clashes with the store's own files."""
    if not _plain_name(name) or name in (INDEX_FILE, DOCSTORE_FILE, COMPRESSED_FILE):
        raise InputError(f"cannot attach a file named {name!r} to an index; use a plain, unused file name")


def _copier(source: Path):
    """An attachment writer that copies ``source`` (a file of the folder a store was loaded from)."""

    def copy(path: Path) -> None:
        shutil.copyfile(source, path)

    return copy


def _read_compressed(path: Path) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Read compressed.json: how the passages were compressed, and their texts by passage id."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        texts = data["texts"]
        if not isinstance(texts, dict) or not all(isinstance(t, str) for t in texts.values()):
            raise TypeError("texts is not a mapping of ids to strings")
        return data.get("compression"), texts
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise IndexLoadError(f"{path} is not a valid compressed-passage file ({exc!r}); rebuild the index") from exc


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
