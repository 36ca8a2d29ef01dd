"""The Pipeline on a tiny random model: modes, stats, baselines, batch answering and bad input."""
import pytest

from ctxopt.errors import ContextTooLongError, InputError
from ctxopt.pipeline import Pipeline
from ctxopt.stages import Truncate, resolve_budget
from ctxopt.types import Passage

DOC = " ".join(f"Sentence {i} says the colour of box {i} is blue." for i in range(60))


class ListRetriever:
    def __init__(self, passages):
        self.passages = passages

    def retrieve(self, question, k):
        return self.passages[:k]


def test_long_document_mode_records_stats(tiny_lm):
    answer = Pipeline(tiny_lm, max_new_tokens=8).ask("What colour is box 3?", context=DOC)
    names = [s.stage for s in answer.stats.stages]
    assert names == ["prompt", "prefill", "decode"]
    prompt, prefill = answer.stats.get("prompt"), answer.stats.get("prefill")
    assert prompt.tokens_out == prefill.tokens_in == prefill.tokens_out == len(answer.prompt)
    decode = answer.stats.get("decode")  # TTFT: building the prompt, the prefill, the first decode step
    assert answer.stats.ttft_seconds == prompt.seconds + prefill.seconds + decode.extra["first_token_seconds"]
    assert prefill.kv_bytes > 0 and prefill.peak_memory_bytes > 0
    assert answer.stats.get("decode").tokens_out == len(answer.token_ids) == 8
    assert answer.sources[0].text == DOC
    assert answer.stats.ttft_seconds <= answer.stats.total_seconds


def test_an_answer_that_ends_at_once_has_no_decode_rate(tiny_lm, monkeypatch):
    pipe = Pipeline(tiny_lm, max_new_tokens=4)
    answer = pipe.ask("What colour is box 3?", context=DOC)
    assert answer.stats.get("decode").extra["tokens_per_second"] > 0
    monkeypatch.setattr(tiny_lm.model.generation_config, "eos_token_id", answer.token_ids[0])
    empty = pipe.ask("What colour is box 3?", context=DOC)
    assert empty.token_ids == [] and empty.stats.get("decode").extra["tokens_per_second"] is None  # not 0 tok/s


def test_rag_mode_uses_the_retriever_and_cites_kept_passages(tiny_lm):
    passages = [Passage(f"Passage number {i} about topic {i}.", source=f"doc{i}.txt") for i in range(6)]
    pipe = Pipeline(tiny_lm, retriever=ListRetriever(passages), k=3, max_new_tokens=4)
    answer = pipe.ask("Which topic?")
    assert [p.source for p in answer.sources] == ["doc0.txt", "doc1.txt", "doc2.txt"]
    assert answer.stats.stages[0].stage == "retrieve"
    assert pipe.ask("Which topic?", k=2).sources == passages[:2]


def test_truncate_keeps_question_and_both_ends(tiny_lm):
    answer = Pipeline(tiny_lm, stages=[Truncate(120)], max_new_tokens=4).ask("What colour is box 3?", context=DOC)
    prompt = answer.prompt
    assert len(prompt) == 120
    text = prompt.kept_text(0)
    assert text.startswith("Sentence 0 says") and text.endswith("box 59 is blue.")
    assert "What colour is box 3?" in prompt.text
    record = answer.stats.get("truncate")
    assert record.tokens_in > record.tokens_out == 120


def test_budget_larger_than_context_is_a_noop_with_a_note(tiny_lm):
    full = Pipeline(tiny_lm, max_new_tokens=6).ask("Colour?", context="Box 1 is blue.")
    kept = Pipeline(tiny_lm, stages=[Truncate(10_000)], max_new_tokens=6).ask("Colour?", context="Box 1 is blue.")
    assert kept.token_ids == full.token_ids
    assert any("nothing dropped" in n for n in kept.stats.stages[-1].extra["notes"])


@pytest.mark.parametrize("budget", [0, -5, 1.5, "100", True])
def test_bad_budgets_are_rejected(budget):
    with pytest.raises(InputError):
        resolve_budget(budget, 100)


def test_ratio_budget():
    assert resolve_budget(0.25, 400) == 100 and resolve_budget(1.0, 400) == 400 and resolve_budget(512, 400) == 400


def test_context_longer_than_positions(tiny_tokenizer):
    from conftest import make_tiny_lm

    lm = make_tiny_lm(tiny_tokenizer)
    lm.model.config.max_position_embeddings = 256
    long_doc = DOC * 3
    with pytest.raises(ContextTooLongError, match="256 positions"):
        Pipeline(lm, max_new_tokens=8).ask("Colour?", context=long_doc)
    answer = Pipeline(lm, max_new_tokens=8, truncate=True).ask("Colour?", context=long_doc)
    assert len(answer.prompt) == 256 - 8


def test_ask_many_shares_the_prefix_and_matches_ask(tiny_lm):
    pipe = Pipeline(tiny_lm, max_new_tokens=6)
    questions = ["What colour is box 3?", "What colour is box 40?", "Which box is blue?"]
    batch = pipe.ask_many(questions, context=DOC)
    single = [pipe.ask(q, context=DOC) for q in questions]
    assert [a.token_ids for a in batch] == [a.token_ids for a in single]
    shared = batch[0].stats.get("prefill_shared")
    assert shared.tokens_in > 0.9 * len(single[0].prompt)
    assert batch[1].stats.get("prefill").tokens_in < 20


