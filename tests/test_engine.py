"""ctxopt in front of a real vLLM CPU server (the session's ``engine`` fixture serves the converted SmolLM2):
the engine answers from exactly the token ids ctxopt kept, every engine-capable method runs there, and a
mismatched model, a method that needs the KV cache and concurrent calls behave as documented."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from ctxopt.errors import EngineError, InputError
from ctxopt.methods import build_stages
from ctxopt.pipeline import Pipeline

pytestmark = pytest.mark.real_model

FILLER = " ".join(f"The lighthouse keeper logged ship number {i} passing at dawn." for i in range(30))
DOC = FILLER + " The vault code of the Harbour Museum is 4817. " + FILLER
QUESTION = "What is the vault code of the Harbour Museum?"


def engine_pipeline(smollm, engine, method="full", budget=None, **options):
    stages = build_stages(method, budget, **options)
    return Pipeline(smollm, stages=stages, engine=engine.base_url, max_new_tokens=16)


def test_full_context_through_the_engine_answers_from_ctxopts_token_ids(smollm, engine):
    answer = engine_pipeline(smollm, engine).ask(QUESTION, context=DOC)
    record = answer.stats.get("decode:engine")
    assert "4817" in answer.text
    assert record.extra["engine_prompt_tokens"] == len(answer.prompt) == record.tokens_in
    assert [r.stage for r in answer.stats.stages] == ["prompt", "decode:engine"]
    assert 0 < answer.stats.ttft_seconds <= answer.stats.total_seconds


@pytest.mark.parametrize("method, budget, options", [
    ("truncate", 0.5, {}), ("gemfilter", 0.5, {}), ("specpc", 0.5, {}), ("extractive", 0.5, {}),
    ("rag", 0.5, {"chunk_tokens": 64}), ("specpc+extractive", 0.5, {}),
])
def test_engine_capable_methods_send_the_compressed_prompt(smollm, engine, method, budget, options):
    full = len(engine_pipeline(smollm, engine).compress(QUESTION, context=DOC))
    answer = engine_pipeline(smollm, engine, method, budget, **options).ask(QUESTION, context=DOC)
    assert answer.stats.get("decode:engine").extra["engine_prompt_tokens"] == len(answer.prompt) < full
    assert answer.text.strip()



def test_the_ctxopt_side_of_an_engine_loads_only_what_the_method_reads(engine):
    """Through an engine, rag/extractive/truncation read only the tokenizer, GemFilter its first layers:
    the served model's whole weights never load on ctxopt's side for them."""
    def ask(method):
        pipe = Pipeline("smollm2-135m", method=method, budget=0.5, engine=engine.base_url, dtype="bfloat16",
                        max_new_tokens=16)
        answer = pipe.ask(QUESTION, context=DOC)
        assert answer.stats.get("decode:engine").extra["engine_prompt_tokens"] == len(answer.prompt)
        return pipe.lm
    extractive, gemfilter = ask("extractive"), ask("gemfilter")
    assert extractive is gemfilter and not gemfilter.loaded
    layer = gemfilter.first_layers(22)  # SmolLM2's screened layer 21 and the layers before it
    assert len(layer.model.layers) == 22 and not gemfilter.loaded

def test_refrag_sends_its_chunk_embeddings(smollm, engine):
    answer = engine_pipeline(smollm, engine, "refrag").ask(QUESTION, context=DOC)
    positions = answer.stats.get("refrag").extra["decoder_positions"]
    assert answer.stats.get("decode:engine").extra["engine_prompt_tokens"] == positions < len(answer.prompt)
    assert answer.text.strip()


def test_streaming_and_stop_strings_pass_through(smollm, engine):
    pipe = engine_pipeline(smollm, engine)
    pieces = []
    answer = pipe.ask(QUESTION, context=DOC, on_text=pieces.append)
    assert "".join(pieces).strip() == answer.text
    cut = pipe.ask(QUESTION, context=DOC, stop_strings=("17",))
    assert "4817" not in cut.text and cut.text.strip()


def test_an_engine_serving_another_model_is_refused(tiny_lm, smollm, engine):
    with pytest.raises(EngineError, match="tokenizes text differently"):
        Pipeline(tiny_lm, engine=engine.base_url).ask(QUESTION, context=DOC)
    with pytest.raises(EngineError, match="does not serve 'other'"):
        Pipeline(smollm, engine=engine.base_url, engine_model="other").ask(QUESTION, context=DOC)


def test_cache_stages_and_rapid_are_refused_with_the_methods_that_run(smollm, engine):
    with pytest.raises(InputError, match="speckv \\(cache stage\\) cannot run on a serving engine"):
        engine_pipeline(smollm, engine, "speckv", 256)


def test_concurrent_chat_calls_reach_the_engine_together(smollm, engine):
    from langchain_core.messages import HumanMessage

    from ctxopt.integrations.langchain import CtxoptChatModel

    chat = CtxoptChatModel(model=smollm, engine=engine.base_url, max_new_tokens=16)
    messages = [[HumanMessage(DOC.replace("4817", code)), HumanMessage(QUESTION)] for code in ("4817", "5523")]

    async def both():
        return await asyncio.gather(*(chat.ainvoke(m) for m in messages))

    began = time.perf_counter()
    replies = asyncio.run(both())
    assert "4817" in replies[0].content and "5523" in replies[1].content
    assert all(r.response_metadata["ctxopt"]["stats"]["stages"][-1]["stage"] == "decode:engine" for r in replies)
    assert time.perf_counter() - began < 120


def test_cli_ask_through_the_engine(smollm, engine, tmp_path, capsys):
    from ctxopt.cli import main

    book = tmp_path / "book.txt"
    book.write_text(DOC, encoding="utf-8")
    code = main(["ask", QUESTION, "--file", str(book), "--method", "specpc", "--budget", "0.5",
                 "--engine", engine.base_url, "--max-new-tokens", "16", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["answer"]
    assert [s["stage"] for s in result["stats"]["stages"]] == ["prompt", "specpc", "decode:engine"]
