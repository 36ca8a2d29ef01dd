"""CoLoR's compressor on a real vLLM CPU server: SmolLM2-135M with its packaged adapter merged in by ``ctxopt train
color-merge``, served like any model. The engine's summaries are the local compressor's (transformers, the same
weights), they are cached under the engine's identity, and a wrong or absent engine is refused clearly."""
from __future__ import annotations

import pytest
import torch
from conftest import require_engine_venv
from engine_server import start_engine

import ctxopt.compressors.color as color_module
from ctxopt.cli import main
from ctxopt.compressors.color import CoLoR
from ctxopt.errors import EngineError, InputError
from ctxopt.models import load_model
from ctxopt.training.color import merge_compressor
from ctxopt.types import Passage

pytestmark = pytest.mark.real_model

PASSAGES = [
    "The Harbour Museum opened in 1901 in the old customs house. Its founder, the shipwright Ada Lind, gave her "
    "collection of ship models to the town, and the museum still shows them in the east wing, beside the vault "
    "whose code, 4817, is known only to the keeper.",
    "Plastic optical fiber is an optical fiber made of polymer. Like glass fiber it carries light by total "
    "internal reflection, but it bends and stretches without breaking, so it is used in cars and in homes, "
    "where short links matter more than loss over long distances.",
    "The 2014 Belgian Grand Prix was a Formula One race held on 24 August 2014 at the Circuit de Spa-Francorchamps. "
    "It was the twelfth round of the season. Daniel Ricciardo won it for Red Bull, ahead of Nico Rosberg and "
    "Valtteri Bottas, after the two Mercedes drivers touched on the second lap.",
]


@pytest.fixture(scope="module")
def merged_folder(tmp_path_factory, engine_model_folder):
    out = tmp_path_factory.mktemp("merged") / "smollm2-135m-color"
    assert main(["train", "color-merge", "--base", "smollm2-135m", "--out", str(out), "--dtype", "float32"]) == 0
    return out


@pytest.fixture(scope="module")
def color_engine(merged_folder):
    require_engine_venv()
    # Summaries need little KV cache: 1 GiB leaves memory for the session's engine, should it be up too.
    with start_engine(merged_folder, served_name="color", max_model_len=2048,
                      env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        yield server


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXOPT_CACHE", str(tmp_path / "cache"))


def test_color_merge_writes_the_adapted_compressor(merged_folder, engine_model_folder):
    merged = load_model(str(merged_folder), "cpu", torch.float32, progress=False).model.state_dict()
    base = load_model(str(engine_model_folder), "cpu", torch.float32, progress=False).model.state_dict()
    adapted = [name for name in base if not torch.equal(base[name], merged[name])]
    assert adapted and all(".layers." in name for name in adapted)  # the LoRA layers changed, nothing else


def test_color_merge_refuses_what_it_cannot_merge(tmp_path):
    with pytest.raises(InputError, match="holds no adapter_model.safetensors"):
        merge_compressor("smollm2-135m", str(tmp_path), tmp_path / "out")
    with pytest.raises(InputError, match="--dtype must be a torch dtype"):
        merge_compressor("smollm2-135m", "auto", tmp_path / "out", dtype="bf17")
    assert not (tmp_path / "out").exists()


def test_the_engines_summaries_are_the_local_compressors(color_engine, merged_folder):
    engine_stage = CoLoR(compressor="smollm2-135m", compressor_engine=color_engine.base_url, cache=False,
                         progress=False)
    local = load_model(str(merged_folder), "cpu", torch.bfloat16, progress=False)
    local_stage = CoLoR(compressor=local, adapter=None, cache=False, progress=False)
    on_engine, _ = engine_stage.summarised(PASSAGES)
    reference, _ = local_stage.summarised(PASSAGES)
    assert on_engine == reference
    assert all(summary.strip() for summary in on_engine)
    local_identity = CoLoR(compressor="smollm2-135m").compressor_identity()  # base + packaged adapter's hash
    assert engine_stage.compressor_identity() == f"engine:color+color:{local_identity}"


def test_engine_summaries_are_cached_apart_from_local_ones(color_engine, private_cache, monkeypatch):
    stage = CoLoR(compressor="smollm2-135m", compressor_engine=color_engine.base_url, progress=False)
    passages = [Passage(text, source=f"doc{i}") for i, text in enumerate(PASSAGES)]
    first = stage.compress("", passages)

    def refuse(*_, **__):
        raise AssertionError("summarised again")

    monkeypatch.setattr(color_module, "engine_summarise", refuse)
    again = CoLoR(compressor="smollm2-135m", compressor_engine=color_engine.base_url, progress=False)
    assert again.compress("", passages) == first
    local_identity = CoLoR(compressor="smollm2-135m").compressor_identity()
    assert stage.fingerprint(stage.compressor_identity()) != stage.fingerprint(local_identity)


def test_an_engine_serving_another_model_is_refused(tiny_lm, color_engine):
    stage = CoLoR(compressor=tiny_lm, compressor_engine=color_engine.base_url, progress=False)
    with pytest.raises(EngineError, match="tokenizes text differently"):
        stage.compress("", [Passage(PASSAGES[0])])


def test_an_unreachable_compressor_engine_names_its_url(tiny_lm):
    stage = CoLoR(compressor=tiny_lm, compressor_engine="http://127.0.0.1:9/v1", progress=False)
    with pytest.raises(EngineError, match="http://127.0.0.1:9/v1 is not reachable"):
        stage.compress("", [Passage(PASSAGES[0])])
