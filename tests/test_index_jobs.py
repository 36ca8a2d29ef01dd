"""Sharded index builds in one process (ctxopt.retrievers.jobs): equal to build_index, resumable after a killed
driver, incremental (--add equals a full rebuild), approximate past a threshold with measured recall, and the
pre-computed artefacts served to the pipeline. Real MiniLM, a tiny random Llama saved to a folder as the CoLoR
compressor, and a REFRAG adapter (packaged MiniLM encoder, random projector) for that Llama."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, make_tiny_lm, minilm_folder

from ctxopt.cli import build_parser, main
from ctxopt.compressors.refrag import REFRAG, Adapter, AdapterConfig, ChunkCache
from ctxopt.errors import InputError
from ctxopt.pipeline import Pipeline
from ctxopt.retrievers import FaissStore, build_index, load_embedder
from ctxopt.retrievers.approximate import build_ivf, tune_nprobe
from ctxopt.retrievers.jobs import Compression, Parts, WorkerSpec, index_corpus, parts_folder
from ctxopt.retrievers.store import PRECOMPRESSED

CHUNK = {"chunk_tokens": 48, "overlap": 8}
WORDS = ("the cat sat on a mat and then ran to see his old friend who was in town for one day; a river ran past "
         "the mill near the bridge where the farmer kept sheep and a red cart").replace(";", "").split()


def write_corpus(folder: Path, documents: int = 6, seed: int = 0) -> Path:
    """Documents of short sentences in paragraphs: about 7 passages each at 48 tokens."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        paragraphs = [" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                               for _ in range(5)) for _ in range(6)]
        (folder / f"doc{d}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return folder


def write_models(root: Path) -> tuple[Path, Path]:
    """A tiny Llama (the CoLoR compressor and REFRAG decoder) and a REFRAG adapter for it, as folders."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    tokenizer.chat_template = CHAT_TEMPLATE
    lm = make_tiny_lm(tokenizer)
    lm_folder, adapter_folder = root / "tiny-llama", root / "tiny-refrag"
    lm.model.save_pretrained(lm_folder)
    tokenizer.save_pretrained(lm_folder)
    config = AdapterConfig(encoder="all-minilm-l6-v2", decoder=str(lm_folder), chunk_tokens=8, pooling="mean",
                           decoder_hidden=lm.model.config.hidden_size, lora_rank=0)
    Adapter.fresh(config, seed=2).save(adapter_folder)
    return lm_folder, adapter_folder


def full_spec(lm_folder: Path, adapter_folder: Path) -> WorkerSpec:
    """Embeddings, CoLoR summaries of at most 6 tokens, and REFRAG chunk embeddings of the summaries."""
    return WorkerSpec(compression=Compression.parse(f"color:{lm_folder}", {"max_new_tokens": 6}),
                      refrag=str(adapter_folder))


def assert_same_index(left: Path, right: Path, atol: float = 1e-5) -> None:
    """Same passages in the same order; vectors, served texts and REFRAG chunk embeddings equal (within atol)."""
    a, b = FaissStore.load(left), FaissStore.load(right)
    assert [(p.id, p.text, p.source, p.span) for p in a.passages] == [(p.id, p.text, p.source, p.span)
                                                                     for p in b.passages]
    assert len({p.id for p in a.passages}) == len(a.passages)
    np.testing.assert_allclose(a.vectors(), b.vectors(), atol=atol, rtol=0)
    assert a.compressed == b.compressed and a.compression == b.compression
    assert a.info["artefacts"] == b.info["artefacts"]
    if a.attachment("refrag-chunks.safetensors") or b.attachment("refrag-chunks.safetensors"):
        ca, cb = ChunkCache.load(left), ChunkCache.load(right)
        assert ca.fingerprint == cb.fingerprint and ca.entries.keys() == cb.entries.keys()
        for key, rows in ca.entries.items():
            assert rows.keys() == cb.entries[key].keys()
            for span, row in rows.items():
                torch.testing.assert_close(row, cb.entries[key][span], atol=atol, rtol=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXOPT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="module")
def extractive_index(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("extractive") / "index"
    spec = WorkerSpec(compression=Compression.parse("extractive:0.5"))
    report = index_corpus(corpus, out, spec, shard_size=8, progress=False, **CHUNK)
    assert report.computed == report.passages == len(report.store) and report.shards == -(-report.passages // 8)
    return out


def test_single_process_build_equals_build_index_and_serves_extracts(corpus, extractive_index):
    reference = build_index(corpus, progress=False, **CHUNK)
    store = FaissStore.load(extractive_index)
    assert [(p.id, p.text, p.span) for p in store.passages] == [(p.id, p.text, p.span) for p in reference.passages]
    np.testing.assert_allclose(store.vectors(), reference.vectors(), atol=1e-5, rtol=0)
    manifest = json.loads((extractive_index / "manifest.json").read_text())
    assert set(manifest["files"]) == {"index.faiss", "docstore.json", "compressed.json"}
    assert manifest["artefacts"]["compression"]["method"] == "extractive" and manifest["index_type"] == "flat"
    assert not parts_folder(extractive_index).exists()

    tokenizer = store.embedder.tokenizer
    for passage in store.passages:  # query-free extracts: whole sentences of the passage, about half its tokens
        short = store.compressed[passage.id]
        assert all(sentence.strip(" .") in passage.text for sentence in short.split(". "))
        assert len(tokenizer.tokenize(short)) <= 0.5 * len(tokenizer.tokenize(passage.text)) + 12
    hit = store.retrieve("the farmer kept sheep near the mill", k=2)[0]
    assert hit.text == store.compressed[hit.id] and hit.metadata[PRECOMPRESSED]["method"] == "extractive"
    original = FaissStore.load(extractive_index, serve_compressed=False).retrieve("the farmer kept sheep", k=1)[0]
    assert PRECOMPRESSED not in original.metadata and original.text == next(
        p.text for p in store.passages if p.id == original.id)


def test_add_equals_a_full_rebuild(corpus, extractive_index, tmp_path):
    changed = tmp_path / "docs"
    shutil.copytree(corpus, changed)
    shutil.copytree(extractive_index, tmp_path / "index")
    (changed / "doc1.txt").unlink()  # deleted
    text = (changed / "doc2.txt").read_text()
    cut = text.index("\n\n", len(text) // 2)
    (changed / "doc2.txt").write_text(text[:cut] + "\n\nThe miller sold his red cart.\n")  # changed at the end
    write_corpus(tmp_path / "more", documents=1, seed=7)
    shutil.copy(tmp_path / "more" / "doc0.txt", changed / "new.txt")  # added

    spec = WorkerSpec(compression=Compression.parse("extractive:0.5"))
    before = FaissStore.load(extractive_index)
    added = index_corpus(changed, tmp_path / "index", spec, add=True, shard_size=8, progress=False, **CHUNK)
    full = index_corpus(changed, tmp_path / "full", spec, shard_size=8, progress=False, **CHUNK)
    assert_same_index(tmp_path / "index", tmp_path / "full")
    kept = {p.id for p in before.passages} & {p.id for p in full.store.passages}
    assert added.from_index == len(kept) > 0 and added.computed == full.passages - len(kept) > 0
    assert added.dropped == len(before) - len(kept) and added.from_parts == 0
    assert added.store.info["build"]["computed"] == added.computed

    with pytest.raises(InputError, match="built with"):  # other settings: --add refuses
        index_corpus(changed, tmp_path / "index", WorkerSpec(), add=True, progress=False, **CHUNK)
    with pytest.raises(InputError, match="no index"):
        index_corpus(changed, tmp_path / "none", spec, add=True, progress=False, **CHUNK)


def test_resume_after_a_killed_driver(corpus, extractive_index, tmp_path):
    """SIGKILL the `ctxopt index` process once it has finished a shard; the rerun computes only the rest."""
    out = tmp_path / "index"
    command = [sys.executable, "-m", "ctxopt.cli", "index", str(corpus), "--out", str(out), "--compress",
               "extractive:0.5", "--shard-size", "2", "--chunk-tokens", "48", "--overlap", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "log.txt"
    with open(log, "wb") as stream:
        process = subprocess.Popen(command, env=env, stdout=stream, stderr=stream)
    parts = parts_folder(out)
    try:
        deadline = time.monotonic() + 120
        while len(list(parts.glob("part-*.json"))) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()
    assert not out.exists()
    finished = Parts(parts).names()
    assert len(finished) >= 2
    kept = sum(len(Parts(parts).record(name)["ids"]) for name in finished[1:])
    # damage one finished shard: it is dropped with a warning and its passages are computed again
    damaged = parts / f"{finished[0]}.npy"
    damaged.write_bytes(damaged.read_bytes()[:-8])
    with pytest.warns(UserWarning, match="checksum"):
        report = index_corpus(corpus, out, WorkerSpec(compression=Compression.parse("extractive:0.5")),
                              shard_size=2, progress=False, **CHUNK)
    assert report.from_parts == kept and report.computed == report.passages - kept
    assert not parts.exists()
    assert_same_index(out, extractive_index)


def test_parts_of_other_settings_are_discarded_and_a_running_build_is_locked(corpus, tmp_path):
    out = tmp_path / "index"
    calls = []

    def stop(written, computed):
        calls.append(written)
        if written == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index_corpus(corpus, out, WorkerSpec(), shard_size=4, progress=False, on_part=stop, **CHUNK)
    assert len(Parts(parts_folder(out)).names()) == 2 and not out.exists()
    held = Parts(parts_folder(out))
    held.open(json.loads((parts_folder(out) / "job.json").read_text())["fingerprint"])
    with pytest.raises(InputError, match="another build"):
        index_corpus(corpus, out, WorkerSpec(), shard_size=4, progress=False, **CHUNK)
    held._release()
    with pytest.warns(UserWarning, match="discarding the parts"):
        report = index_corpus(corpus, out, WorkerSpec(compression=Compression.parse("extractive:0.5")),
                              shard_size=64, progress=False, **CHUNK)
    assert report.from_parts == 0 and report.computed == report.passages


def test_approximate_index_past_the_threshold_measures_its_recall(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, 32)).astype(np.float32)
    vectors = centres[rng.integers(0, 64, 6000)] + 0.3 * rng.standard_normal((6000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_ivf(vectors)
    report = tune_nprobe(index, vectors, target=0.95)
    assert isinstance(index, faiss.IndexIVFFlat) and report["nlist"] == 77 and report["train_sample"] == 3080
    assert report["recall"] >= 0.95 and report["nprobe"] < report["nlist"]
    assert list(report["recall_by_nprobe"].values()) == sorted(report["recall_by_nprobe"].values())

    # the same through a store: MiniLM's width, the synthetic vectors padded with zeros to it
    from ctxopt.types import Passage

    embedder = load_embedder()
    wide = np.zeros((len(vectors), embedder.dim), dtype=np.float32)
    wide[:, :32] = vectors
    passages = [Passage(f"passage {i}") for i in range(len(vectors))]
    store = FaissStore.from_vectors(passages, wide, embedder, approx_threshold=5000)
    assert store.index_type == "ivf" and store.info["approximate"]["recall"] >= 0.95
    np.testing.assert_array_equal(store.vectors(), wide)
    store.save(tmp_path / "ivf")
    loaded = FaissStore.load(tmp_path / "ivf", embedder)
    assert loaded.index_type == "ivf" and loaded.info["approximate"] == store.info["approximate"]
    exact = FaissStore.from_vectors(passages, wide, embedder, approx_threshold=len(vectors))
    assert exact.index_type == "flat" and "approximate" not in exact.info

    # uniform random vectors have no neighbourhoods: only a scan of every cell reaches the target, so exact it is
    uniform = rng.standard_normal((4000, embedder.dim)).astype(np.float32)
    uniform /= np.linalg.norm(uniform, axis=1, keepdims=True)
    kept = FaissStore.from_vectors(passages[:4000], uniform, embedder, approx_threshold=1000, target_recall=0.99)
    assert kept.index_type == "flat" and kept.info["approximate"]["kept_exact"]
    assert kept.info["approximate"]["recall_by_nprobe"]["1"] < 0.5


def test_approximate_index_from_the_command_line(corpus, tmp_path, capsys):
    out = tmp_path / "index"
    code = main(["index", str(corpus), "--out", str(out), "--chunk-tokens", "48", "--overlap", "8",
                 "--approx-threshold", "10"])
    printed = capsys.readouterr().out
    assert code == 0 and "recall@10 1.000" in printed and "indexed" in printed
    store = FaissStore.load(out)  # 42 passages make one cell: a full scan, so the index stays exact
    assert store.info["approximate"]["queries"] == len(store) and store.info["approximate"]["nlist"] == 1
    assert store.index_type == "flat" and store.info["approximate"]["kept_exact"]
    assert store.retrieve("the farmer kept sheep", k=3)


def test_command_line_options(tmp_path, capsys):
    parser = build_parser()
    args = parser.parse_args(["index", "docs", "--out", "i", "--ray", "--workers", "2", "--compress", "color"])
    assert args.ray == "local" and args.workers == 2 and args.compress == "color" and not args.add
    args = parser.parse_args(["index", "docs", "--out", "i", "--ray", "ray://head:10001", "--add"])
    assert args.ray == "ray://head:10001" and args.add
    for argv, message in [
        (["--workers", "2"], "--workers needs --ray"),
        (["--compress", "summarise"], "color"),
        (["--compress", "extractive:1.5"], "ratio"),
        (["--compress-option", "max_new_tokens=4"], "needs --compress"),
        (["--compress", "color", "--compress-option", "fallback=drop"], "takes options"),
    ]:
        assert main(["index", str(tmp_path), "--out", str(tmp_path / "i"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "i").exists() and not parts_folder(tmp_path / "i").exists()


def test_precomputed_colour_and_refrag_serve_the_pipeline(corpus, models, tmp_path, tiny_lm):
    """A CoLoR + REFRAG index: search serves the summaries, and REFRAG reads every chunk from the index."""
    out = tmp_path / "index"
    report = index_corpus(corpus, out, full_spec(*models), shard_size=16, progress=False, **CHUNK)
    assert set(report.step_seconds) == {"embed", "color", "refrag"}
    store = FaissStore.load(out)
    summarised = sum(store.compressed[p.id] != p.text for p in store.passages)
    assert summarised > len(store) // 2 and store.compression["method"] == "color"
    passages = store.retrieve("the farmer kept sheep", k=2)
    assert all(p.metadata[PRECOMPRESSED] == store.compression and p.text == store.compressed[p.id] for p in passages)

    cache_path = store.attachment("refrag-chunks.safetensors")
    assert cache_path is not None and len(ChunkCache.load(cache_path).entries) == len(store)
    refrag = REFRAG(adapter=str(models[1]), cache=cache_path)
    pipe = Pipeline(tiny_lm, retriever=store, stages=[refrag], k=2, max_new_tokens=2)
    answer = pipe.ask("the farmer kept sheep")
    extra = answer.stats.get("refrag").extra
    assert extra["cached_chunks"] == extra["chunks"] > 0
    assert [p.id for p in answer.sources] == [p.id for p in passages]