def test_streaming_concatenates_to_the_answer(tiny_lm):
    pieces = []
    answer = Pipeline(tiny_lm, max_new_tokens=10).ask("Colour?", context=DOC, on_text=pieces.append)
    assert "".join(pieces).strip() == answer.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(question="", context=DOC), "question is empty"),
        (dict(question="Colour?", context="   "), "context is empty"),
        (dict(question="Colour?"), "no retriever"),
    ],
)
def test_bad_input(tiny_lm, kwargs, message):
    with pytest.raises(InputError, match=message):
        Pipeline(tiny_lm).ask(**kwargs)


def test_bad_stage_and_generation_options(tiny_lm):
    with pytest.raises(InputError, match="not a ctxopt stage"):
        Pipeline(tiny_lm, stages=[object()])
    with pytest.raises(InputError, match="max_new_tokens"):
        Pipeline(tiny_lm).ask("Colour?", context=DOC, max_new_tokens=0)


def test_compress_then_generate_is_ask(tiny_lm):
    pipe = Pipeline(tiny_lm, stages=[Truncate(120)], max_new_tokens=6)
    prompt = pipe.compress("What colour is box 3?", context=DOC)
    assert len(prompt) == 120 and [r.stage for r in prompt.stats.stages] == ["prompt", "truncate"]
    answer = pipe.generate(prompt)
    assert answer.token_ids == pipe.ask("What colour is box 3?", context=DOC).token_ids
    assert [r.stage for r in answer.stats.stages] == ["prompt", "truncate", "prefill", "decode"]
    assert answer.prompt is prompt and answer.stats is prompt.stats  # one ledger from retrieval to the last token


def test_ask_many_truncates_an_over_long_context_like_ask(tiny_tokenizer):
    from conftest import make_tiny_lm

    lm = make_tiny_lm(tiny_tokenizer)
    lm.model.config.max_position_embeddings = 256
    pipe = Pipeline(lm, max_new_tokens=8, truncate=True)
    questions = ["What colour is box 3?", "Which box is the last one?"]
    batch = pipe.ask_many(questions, context=DOC * 3)
    single = [pipe.ask(q, context=DOC * 3) for q in questions]
    assert all(len(a.prompt) == 256 - 8 for a in batch)  # was prefilled past the model's positions before
    assert [a.token_ids for a in batch] == [a.token_ids for a in single]
    assert batch[0].stats.get("prefill_shared").tokens_in > 100  # the template and the context's kept head
    assert any("truncated" in n for n in batch[0].stats.stages[-1].extra["notes"])


def test_ask_many_shares_the_prefix_through_token_stages(tiny_lm):
    pipe = Pipeline(tiny_lm, stages=[Truncate(200)], max_new_tokens=6)
    questions = ["What colour is box 3?", "What colour is box 40?"]
    batch = pipe.ask_many(questions, context=DOC)
    single = [pipe.ask(q, context=DOC) for q in questions]
    assert [a.token_ids for a in batch] == [a.token_ids for a in single]
    assert [a.prompt.input_ids.tolist() for a in batch] == [a.prompt.input_ids.tolist() for a in single]
    shared = batch[0].stats.get("prefill_shared")
    assert shared.tokens_in > 50 and shared is batch[1].stats.get("prefill_shared")
    assert [r.stage for r in batch[0].stats.stages] == ["prompt", "truncate", "prefill_shared", "prefill", "decode"]


def test_ask_many_with_a_cache_stage_answers_each_question_alone(tiny_lm):
    from ctxopt.compressors.snapkv import SnapKV

    pipe = Pipeline(tiny_lm, stages=[SnapKV(budget=96, window=8)], max_new_tokens=6)
    questions = ["What colour is box 3?", "What colour is box 40?"]
    batch = pipe.ask_many(questions, context=DOC)
    single = [pipe.ask(q, context=DOC) for q in questions]
    assert [a.token_ids for a in batch] == [a.token_ids for a in single]
    assert all(a.stats.get("prefill_shared") is None and a.stats.get("snapkv").tokens_out == 96 for a in batch)


def test_rag_takes_a_ratio_of_the_context(tiny_lm):
    from ctxopt.methods import build_stages
    from ctxopt.text import count_tokens

    stages = build_stages("rag", 0.25, chunk_tokens=16)
    pipe = Pipeline(tiny_lm, stages=stages, embedder=WordEmbedder(), max_new_tokens=2)
    answer = pipe.ask("What colour is box 3?", context=DOC)
    kept = count_tokens(tiny_lm.tokenizer, answer.prompt.passages)
    assert 0 < kept <= round(0.25 * count_tokens(tiny_lm.tokenizer, DOC))
    with pytest.raises(InputError, match="ratio and must be in"):
        Pipeline(tiny_lm, stages=build_stages("rag", 1.5), embedder=WordEmbedder()).ask("Colour?", context=DOC)


class WordEmbedder:
    """Bag-of-words vectors over a fixed vocabulary: enough to rank chunks, no model."""

    def embed(self, texts):
        import numpy as np

        vocab = ["box", "3", "colour", "blue", "sentence"]
        rows = [[text.lower().split().count(word) for word in vocab] for text in texts]
        return np.asarray(rows, dtype="float32") + 1e-3
