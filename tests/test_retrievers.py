"""Retrievers: corpus loading, chunking, embeddings and the persisted FAISS store (real MiniLM, small corpora)."""
from __future__ import annotations

import json
import os
import random
import shutil
import types
from pathlib import Path

import faiss
import numpy as np
import pytest

from ctxopt.errors import CorpusError, IndexLoadError, InputError
from ctxopt.retrievers import (
    CorpusWarning,
    FaissStore,
    build_index,
    chunk_corpus,
    chunk_text,
    embedder_path,
    iter_corpus,
    load_embedder,
)
from ctxopt.retrievers import corpus as corpus_module
from ctxopt.retrievers import store as store_module
from ctxopt.types import Passage

TOPICS = {
    "volcano.txt": "Volcanoes erupt when molten rock called magma rises to the surface. Lava flows from the crater "
    "and ash clouds fill the sky. Mount Etna in Sicily is one of the most active volcanoes in Europe.",
    "bread.md": "# Baking bread\n\nKnead the dough of flour, water, salt and yeast for ten minutes. Let it rise "
    "for an hour, then bake the loaf in a hot oven until the crust is golden brown.",
    "python.txt": "Python is a programming language. Functions are defined with the def keyword, and lists are "
    "sorted with the sorted builtin. Exceptions are raised with raise and caught with try and except.",
    "cats.txt": "Cats are small carnivorous mammals kept as pets. They purr when content, sleep most of the day "
    "and hunt mice. A kitten is a young cat.",
    "ocean.txt": "The Pacific is the largest and deepest ocean on Earth. Tides are caused by the gravity of the "
    "moon, and coral reefs grow in warm shallow water.",
}
QUERIES = ["Which mountain erupts lava?", "How do I bake a loaf?", "How are exceptions caught in code?", "young cat"]


def _words_document(seed: int = 0, paragraphs: int = 12) -> str:
    """Paragraphs of short sentences made of common whole words (each a single tokenizer token)."""
    rng = random.Random(seed)
    words = "the cat sat on a mat and then ran to see his old friend who was in town for one day".split()
    paras = []
    for _ in range(paragraphs):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))).capitalize() + "." for _ in range(6)]
        paras.append(" ".join(sentences))
    return "\n\n".join(paras) + "\n"


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


@pytest.fixture(scope="module")
def tokenizer(embedder):
    return embedder.tokenizer


