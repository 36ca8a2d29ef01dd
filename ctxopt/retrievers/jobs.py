"""Corpus-scale index builds: sharded, resumable and incremental, in this process or on a Ray cluster.

A build computes, for every passage of a corpus, its embedding and, when asked, its pre-compressed text
(``Compression``: CoLoR, or query-free extractive) and its REFRAG chunk embeddings (over the text the index
will serve). Steps:

1. The driver chunks the corpus (in corpus order, as :func:`~ctxopt.retrievers.store.build_index` does) and
   cuts the passages still to compute into shards of ``shard_size``.
2. An executor runs each shard through a :class:`ShardWorker`, which loads its models once:
   :class:`LocalExecutor` in this process, or ``ray_jobs.RayExecutor`` on a pool of Ray actors.
3. The driver writes each finished shard atomically into ``INDEX.parts/`` beside the index (``Parts``); a
   shard counts as done only once its record file is in place.
4. When every passage has its results, the driver assembles the index from the parts (and, with ``add``, from
   the existing index) in corpus order, saves it atomically with a checksummed manifest, and deletes the parts.

A passage is known by its id (a hash of source, span and text). So a rerun after an interruption skips the
passages the parts hold (resume), and ``add=True`` computes only the passages whose id is not in the existing
index (new or changed documents); passages of deleted documents are no longer in the corpus and are dropped.
Parts made by other models or settings (``ShardWorker.fingerprint``) are discarded with a warning.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..checks import parse_budget, require_int
from ..errors import CorpusError, IndexLoadError, InputError
from ..fileutil import sha256_file
from ..types import Passage
from .approximate import DEFAULT_THRESHOLD, TARGET_RECALL
from .chunking import chunk_corpus
from .embeddings import DEFAULT_EMBEDDER, load_embedder
from .store import FaissStore, check_target, fit_chunk_tokens

PARTS_SUFFIX = ".parts"
JOB_FILE = "job.json"
LOCK_FILE = "lock"
DEFAULT_SHARD_SIZE = 128
COMPRESSION_METHODS = ("color", "extractive")
# CoLoR knobs an index build may set
COLOR_OPTIONS = ("max_new_tokens", "passage_tokens", "adapter", "batch_size", "compressor_engine",
                 "compressor_engine_model")
REFRAG_FILE = "refrag-chunks.safetensors"  # the name ChunkCache gives it inside an index folder

Shard = list[tuple[str, str]]  # (passage id, text)


@dataclass(frozen=True)
class Compression:
    """How passages are pre-compressed at index time.

    ``color``: each passage rewritten by the CoLoR compressor (``compressor``, default CoLoR's; ``options`` are
    CoLoR knobs: max_new_tokens, passage_tokens, adapter, batch_size, compressor_engine,
    compressor_engine_model); a summary that is empty or not shorter keeps the original.
    ``extractive``: query-free extractive compression, the Extractive stage's rule with the passage itself as
    the query: its sentences most similar to the whole passage are kept, in order, within ``budget`` (a ratio
    of its tokens, or a token count, in the embedder's tokenizer).
    """

    method: str
    compressor: str | None = None
    budget: int | float = 0.5
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str, options: dict[str, Any] | None = None) -> "Compression":
        """``color``, ``color:COMPRESSOR``, ``extractive`` or ``extractive:RATIO`` (or a token count)."""
        method, _, argument = spec.partition(":")
        method = method.strip().lower()
        options = dict(options or {})
        if method == "color":
            unknown = sorted(set(options) - set(COLOR_OPTIONS))
            if unknown:
                raise InputError(f"--compress color takes options {', '.join(COLOR_OPTIONS)}; got {', '.join(unknown)}")
            return cls("color", compressor=argument.strip() or None, options=tuple(sorted(options.items())))
        if method == "extractive":
            if options:
                raise InputError("--compress extractive takes no options; give the ratio as extractive:RATIO")
            try:
                budget = parse_budget(argument.strip()) if argument.strip() else 0.5
            except InputError:
                budget = None
            if budget is None or not (0 < budget <= 1 if isinstance(budget, float) else budget >= 1):
                raise InputError(f"extractive:RATIO needs a ratio in (0, 1] or a token count; got {argument!r}")
            return cls("extractive", budget=budget)
        raise InputError(f"--compress takes color[:COMPRESSOR] or extractive[:RATIO]; got {spec!r}")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker computes: embeddings with ``embedder``; with ``compression``, pre-compressed texts; with
    ``refrag`` (an adapter folder, or "default" for the shipped one), REFRAG chunk embeddings of the served text."""

    embedder: str = DEFAULT_EMBEDDER
    compression: Compression | None = None
    refrag: str | None = None
    device: str | None = None


@dataclass
class ShardResult:
    """A shard's artefacts, row i for passage ``ids[i]``: unit vectors (n, dim) float32; the served texts (when
    compressing); per passage, REFRAG chunk spans (m, 2) int64 and embeddings (m, width) float32; seconds per step.
    """

    ids: list[str]
    vectors: np.ndarray
    served: list[str] | None = None
    refrag: list[tuple[np.ndarray, np.ndarray]] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class ShardWorker:
    """Loads a spec's models once, then computes every artefact of one shard of passages at a time.

    The same class runs in the driver process (:class:`LocalExecutor`) and as a Ray actor, so both builds run
    the same code on the same shards.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.embedder = load_embedder(spec.embedder, spec.device)
        self._color = self._compressor_name = self._adapter = self._decoder_tokenizer = None
        compression = spec.compression
        if compression is not None and compression.method == "color":
            from ..compressors.color import DEFAULT_COMPRESSOR, CoLoR

            knobs = dict(compression.options)
            self._color = CoLoR(compressor=compression.compressor or DEFAULT_COMPRESSOR, fallback="original",
                                cache=False, progress=False, **knobs)
            self._compressor_name = self._color.compressor_identity(spec.device)  # loads a local compressor now
        if spec.refrag:
            from ..compressors.refrag.cache import decoder_tokenizer
            from ..compressors.refrag.model import DEFAULT_ADAPTER, load_adapter

            self._adapter = load_adapter(DEFAULT_ADAPTER if spec.refrag == "default" else spec.refrag)
            self._decoder_tokenizer = decoder_tokenizer(self._adapter.config.decoder)

    def fingerprint(self) -> dict[str, Any]:
        """What every result depends on; parts and indexes made under another fingerprint are not reused."""
        found: dict[str, Any] = {"embedder": {"name": self.embedder.name, "dim": self.embedder.dim}}
        compression = self.spec.compression
        found["compression"] = None
        if compression is not None and compression.method == "color":
            found["compression"] = {
                "method": "color", "compressor": self._compressor_name,
                "fingerprint": self._color.fingerprint(self._compressor_name),
            }
        elif compression is not None:
            key = json.dumps(["extractive", "query-free", compression.budget, self.embedder.name])
            found["compression"] = {
                "method": "extractive", "budget": compression.budget, "query": "the passage itself",
                "fingerprint": hashlib.sha256(key.encode()).hexdigest()[:16],
            }
        found["refrag"] = None
        if self._adapter is not None:
            config = self._adapter.config
            found["refrag"] = {"adapter": self._adapter.fingerprint(), "chunk_tokens": config.chunk_tokens,
                               "decoder": config.decoder}
        return json.loads(json.dumps(found))

    def run(self, shard: Shard) -> ShardResult:
        """Embed the shard's texts, compress them if asked, then REFRAG-encode the texts the index will serve."""
        ids = [passage_id for passage_id, _ in shard]
        texts = [text for _, text in shard]
        seconds: dict[str, float] = {}
        began = time.perf_counter()
        vectors = self.embedder.embed(texts)
        seconds["embed"] = time.perf_counter() - began
        served = None
        if self.spec.compression is not None:
            began = time.perf_counter()
            served = self._compress(texts, vectors)
            seconds[self.spec.compression.method] = time.perf_counter() - began
        refrag = None
        if self._adapter is not None:
            began = time.perf_counter()
            refrag = self._chunk_embeddings(ids, served or texts)
            seconds["refrag"] = time.perf_counter() - began
        return ShardResult(ids, vectors, served, refrag, seconds)

    def _compress(self, texts: list[str], vectors: np.ndarray) -> list[str]:
        if self._color is not None:
            return [p.text for p in self._color.compress("", [Passage(text) for text in texts])]
        from ..compressors.extractive import extract
        from ..text import sentence_spans

        # extract() with the passage as its own query. Its embeddings come from one batch per shard: every
        # sentence of the shard embedded together, and each passage's vector (the query) from the step above.
        sentences = list(dict.fromkeys(text[a:b] for text in texts for a, b in sentence_spans(text)))
        known = dict(zip(sentences, self.embedder.embed(sentences)))
        known.update(zip(texts, vectors))
        embedder = _Known(known, self.embedder)
        budget = self.spec.compression.budget
        return [extract(text, text, budget, self.embedder.tokenizer, embedder) for text in texts]

    def _chunk_embeddings(self, ids: list[str], texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        import torch

        from ..compressors.refrag.cache import ChunkCache

        passages = [Passage(text, id=passage_id) for passage_id, text in zip(ids, texts)]
        cache = ChunkCache.build(passages, self._adapter, self._decoder_tokenizer)
        width = self._adapter.config.decoder_hidden
        out = []
        for passage_id in ids:
            rows = cache.entries[passage_id]
            spans = np.asarray(list(rows), dtype=np.int64).reshape(-1, 2)
            embeds = torch.stack(list(rows.values())).numpy() if rows else np.zeros((0, width), np.float32)
            out.append((spans, np.ascontiguousarray(embeds, dtype=np.float32)))
        return out


class _Known:
    """An embedder answering from vectors already computed, and asking the real one for any other text."""

    def __init__(self, known: dict[str, np.ndarray], embedder) -> None:
        self.known, self.embedder = known, embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.known]
        if missing:
            self.known.update(zip(missing, self.embedder.embed(missing)))
        return np.stack([self.known[t] for t in texts]) if texts else self.embedder.embed([])


class LocalExecutor:
    """Runs shards one after another in this process, on one :class:`ShardWorker`."""

    name = "local"
    workers = 1

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.worker = ShardWorker(spec)

    def fingerprint(self) -> dict[str, Any]:
        return self.worker.fingerprint()

    def map(self, shards: Iterable[Shard]) -> Iterator[tuple[Shard, ShardResult]]:
        for shard in shards:
            yield shard, self.worker.run(shard)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class IndexReport:
    """What a build did. ``computed``: passages this run computed; ``from_parts``: taken from an interrupted
    run's parts; ``from_index``: kept from the existing index (``add``); ``dropped``: passages of the existing
    index no longer in the corpus. ``step_seconds``: worker seconds per step, summed over this run's shards."""

    store: FaissStore
    out: Path
    passages: int
    computed: int
    from_parts: int
    from_index: int
    dropped: int
    shards: int
    seconds: float
    step_seconds: dict[str, float]
    executor: str
    workers: int

    def rates(self) -> dict[str, float]:
        """Passages per worker-second for each step (embed, color/extractive, refrag) over this run's shards."""
        return {step: self.computed / s for step, s in self.step_seconds.items() if s > 0}


def parts_folder(out_folder: str | os.PathLike[str]) -> Path:
    """Where a build into ``out_folder`` keeps its finished shards: ``INDEX.parts`` beside it."""
    out = Path(out_folder)
    return out.parent / f"{out.name}{PARTS_SUFFIX}"


def index_corpus(
    corpus_folder: str | os.PathLike[str],
    out_folder: str | os.PathLike[str],
    spec: WorkerSpec | None = None,
    *,
    executor: Any = None,
    chunk_tokens: int = 200,
    overlap: int = 40,
    add: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    approx_threshold: int = DEFAULT_THRESHOLD,
    target_recall: float = TARGET_RECALL,
    progress: bool = True,
    on_part: Callable[[int, int], None] | None = None,
) -> IndexReport:
    """Build (or, with ``add``, update) the index of a corpus folder at ``out_folder``; see the module docs.

    ``executor``: a :class:`LocalExecutor` (the default, made from ``spec``) or a ``ray_jobs.RayExecutor``; one
    passed in is left open for the caller to reuse. ``on_part(parts_written, passages_computed)`` is called
    after each shard is safely on disk. An interruption (Ctrl-C, a killed process) keeps the finished shards;
    the same call resumes from them.
    """
    require_int(shard_size, "shard_size", minimum=1)
    require_int(approx_threshold, "approx_threshold", minimum=1)
    out = check_target(out_folder)
    if executor is None:
        with LocalExecutor(spec or WorkerSpec()) as local:
            return _build(corpus_folder, out, local, chunk_tokens, overlap, add, shard_size, approx_threshold,
                          target_recall, progress, on_part)
    if spec is not None and spec != executor.spec:
        raise InputError(f"the executor runs {executor.spec}, not the requested {spec}; make an executor for it")
    return _build(corpus_folder, out, executor, chunk_tokens, overlap, add, shard_size, approx_threshold,
                  target_recall, progress, on_part)


def _build(corpus_folder, out: Path, executor, chunk_tokens, overlap, add, shard_size, approx_threshold,
           target_recall, progress, on_part) -> IndexReport:
    began = time.perf_counter()
    spec = executor.spec
    embedder = load_embedder(spec.embedder, spec.device)  # the driver chunks with its tokenizer
    chunk_tokens = fit_chunk_tokens(embedder, chunk_tokens, overlap)
    fingerprint = executor.fingerprint()
    existing = _existing_index(out, fingerprint, embedder) if add else None
    existing_ids = {p.id for p in existing.passages} if existing is not None else set()
    parts = Parts(parts_folder(out))
    parts.open(fingerprint)
    finished = False
    try:
        done = parts.done_ids()
        passages: list[Passage] = []
        positions: dict[str, int] = {}

        def shards() -> Iterator[Shard]:
            shard: Shard = []
            for passage in chunk_corpus(corpus_folder, embedder.tokenizer, chunk_tokens, overlap):
                if passage.id in positions:
                    raise CorpusError(f"two passages share the id {passage.id} ({passage.source} {passage.span}); "
                                      "the corpus has a duplicated document path or a hash collision")
                positions[passage.id] = len(passages)
                passages.append(passage)
                if passage.id in done or passage.id in existing_ids:
                    continue
                shard.append((passage.id, passage.text))
                if len(shard) >= shard_size:
                    yield shard
                    shard = []
            if shard:
                yield shard

        computed = written = 0
        step_seconds: dict[str, float] = {}
        with tqdm(desc="indexing", unit="passage", disable=not progress) as bar:
            for shard, result in executor.map(shards()):
                if result.ids != [passage_id for passage_id, _ in shard]:
                    raise CorpusError("a worker returned results for other passages than its shard's; rerun")
                parts.write(result)
                written += 1
                computed += len(shard)
                for step, seconds in result.seconds.items():
                    step_seconds[step] = step_seconds.get(step, 0.0) + seconds
                bar.update(len(shard))
                if on_part is not None:
                    on_part(written, computed)
        if not passages:
            raise CorpusError(f"the corpus {corpus_folder} produced no passages (its files hold no tokenizable text)")
        from_parts = sum(1 for p in passages if p.id in done)
        from_index = sum(1 for p in passages if p.id in existing_ids and p.id not in done)
        dropped = len(existing_ids - set(positions))
        build = {"passages": len(passages), "computed": computed, "from_parts": from_parts,
                 "from_index": from_index, "dropped": dropped, "executor": executor.name,
                 "workers": executor.workers, "shard_size": shard_size}
        store = _assemble(passages, positions, parts, existing, fingerprint, embedder, approx_threshold,
                          target_recall)
        store.chunking = {"chunk_tokens": chunk_tokens, "overlap": overlap, "tokenizer": embedder.name}
        store.info["artefacts"] = fingerprint
        store.info["build"] = build
        store.save(out)
        finished = True
    finally:
        parts.close(remove=finished)
    return IndexReport(store, out, len(passages), computed, from_parts, from_index, dropped, written,
                       time.perf_counter() - began, step_seconds, executor.name, executor.workers)


def _existing_index(out: Path, fingerprint: dict[str, Any], embedder) -> FaissStore:
    """The index ``add`` extends; it must have been built with the same models and settings."""
    if not out.is_dir():
        raise InputError(f"--add: there is no index at {out} to add to; build it first (without --add)")
    existing = FaissStore.load(out, embedder, serve_compressed=False)
    built_with = existing.info.get("artefacts")
    if built_with != fingerprint:
        raise InputError(
            f"--add: {out} was built with {json.dumps(built_with)}, this build would make "
            f"{json.dumps(fingerprint)}; rebuild it without --add (or add with the same options)"
        )
    return existing


def _assemble(passages, positions, parts, existing, fingerprint, embedder, approx_threshold, target_recall):
    """The index of ``passages`` (corpus order) from the parts and, for the rest, the existing index."""
    count = len(passages)
    vectors = np.zeros((count, embedder.dim), dtype=np.float32)
    filled = np.zeros(count, dtype=bool)
    served: dict[str, str] = {}
    chunks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in parts.names():
        record = parts.record(name)
        if record is None or not any(i in positions for i in record["ids"]):
            continue
        data = parts.load(name, record)
        if data is None:
            continue
        for row, passage_id in enumerate(record["ids"]):
            at = positions.get(passage_id)
            if at is None or filled[at]:
                continue
            vectors[at] = data.vectors[row]
            filled[at] = True
            if data.served is not None:
                served[passage_id] = data.served[row]
            if data.refrag is not None:
                chunks[passage_id] = data.refrag[row]
    if existing is not None and not filled.all():
        old_vectors = existing.vectors()
        old_rows = {p.id: i for i, p in enumerate(existing.passages)}
        old_chunks = _load_chunk_cache(existing) if fingerprint["refrag"] else None
        for at in np.flatnonzero(~filled):
            passage_id = passages[at].id
            if passage_id not in old_rows:
                continue
            vectors[at] = old_vectors[old_rows[passage_id]]
            filled[at] = True
            if passage_id in existing.compressed:
                served[passage_id] = existing.compressed[passage_id]
            if old_chunks is not None:
                chunks[passage_id] = old_chunks[passage_id]
    if not filled.all():
        missing = [passages[i].id for i in np.flatnonzero(~filled)[:5]]
        raise IndexLoadError(f"no results for {int((~filled).sum())} passages (e.g. {missing}); rerun the build")
    store = FaissStore.from_vectors(passages, vectors, embedder, approx_threshold, target_recall)
    if fingerprint["compression"] is not None:
        store.compressed = served
        store.compression = {key: fingerprint["compression"][key] for key in ("method", "fingerprint")}
    if fingerprint["refrag"] is not None:
        store.attachments[REFRAG_FILE] = _chunk_cache_writer(fingerprint["refrag"], passages, chunks)
    return store


def _load_chunk_cache(store: FaissStore) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The REFRAG chunk embeddings of a loaded index, per passage id, as arrays."""
    from ..compressors.refrag.cache import ChunkCache

    path = store.attachment(REFRAG_FILE)
    if path is None:
        raise IndexLoadError(f"{store.folder} has no {REFRAG_FILE}; rebuild it without --add")
    out = {}
    for passage_id, rows in ChunkCache.load(path).entries.items():
        spans = np.asarray(list(rows), dtype=np.int64).reshape(-1, 2)
        embeds = np.stack([row.numpy() for row in rows.values()]) if rows else np.zeros((0, 1), np.float32)
        out[passage_id] = (spans, embeds)
    return out


def _chunk_cache_writer(refrag: dict[str, Any], passages: list[Passage], chunks) -> Callable[[Path], Any]:
    """A function writing the index's REFRAG ChunkCache file, passages in corpus order."""

    def write(path: Path) -> None:
        import torch

        from ..compressors.refrag.cache import ChunkCache

        cache = ChunkCache(refrag["adapter"], refrag["chunk_tokens"])
        for passage in passages:
            spans, embeds = chunks[passage.id]
            cache.entries[passage.id] = {
                (int(lo), int(hi)): torch.from_numpy(np.array(row)) for (lo, hi), row in zip(spans, embeds)
            }
        cache.save(path)

    return write


@dataclass
class _PartData:
    vectors: np.ndarray
    served: list[str] | None
    refrag: list[tuple[np.ndarray, np.ndarray]] | None


class Parts:
    """The finished shards of one build, in a folder beside the index.

    Per shard: ``part-KEY.npy`` (vectors), optionally ``part-KEY.refrag.safetensors``, then ``part-KEY.json``
    (ids, served texts, the data files' checksums), each written to a temporary name, flushed and renamed, the
    record last: a shard is done exactly when its record exists. ``job.json`` holds the workers' fingerprint;
    ``lock`` is held (flock) while a build runs, so two builds cannot write the same parts.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = None

    def open(self, fingerprint: dict[str, Any]) -> None:
        """Create or reuse the folder: lock it, drop temporary files, and drop every part if the fingerprint changed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._acquire()
        for stale in self.folder.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        job = self.folder / JOB_FILE
        previous = None
        if job.is_file():
            try:
                previous = json.loads(job.read_text(encoding="utf-8")).get("fingerprint")
            except (OSError, ValueError):
                previous = None
        if previous != fingerprint:
            if self.names():
                warnings.warn(f"discarding the parts in {self.folder}: they were made with other models or settings "
                              f"({json.dumps(previous)})", stacklevel=3)
            for path in self.folder.glob("part-*"):
                path.unlink()
            _write_atomic(job, json.dumps({"fingerprint": fingerprint}, indent=1).encode())

    def names(self) -> list[str]:
        """The finished parts, by name (sorted)."""
        return sorted(path.name[: -len(".json")] for path in self.folder.glob("part-*.json"))

    def record(self, name: str) -> dict[str, Any] | None:
        try:
            record = json.loads((self.folder / f"{name}.json").read_text(encoding="utf-8"))
            if not isinstance(record.get("ids"), list):
                raise ValueError("no ids")
            return record
        except (OSError, ValueError) as exc:
            warnings.warn(f"ignoring the unreadable part {name} in {self.folder} ({exc}); its passages are redone",
                          stacklevel=2)
            return None

    def done_ids(self) -> set[str]:
        """The ids of every passage some finished part holds."""
        done: set[str] = set()
        for name in self.names():
            record = self.record(name)
            if record is not None and self._intact(name, record):
                done.update(record["ids"])
        return done

    def _intact(self, name: str, record: dict[str, Any]) -> bool:
        for entry in record["files"].values():
            path = self.folder / entry["name"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                warnings.warn(f"ignoring part {name} in {self.folder}: {entry['name']} is missing or does not match "
                              "its checksum; its passages are redone", stacklevel=3)
                (self.folder / f"{name}.json").unlink(missing_ok=True)
                return False
        return True

    def write(self, result: ShardResult) -> str:
        """Write one finished shard; return its name."""
        name = "part-" + hashlib.sha1("\n".join(result.ids).encode()).hexdigest()[:16]
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(result.vectors, dtype=np.float32))
        files = {"vectors": self._data_file(f"{name}.npy", buffer.getvalue())}
        if result.refrag is not None:
            from safetensors.numpy import save

            tensors = {}
            for passage_id, (spans, embeds) in zip(result.ids, result.refrag):
                tensors[f"{passage_id}.spans"] = np.ascontiguousarray(spans, dtype=np.int64)
                tensors[f"{passage_id}.embeds"] = np.ascontiguousarray(embeds, dtype=np.float32)
            files["refrag"] = self._data_file(f"{name}.refrag.safetensors", save(tensors))
        record = {"ids": result.ids, "served": result.served, "files": files, "seconds": result.seconds}
        _write_atomic(self.folder / f"{name}.json", json.dumps(record, ensure_ascii=False).encode())
        return name

    def _data_file(self, file_name: str, data: bytes) -> dict[str, str]:
        _write_atomic(self.folder / file_name, data)
        return {"name": file_name, "sha256": hashlib.sha256(data).hexdigest()}

    def load(self, name: str, record: dict[str, Any]) -> _PartData | None:
        """A part's arrays (None, with a warning, if its files no longer match their checksums)."""
        if not self._intact(name, record):
            return None
        vectors = np.load(self.folder / record["files"]["vectors"]["name"])
        refrag = None
        if "refrag" in record["files"]:
            from safetensors.numpy import load_file

            tensors = load_file(self.folder / record["files"]["refrag"]["name"])
            refrag = [(tensors[f"{i}.spans"], tensors[f"{i}.embeds"]) for i in record["ids"]]
        return _PartData(vectors, record.get("served"), refrag)

    def close(self, remove: bool) -> None:
        """Release the lock; delete the folder when the build finished, or when it holds no finished part."""
        self._release()
        if remove or not self.names():
            shutil.rmtree(self.folder, ignore_errors=True)

    def _acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: builds are not guarded against each other
            return
        handle = open(self.folder / LOCK_FILE, "a+")  # held open until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise InputError(f"another build is writing {self.folder}; wait for it or stop it") from None
        self._lock = handle

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, and rename it to ``path``."""
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