@pytest.fixture()
def topic_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in TOPICS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory, embedder) -> tuple[Path, FaissStore]:
    """A small index built and saved once; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("saved")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in TOPICS.items():
        (corpus / name).write_text(text, encoding="utf-8")
    store = build_index(corpus, root / "index", embedder=embedder, chunk_tokens=32, overlap=8, progress=False)
    return root / "index", store


def _token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
    return [(s, e) for s, e in enc["offset_mapping"] if e > s]


def _results(store: FaissStore, k: int = 3) -> list[list[tuple[str, float]]]:
    return [[(p.id, p.score) for p in store.search(q, k)] for q in QUERIES]


def _assert_same_results(a: FaissStore, b: FaissStore) -> None:
    for left, right in zip(_results(a), _results(b)):
        assert [i for i, _ in left] == [i for i, _ in right]
        np.testing.assert_allclose([s for _, s in left], [s for _, s in right], atol=1e-6)


# ---------------------------------------------------------------- chunking


def test_chunk_round_trip_overlap_and_coverage(tokenizer):
    text = _words_document()
    offset = 7
    chunks = chunk_text(text, tokenizer, chunk_tokens=50, overlap=10, source="doc", offset=offset, metadata={"k": 1})
    assert len(chunks) > 5
    spans = _token_spans(tokenizer, text)
    starts = {s: i for i, (s, _) in enumerate(spans)}
    ends = {e: i + 1 for i, (_, e) in enumerate(spans)}
    previous_end = None
    for chunk in chunks:
        start, end = chunk.span[0] - offset, chunk.span[1] - offset
        assert chunk.text == text[start:end]
        assert chunk.source == "doc" and chunk.metadata == {"k": 1}
        first, last = starts[start], ends[end]
        assert last - first <= 50
        if previous_end is not None:
            assert previous_end - first == 10  # exactly `overlap` tokens shared
        previous_end = last
    # The chunks cover the document from its first to its last token, and every non-space character.
    assert chunks[0].span[0] - offset == spans[0][0] and chunks[-1].span[1] - offset == spans[-1][1]
    covered = np.zeros(len(text), dtype=bool)
    for chunk in chunks:
        covered[chunk.span[0] - offset : chunk.span[1] - offset] = True
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())
    # Sentences are at most 9 tokens, so a sentence end always falls in the last 20% of a chunk.
    assert all(chunk.text.endswith(".") for chunk in chunks)


def test_chunk_without_overlap_is_a_partition(tokenizer):
    text = _words_document(seed=1)
    chunks = chunk_text(text, tokenizer, chunk_tokens=30, overlap=0)
    for left, right in zip(chunks, chunks[1:]):
        assert left.span[1] <= right.span[0]
        assert text[left.span[1] : right.span[0]].strip() == ""
    assert chunk_text("   \n ", tokenizer) == [] and chunk_text("", tokenizer) == []


def test_chunk_prefers_paragraph_breaks(tokenizer):
    para = "One two three four five six seven eight nine."
    text = f"{para}\n\n{para}\n\n{para}"  # 10 tokens per paragraph
    chunks = chunk_text(text, tokenizer, chunk_tokens=22, overlap=2)
    assert chunks[0].text == f"{para}\n\n{para}"


@pytest.mark.parametrize("chunk_tokens, overlap", [(0, 0), (-5, 0), (10, -1), (10, 10), (10, 20)])
def test_chunk_validation(tokenizer, chunk_tokens, overlap):
    with pytest.raises(InputError):
        chunk_text("some text", tokenizer, chunk_tokens=chunk_tokens, overlap=overlap)


def test_chunk_needs_fast_tokenizer():
    with pytest.raises(InputError, match="fast"):
        chunk_text("some text", types.SimpleNamespace(is_fast=False))


# ---------------------------------------------------------------- corpus


def test_corpus_mixed_files(tmp_path: Path):
    (tmp_path / "a.txt").write_text("Alpha text.\r\nSecond line.", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# Beta\n\nMarkdown body.", encoding="utf-8")
    records = [
        {"text": "Gamma record.", "url": "http://g"},
        "not an object",
        {"page_content": "Delta record.", "metadata": {"page": 3}},
        {"title": "no text here"},
    ]
    lines = [json.dumps(r) for r in records] + ["{broken json"]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "empty.md").write_text("  \n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.txt").write_text("hidden too", encoding="utf-8")

    with pytest.warns(CorpusWarning) as caught:
        documents = {d.source: ("".join(t for _, t in d.pieces), d.metadata) for d in iter_corpus(tmp_path)}
    assert documents == {
        "a.txt": ("Alpha text.\r\nSecond line.", {}),
        "c.jsonl#1": ("Gamma record.", {"url": "http://g"}),
        "c.jsonl#3": ("Delta record.", {"page": 3}),
        "sub/b.md": ("# Beta\n\nMarkdown body.", {}),
    }
    messages = "\n".join(str(w.message) for w in caught)
    expected_skips = ("blob.txt: binary", "latin.txt: not UTF-8", "c.jsonl line 2", "c.jsonl line 4", "c.jsonl line 5")
    for expected in expected_skips + ("image.png",):
        assert expected in messages
    assert "hidden" not in messages and "empty.md" not in messages


def test_corpus_errors(tmp_path: Path):
    with pytest.raises(CorpusError, match="does not exist"):
        iter_corpus(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("text", encoding="utf-8")
    with pytest.raises(CorpusError, match="not a folder"):
        iter_corpus(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no usable document"):
        list(iter_corpus(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin.txt").write_bytes("\u00e9t\u00e9".encode("latin-1"))
    with pytest.warns(CorpusWarning), pytest.raises(CorpusError, match="latin.txt"):
        list(iter_corpus(bad))


def test_big_file_streamed_in_pieces(tmp_path: Path, tokenizer, monkeypatch):
    text = _words_document(seed=2, paragraphs=40)
    (tmp_path / "big.txt").write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 500)
    (document,) = list(iter_corpus(tmp_path))
    pieces = list(document.pieces)
    assert len(pieces) >= len(text) // 1000
    assert all(offset == sum(len(t) for _, t in pieces[:i]) for i, (offset, _) in enumerate(pieces))
    assert "".join(t for _, t in pieces) == text

    streamed = list(chunk_corpus(tmp_path, tokenizer, chunk_tokens=40, overlap=8))
    for chunk in streamed:
        assert chunk.text == text[chunk.span[0] : chunk.span[1]] and chunk.source == "big.txt"
    whole = chunk_text(text, tokenizer, chunk_tokens=40, overlap=8, source="big.txt")
    assert [c.span for c in streamed] == [c.span for c in whole]


# ---------------------------------------------------------------- embeddings


def test_embedder_resolves_package_and_is_deterministic(embedder):
    folder = embedder_path()
    assert os.path.isfile(os.path.join(folder, "modules.json")) and folder.endswith("model")
    assert embedder_path("/some/local/folder") == "/some/local/folder"
    assert (embedder.dim, embedder.max_tokens) == (384, 256)
    texts = ["A first sentence.", "Another, longer sentence about something else entirely."]
    first, second = embedder.embed(texts), embedder.embed(texts)
    assert first.dtype == np.float32 and first.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(first, second)
    assert embedder.embed([]).shape == (0, 384)
    assert load_embedder() is embedder


# ---------------------------------------------------------------- store


def test_build_search_save_load(saved_index, embedder):
    folder, store = saved_index
    assert store.index_type == "flat" and isinstance(store.index, faiss.IndexFlatIP)
    top = store.search("Which mountain erupts lava?", k=2)
    assert top[0].source == "volcano.txt" and top[0].score >= top[1].score
    assert store.retrieve("How do I bake a loaf?", k=1)[0].source == "bread.md"
    assert store.search("cats", k=100) and len(store.search("cats", k=100)) == len(store)

    assert sorted(p.name for p in folder.iterdir()) == ["docstore.json", "index.faiss", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["embedder"] == "all-minilm-l6-v2" and manifest["dim"] == 384
    assert manifest["count"] == len(store) and manifest["index_type"] == "flat"
    assert manifest["chunking"]["chunk_tokens"] == 32 and manifest["chunking"]["overlap"] == 8
    loaded = FaissStore.load(folder)
    assert loaded.embedder is embedder
    assert [(p.id, p.text, p.source, p.span) for p in loaded.passages] == [
        (p.id, p.text, p.source, p.span) for p in store.passages
    ]
    _assert_same_results(store, loaded)


def test_hnsw_above_threshold(topic_corpus, embedder, tmp_path):
    passages = list(chunk_corpus(topic_corpus, embedder.tokenizer, chunk_tokens=24, overlap=4))
    store = FaissStore.build(passages, embedder, progress=False, hnsw_threshold=3)
    assert store.index_type == "hnsw" and isinstance(store.index, faiss.IndexHNSWFlat)
    assert store.index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert store.search("Which mountain erupts lava?", k=1)[0].source == "volcano.txt"
    store.save(tmp_path / "hnsw")
    loaded = FaissStore.load(tmp_path / "hnsw", embedder)
    assert loaded.index_type == "hnsw"
    _assert_same_results(store, loaded)

    growing = FaissStore(embedder, hnsw_threshold=3)
    growing.add(passages[:2])
    assert growing.index_type == "flat"
    growing.add(passages[2:])
    assert growing.index_type == "hnsw" and growing.index.ntotal == len(passages)
    assert growing.search("young cat", k=1)[0].source == "cats.txt"


@pytest.mark.parametrize("damage, named", [
    ("truncate_index", "index.faiss"),
    ("delete_docstore", "docstore.json"),
    ("edit_checksum", "docstore.json"),
    ("edit_docstore", "docstore.json"),
    ("delete_manifest", "manifest.json"),
    ("garbage_manifest", "manifest.json"),
])
def test_corrupt_index_raises(saved_index, tmp_path, damage, named):
    folder = tmp_path / "copy"
    shutil.copytree(saved_index[0], folder)
    manifest_path = folder / "manifest.json"
    if damage == "truncate_index":
        data = (folder / "index.faiss").read_bytes()
        (folder / "index.faiss").write_bytes(data[: len(data) // 2])
    elif damage == "delete_docstore":
        (folder / "docstore.json").unlink()
    elif damage == "edit_checksum":
        manifest = json.loads(manifest_path.read_text())
        manifest["files"]["docstore.json"]["sha256"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "edit_docstore":
        (folder / "docstore.json").write_text((folder / "docstore.json").read_text().replace("Lava", "Lave"))
    elif damage == "delete_manifest":
        manifest_path.unlink()
    else:
        manifest_path.write_text("{not json")
    with pytest.raises(IndexLoadError, match=named):
        FaissStore.load(folder)


def test_load_errors_missing_folder_and_dim_mismatch(saved_index, tmp_path):
    with pytest.raises(IndexLoadError, match="no index folder"):
        FaissStore.load(tmp_path / "nothing")
    other = types.SimpleNamespace(name="other-model", dim=768)
    with pytest.raises(IndexLoadError, match="768"):
        FaissStore.load(saved_index[0], embedder=other)


def test_interrupted_save_keeps_old_index(saved_index, embedder, tmp_path, monkeypatch):
    folder = tmp_path / "index"
    shutil.copytree(saved_index[0], folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    replacement = FaissStore(embedder)
    replacement.add([Passage("A completely different passage about trains.", source="trains.txt")])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # Crash while writing the new files: the old folder is untouched and no temporary folder is left.
    monkeypatch.setattr(store_module, "_write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        replacement.save(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    _assert_same_results(saved_index[1], FaissStore.load(folder))

    # Crash between moving the old folder away and moving the new one in: load restores the old one.
    def half_swap(staging, target):
        os.rename(target, store_module._backup_path(target))
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "_swap_in", half_swap)
    with pytest.raises(KeyboardInterrupt):
        replacement.save(folder)
    monkeypatch.undo()
    assert not folder.exists()
    with pytest.warns(UserWarning, match="interrupted save"):
        restored = FaissStore.load(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    _assert_same_results(saved_index[1], restored)

    # A completed save replaces the index and leaves nothing else behind.
    replacement.save(folder)
    assert [p.source for p in FaissStore.load(folder).passages] == ["trains.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_save_refuses_foreign_folder(embedder, tmp_path):
    (tmp_path / "notes.txt").write_text("precious", encoding="utf-8")
    store = FaissStore(embedder)
    store.add([Passage("text")])
    with pytest.raises(InputError, match="not a ctxopt index"):
        store.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_retrieve_validates_input(saved_index):
    store = saved_index[1]
    for question in ("", "   \n"):
        with pytest.raises(InputError, match="question is empty"):
            store.retrieve(question)
    with pytest.raises(InputError, match="k must be"):
        store.retrieve("cats", k=0)


def test_build_index_clamps_chunk_size(topic_corpus, embedder, tmp_path):
    with pytest.warns(UserWarning, match="using 254"):
        store = build_index(topic_corpus, embedder=embedder, chunk_tokens=1000, overlap=10, progress=False)
    assert store.chunking["chunk_tokens"] == 254
    assert sorted(p.source for p in store.passages) == sorted(TOPICS)  # each topic fits one chunk
    with pytest.raises(InputError, match="smaller overlap"), pytest.warns(UserWarning):
        build_index(topic_corpus, embedder=embedder, chunk_tokens=1000, overlap=300, progress=False)


def test_extra_files_are_checksummed_and_version_1_folders_still_load(saved_index, embedder, tmp_path):
    store = FaissStore.load(saved_index[0], embedder)
    store.attachments["notes.bin"] = lambda path: path.write_bytes(b"chunk embeddings")
    first = store.passages[0]
    store.compressed, store.compression = {first.id: "Short."}, {"method": "test", "fingerprint": "0"}
    store.save(tmp_path / "extra")
    loaded = FaissStore.load(tmp_path / "extra", embedder)
    assert loaded.attachment("notes.bin").read_bytes() == b"chunk embeddings" and loaded.compressed == store.compressed
    served = {p.id: p for p in loaded.search(first.text, k=len(loaded))}
    marker = served[first.id].metadata[store_module.PRECOMPRESSED]
    assert served[first.id].text == "Short." and marker == {"method": "test", "fingerprint": "0"}
    assert all(p.text == next(q.text for q in loaded.passages if q.id == i) for i, p in served.items() if i != first.id)
    loaded.save(tmp_path / "copy")  # attached files travel with the index
    assert (tmp_path / "copy" / "notes.bin").read_bytes() == b"chunk embeddings"

    (tmp_path / "extra" / "notes.bin").write_bytes(b"changed")
    with pytest.raises(IndexLoadError, match="notes.bin"):
        FaissStore.load(tmp_path / "extra", embedder)
    manifest_path = tmp_path / "copy" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../outside"] = {"sha256": "0" * 64}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexLoadError, match="not a plain file name"):
        FaissStore.load(tmp_path / "copy", embedder)
    store.attachments = {"docstore.json": lambda path: None}
    with pytest.raises(InputError, match="cannot attach"):
        store.save(tmp_path / "clash")

    old = tmp_path / "v1"
    shutil.copytree(saved_index[0], old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    _assert_same_results(saved_index[1], FaissStore.load(old, embedder))
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(IndexLoadError, match="format version 3"):
        FaissStore.load(old, embedder)
