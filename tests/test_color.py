"""CoLoR (passage compression by a trained compressor LM), the extractive baseline, the preference-data
builder and the ORPO trainer, on the tiny random model."""
from __future__ import annotations

import argparse
import copy
import json
import math

import numpy as np
import pytest
import torch

from ctxopt.compressors import color as color_module
from ctxopt.compressors.color import (
    CoLoR,
    SummaryCache,
    generate_text,
    packaged_adapter,
    summary_prompt,
    with_adapter,
)
from ctxopt.compressors.extractive import Extractive, extract
from ctxopt.decoding import GenerationConfig
from ctxopt.errors import InputError
from ctxopt.methods import METHODS, build_stages
from ctxopt.pipeline import Pipeline
from ctxopt.stages import Run
from ctxopt.training import color as training
from ctxopt.training.color import JudgeCase, choose_pair, orpo_loss
from ctxopt.types import Passage, Stats

PASSAGES = [
    Passage("The harbour museum opened in 1901. Its vault code is 4471. It has a red door.", source="a.md",
            span=(10, 90), metadata={"title": "Museum", "page": 3}),
    Passage("The lighthouse keeper rows to town on Sundays. The lamp was rebuilt in 1950.", source="b.md",
            metadata={"title": "Lighthouse"}),
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXOPT_CACHE", str(tmp_path / "cache"))


def scripted(outputs: dict[str, str]):
    """A generate_text stand-in: the summary of each passage text looked up in ``outputs``."""
    def fake(lm, prompts, max_new_tokens, batch_size=8, progress=False, desc="", max_tokens=None,
             temperature=0.0):
        return [next(v for k, v in outputs.items() if k in p) for p in prompts]
    return fake


def stage(tiny_lm, **knobs) -> CoLoR:
    return CoLoR(compressor=tiny_lm, adapter=None, progress=False, **knobs)


def test_empty_or_longer_summary_falls_back_to_the_original(tiny_lm, monkeypatch):
    monkeypatch.setattr(color_module, "generate_text",
                        scripted({"harbour": "", "lighthouse": PASSAGES[1].text + " More."}))
    out = stage(tiny_lm).compress("q", PASSAGES)
    assert [p.text for p in out] == [p.text for p in PASSAGES]
    monkeypatch.setattr(color_module, "generate_text", scripted({"harbour": "Vault code 4471.", "lighthouse": ""}))
    assert ([p.text for p in stage(tiny_lm, cache=False).compress("q", PASSAGES)]
            == ["Vault code 4471.", PASSAGES[1].text])
    assert ([p.text for p in stage(tiny_lm, cache=False, fallback="drop").compress("q", PASSAGES)]
            == ["Vault code 4471."])
    with pytest.raises(InputError):
        stage(tiny_lm, fallback="nope")


def test_summaries_keep_source_span_id_and_metadata(tiny_lm, monkeypatch):
    monkeypatch.setattr(color_module, "generate_text", scripted({"harbour": "Museum: 1901, code 4471.",
                                                                   "lighthouse": "Lamp rebuilt 1950."}))
    out = stage(tiny_lm).compress("q", PASSAGES)
    for before, after in zip(PASSAGES, out):
        assert after.text != before.text
        assert ((after.source, after.span, after.id, after.metadata)
                == (before.source, before.span, before.id, before.metadata))


def test_cache_hit_avoids_the_model(tiny_lm, monkeypatch):
    first = stage(tiny_lm, max_new_tokens=6).compress("q", PASSAGES)

    def boom(*args, **kwargs):
        raise AssertionError("the model ran on a cached passage")

    monkeypatch.setattr(color_module, "generate_text", boom)
    again = stage(tiny_lm, max_new_tokens=6).compress("q", PASSAGES)
    assert [p.text for p in again] == [p.text for p in first]
    cached = SummaryCache(stage(tiny_lm, max_new_tokens=6).fingerprint(tiny_lm.name))
    assert all(cached.get(p.text) is not None for p in PASSAGES)


def test_a_long_passage_is_summarised_piece_by_piece_and_joined(tiny_lm):
    """A passage over ``passage_tokens`` is cut (no overlap, at most that many tokens a piece) and each piece is
    summarised as if it were a passage of its own; the summaries are joined into the one passage."""
    long = Passage(" ".join(p.text for p in PASSAGES * 4), source="long.md", span=(0, 999), metadata={"page": 1})
    cut = stage(tiny_lm, cache=False, max_new_tokens=4, passage_tokens=24)
    pieces = cut.pieces(tiny_lm.tokenizer, long.text)
    assert len(pieces) > 2 and all(len(tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 24
                                    for t in pieces)
    assert " ".join(pieces).split() == long.text.split()  # nothing lost, nothing repeated
    reference = stage(tiny_lm, cache=False, max_new_tokens=4).compress("q", [Passage(t) for t in pieces])
    [out] = cut.compress("q", [long])
    assert out.text == "\n".join(p.text for p in reference)
    assert (out.source, out.span, out.metadata) == (long.source, long.span, long.metadata)
    assert stage(tiny_lm).pieces(tiny_lm.tokenizer, long.text) == [long.text]  # under the default: whole
    with pytest.raises(InputError, match="passage_tokens"):
        stage(tiny_lm, passage_tokens=0)


def test_the_packaged_adapters_are_small_match_their_bases_and_are_the_default():
    for compressor in ("smollm2-135m", "qwen2.5-coder-0.5b"):
        folder = packaged_adapter(compressor)
        assert folder is not None and (folder / "adapter_model.safetensors").stat().st_size < 10 * 2**20
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == compressor
    assert packaged_adapter("Qwen-0.5B") == packaged_adapter("qwen2.5-coder-0.5b")  # an alias finds it too
    assert CoLoR().adapter == "auto" and packaged_adapter("qwen2.5-coder-1.5b") is None


def test_batched_greedy_generation_matches_one_at_a_time(tiny_lm):
    prompts = [summary_prompt(tiny_lm.tokenizer, p.text) for p in PASSAGES]
    batched = generate_text(tiny_lm, prompts, 5, batch_size=2)
    assert batched == [generate_text(tiny_lm, [p], 5, batch_size=1)[0] for p in prompts]


def test_sampled_generation_is_seeded_and_leaves_greedy(tiny_lm):
    prompts = [summary_prompt(tiny_lm.tokenizer, PASSAGES[0].text)] * 4
    greedy = generate_text(tiny_lm, prompts, 8)
    torch.manual_seed(3)
    sampled = generate_text(tiny_lm, prompts, 8, temperature=1.0)
    torch.manual_seed(3)
    assert generate_text(tiny_lm, prompts, 8, temperature=1.0) == sampled
    assert len(set(greedy)) == 1 and len(set(sampled)) > 1 and greedy[0] not in sampled


class WordEmbedder:
    """Bag-of-words vectors: cosine similarity = shared words."""

    def __init__(self, vocabulary: list[str]):
        self.vocabulary = vocabulary

    def embed(self, texts):
        rows = np.array([[float(w in t.lower()) for w in self.vocabulary] for t in texts], dtype=np.float32)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


def test_extractive_keeps_the_most_similar_sentences_within_budget(tiny_lm):
    text = "The vault code is 4471. The door is red. The museum opened in 1901 near the vault."
    embedder = WordEmbedder(["vault", "code", "door", "museum", "red"])
    sizes = [len(tiny_lm.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in
             ("The vault code is 4471.", "The door is red.", "The museum opened in 1901 near the vault.")]
    kept = extract("What is the vault code?", text, sizes[0], tiny_lm.tokenizer, embedder)
    assert kept == "The vault code is 4471."
    both = extract("What is the vault code?", text, sizes[0] + sizes[2], tiny_lm.tokenizer, embedder)
    assert both == "The vault code is 4471. The museum opened in 1901 near the vault."  # text order kept
    assert extract("door?", text, 1, tiny_lm.tokenizer, embedder) == "The door is red."  # at least one sentence

    run = Run(tiny_lm, "What is the vault code?", GenerationConfig(), embedder=lambda: embedder)
    # Without a Pipeline's prompt builder the budget is of the passages' own tokens: 0.4 of the text.
    out = Extractive(budget=0.4).compress(run.question, [Passage(text, source="s", metadata={"k": 1})], run)
    assert out[0].text == "The vault code is 4471." and out[0].metadata == {"k": 1} and out[0].source == "s"


def test_orpo_loss_matches_a_hand_computation():
    # One pair, vocabulary of 2; the prompt is token 0 (label -100), responses: chosen 1 token, rejected 3 tokens.
    logits = torch.zeros(2, 4, 2)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0)])  # p(token 1) = 3/4
    labels = torch.tensor([[-100, 1, -100, -100], [-100, 0, 0, 0]])  # rejected: p(token 0) = 1/2 each
    loss, nll, odds = orpo_loss(logits, labels, beta=2.5, length_coef=0.1)
    chosen, rejected = math.log(0.75), math.log(0.5)
    log_odds = (chosen - rejected) - (math.log(1 - 0.75) - math.log(1 - 0.5))
    scale = max(0.1 * (3 - 1), 1.0)  # = 1: a 2-token difference is below the length term's floor
    expected_odds = math.log(1 / (1 + math.exp(-scale * log_odds)))
    assert nll.item() == pytest.approx(-chosen)
    assert odds.item() == pytest.approx(expected_odds)
    assert loss.item() == pytest.approx(-chosen - 2.5 * expected_odds)
    # A long rejected response (30 tokens more) scales the log-odds by 0.1 * 30 = 3.
    long_labels = torch.tensor([[-100] + [1] + [-100] * 30, [-100] + [0] * 31])
    long_logits = torch.zeros(2, 32, 2)
    long_logits[0, 0] = torch.tensor([0.0, math.log(3.0)])
    _, _, long_odds = orpo_loss(long_logits, long_labels, beta=2.5, length_coef=0.1)
    assert long_odds.item() == pytest.approx(math.log(1 / (1 + math.exp(-3.0 * log_odds))))


def test_chosen_is_the_shortest_success_and_rejected_the_longest_failure():
    def c(tokens, success, text=None):
        return {"tokens": tokens, "success": success, "text": text or f"t{tokens}", "source": "s"}

    chosen, rejected = choose_pair([c(50, True), c(20, True), c(90, False), c(60, False), c(10, False)])
    assert (chosen["tokens"], rejected["tokens"]) == (20, 90)
    assert choose_pair([c(10, False), c(20, False)]) is None  # no success
    assert choose_pair([c(10, True), c(20, True)]) is None  # no failure


def test_pairs_can_be_limited_to_candidates_the_compressor_wrote(tmp_path):
    def c(source, tokens, success):
        return {"source": source, "text": f"{source}-{tokens}", "tokens": tokens, "success": success}

    records = [{"key": "a", "question_id": "qa", "question": "?", "passage": "P", "original_success": True,
                "candidates": [c("extractive:0.25", 10, True), c("summary:m", 40, True), c("sample:m:0", 30, False),
                               c("sample:m:1", 60, False)]},
               {"key": "b", "question_id": "qb", "question": "?", "passage": "P", "original_success": True,
                "candidates": [c("extractive:0.25", 10, True), c("summary:m", 40, False)]}]
    (tmp_path / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def pairs(sources):
        counts = training.write_pairs(tmp_path, 0.0, 0.0, sources)
        return counts, [json.loads(line) for line in (tmp_path / "train.jsonl").open()]

    counts, rows = pairs(())
    assert counts["train"] == 2 and [r["chosen_source"] for r in rows] == ["extractive:0.25"] * 2
    counts, rows = pairs(("summary", "sample"))
    assert counts["train"] == 1 and counts["no_success"] == 1  # b's only success was the extract
    assert (rows[0]["chosen_source"], rows[0]["rejected_source"]) == ("summary:m", "sample:m:1")
    assert training.pair_sources(" summary, sample ") == ("summary", "sample") and training.pair_sources("") == ()
    with pytest.raises(InputError, match="summaries"):
        training.pair_sources("summaries")


def test_retrieval_judge_names_an_id_and_evidence_judge_checks_spans(tiny_lm):
    case = JudgeCase("k", "q1", "Who?", ["x"], "CANDIDATE", ["d0", "d1"], slot=1)
    texts = training.with_candidate(case, "SHORT")
    assert texts == ["d0", "SHORT", "d1"]
    request = training.loft_request(case.question, texts)
    assert "ID: 1 | CONTENT: SHORT | END ID: 1" in request and request.endswith("query: Who?")
    assert training.pick_id(tiny_lm, case.question, texts) in (0, 1, 2)
    assert training.RetrievalJudge(tiny_lm)(case, "SHORT") == (training.pick_id(tiny_lm, "Who?", texts) == 1)
    judge = training.EvidenceJudge()
    span_case = JudgeCase("k", "q", "code?", ["4471"], "The code of Eldermoor is 4471.", [], 0,
                          ["Eldermoor", "Nowhere"])
    assert (judge(span_case, "eldermoor code 4471") and not judge(span_case, "code 4471")
            and not judge(span_case, "a code"))


def test_answer_judge_reads_the_candidate_with_the_other_hops_and_thresholds_f1(tiny_lm):
    from types import SimpleNamespace

    judge = training.AnswerJudge(tiny_lm, min_f1=0.5)
    asked = []
    replies = iter(["Paris, France", "Lyon"])
    judge.pipe = SimpleNamespace(ask=lambda question, context: asked.append(context) or
                                 SimpleNamespace(text=next(replies)))
    case = JudgeCase("k", "q", "Where?", ["Paris"], "ORIGINAL", ["d0", "d1"], 1, ["Hop"], ["The hop text."])
    assert judge(case, "SHORT")  # F1("Paris, France", "Paris") = 2/3 >= 0.5
    assert not judge(case, "SHORTER")  # F1 0
    assert asked == [["SHORT", "The hop text."], ["SHORTER", "The hop text."]]  # no distractors


def test_composed_methods_share_budget_and_options(tiny_lm):
    spec = METHODS.get("color+specpc+speckv")
    assert spec.needs_budget and {"compressor", "draft", "window"} <= set(spec.options)
    assert METHODS.get("color+nope") is None and not METHODS["color"].needs_budget
    stages = build_stages("color+truncate", 0.9, compressor=tiny_lm, adapter=False, max_new_tokens=4)
    assert [s.name for s in stages] == ["color", "truncate"] and stages[0].adapter is None
    stages[0].progress = False
    answer = Pipeline(tiny_lm, stages=stages, max_new_tokens=3).ask("Vault code?", context=PASSAGES)
    assert [r.stage for r in answer.stats.stages][:3] == ["color", "prompt", "truncate"]
    assert {p.source for p in answer.prompt.passages} == {"a.md", "b.md"}


def test_langchain_document_compressor_runs_color(tiny_lm):
    from langchain_core.documents import Document

    from ctxopt.integrations.langchain import CtxoptDocumentCompressor

    compressor = CtxoptDocumentCompressor(model=tiny_lm, method="color", budget=None,
                                          options={"compressor": tiny_lm, "adapter": False, "max_new_tokens": 4})
    documents = [Document(page_content=p.text, metadata={"title": p.metadata["title"]}, id=f"d{i}")
                 for i, p in enumerate(PASSAGES)]
    out = compressor.compress_documents(documents, "What is the vault code?")
    assert [d.id for d in out] == ["d0", "d1"] and all(d.metadata["ctxopt_method"] == "color" for d in out)
    assert all(d.metadata["ctxopt_tokens_out"] <= d.metadata["ctxopt_tokens_in"] for d in out)


# -- data builder and trainer end to end --------------------------------------------------------------------
def cases(n: int) -> list[JudgeCase]:
    return [JudgeCase(f"k{i}", f"q{i}", f"What is code {i}?", [str(1000 + i)],
                      f"Report {i}. The code is {1000 + i}. The weather was mild and the roads were long.",
                      ["A distractor about boats.", "Another one about bread."], i % 3) for i in range(n)]


def test_sampled_candidates_are_seeded_per_case_and_index(tiny_lm, monkeypatch):
    """Sample indices added by a later run are new draws, not the earlier indices' summaries again."""
    monkeypatch.setattr(color_module, "load_model", lambda *a, **k: tiny_lm)
    few = cases(2)

    def draw(samples, have=None):
        return training.candidate_texts(few, ["tiny"], [], tiny_lm, 8, 4, samples, 1.0, have, seed=0)

    first = draw(2)
    assert draw(2) == first  # the same draws whatever the global stream did in between
    more = draw(4, [{source for source, _ in row} for row in first])
    assert [[source for source, _ in row] for row in more] == [["sample:tiny:2", "sample:tiny:3"]] * 2
    assert [[text for _, text in row] for row in more] != [[text for _, text in row[1:]] for row in first]


def test_data_builder_and_trainer_end_to_end(tiny_lm, tmp_path, monkeypatch):
    def tiny_everywhere():
        monkeypatch.setattr(training, "training_cases", lambda questions, seed, distractors: cases(questions))
        monkeypatch.setattr("ctxopt.models.load_model", lambda *a, **k: tiny_lm)
        monkeypatch.setattr(color_module, "load_model", lambda *a, **k: tiny_lm)

    tiny_everywhere()
    data = tmp_path / "data"
    args = argparse.Namespace(out=str(data), questions=8, seed=0, compressors="tiny", ratios="0.3,0.6,1.0",
                              judge="evidence", target="tiny", distractors=2, min_f1=0.5, max_new_tokens=8,
                              heldout=0.25, batch_size=4, samples=2, temperature=1.0, candidates_from=None,
                              pair_sources="")
    counts = training.build_preference_data(args)
    assert counts["passages"] == 8 and counts["train"] + counts["heldout"] >= 1
    candidates = [json.loads(line) for line in (data / "candidates.jsonl").open()]
    assert [c["source"] for c in candidates[0]["candidates"]] == [
        "summary:tiny", "sample:tiny:0", "sample:tiny:1", "extractive:0.3", "extractive:0.6", "extractive:1.0"]
    rows = [json.loads(line) for line in (data / "train.jsonl").open()] + \
           [json.loads(line) for line in (data / "heldout.jsonl").open()]
    for row in rows:  # the shortest candidate that kept the code, the longest that lost it
        assert row["chosen"] != row["rejected"] and row["question"].split()[-1].rstrip("?") in row["passage"]
    assert training.build_preference_data(args)["passages"] == 8  # resumed: nothing judged twice

    # Built again from the first run's candidates with the same judging: nothing generated, nothing judged.
    def refuse(*_, **__):
        raise AssertionError("generated or judged again")

    monkeypatch.setattr(color_module.CoLoR, "summaries", refuse)
    monkeypatch.setitem(training.JUDGES, "evidence", lambda *_, **__: refuse)
    again = tmp_path / "again"
    training.build_preference_data(argparse.Namespace(**{**vars(args), "out": str(again),
                                                         "candidates_from": str(data)}))
    reused = [json.loads(line) for line in (again / "candidates.jsonl").open()]
    assert [r["candidates"] for r in reused] == [r["candidates"] for r in candidates]
    assert json.loads((again / "color-data.json").read_text())["judging"]["judge"] == ["evidence"]

    # A second compressor, one more sample and a new ratio, judged with another threshold: only the new sources
    # are generated, and every candidate, old and new, is judged again.
    monkeypatch.undo()
    tiny_everywhere()
    summarised = []
    original_summaries = color_module.CoLoR.summaries
    monkeypatch.setattr(color_module.CoLoR, "summaries",
                        lambda stage, texts, name, write: summarised.append(stage.compressor) or original_summaries(
                            stage, texts, name, write))
    judged = []
    evidence = training.EvidenceJudge()
    monkeypatch.setitem(training.JUDGES, "evidence",
                        lambda *_, **__: lambda case, text: judged.append(text) or evidence(case, text))
    grown = tmp_path / "grown"
    training.build_preference_data(argparse.Namespace(**{**vars(args), "out": str(grown), "min_f1": 0.9,
                                                         "compressors": "tiny,tiny2", "ratios": "0.3,0.8", "samples": 3,
                                                         "candidates_from": str(data)}))
    assert set(summarised) == {"tiny2"}
    for before, after in zip(candidates, (json.loads(line) for line in (grown / "candidates.jsonl").open())):
        assert after["original_success"] == before["original_success"]
        if before["original_success"]:
            assert after["candidates"][:6] == before["candidates"]  # judged again, to the same verdicts
            assert [c["source"] for c in after["candidates"][6:]] == [
                "sample:tiny:2", "summary:tiny2", "sample:tiny2:0", "sample:tiny2:1", "sample:tiny2:2",
                "extractive:0.8"]
    assert len(judged) == 8 + sum(len(r["candidates"]) + 6 for r in candidates if r["original_success"])
    with pytest.raises(InputError, match="no candidates.jsonl"):
        training.earlier_run(tmp_path)
    with pytest.raises(InputError, match="--judge"):
        training.judge_names("evidence,answers")

    out = tmp_path / "adapter"
    train_args = argparse.Namespace(data=str(data), out=str(out), base="tiny", epochs=15.0, lr=5e-3, beta=2.5,
                                    length_coef=0.1, lora_r=4, lora_alpha=8, layers=2, batch_size=2,
                                    max_length=128, seed=0, resume=False)
    summary = training.train_compressor(train_args, lm=tiny_lm)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "color.json").read_text())["beta"] == 2.5
    losses = [e["loss"] for e in json.loads((out / "training_log.json").read_text()) if "loss" in e]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert summary["train_pairs"] >= 1

    # Save/load: the merged adapter reproduces the trained (unmerged) model's logits and changes the base's.
    from peft import PeftModel

    unmerged = PeftModel.from_pretrained(copy.deepcopy(tiny_lm.model), str(out)).eval()
    merged = with_adapter(tiny_lm, out)
    ids = tiny_lm.tokenizer("The code is 1003.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got, base = unmerged(ids).logits, merged.model(ids).logits, tiny_lm.model(ids).logits
    assert torch.allclose(expected, got, atol=1e-4) and not torch.allclose(base, got, atol=1e-3)
    compressed = CoLoR(compressor=tiny_lm, adapter=out, max_new_tokens=6, progress=False, cache=False)
    direct = generate_text(merged, [summary_prompt(tiny_lm.tokenizer, PASSAGES[0].text)], 6)[0]
    text = compressed.compress("q", PASSAGES[:1])[0].text
    assert text in (direct, PASSAGES[0].text)


def benchmark_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_color_pool_pairs_pages_by_question_and_bootstraps_the_difference(tmp_path):
    color_pool = benchmark_module("color_pool")
    for page, ids in (("p1", ["a", "b"]), ("p2", ["c"])):
        rows = [{"id": q, "f1": 0.5, "tokens_in": 10, "tokens_out": 5} for q in ids]
        (tmp_path / f"{page}.json").write_text(json.dumps({"results": {"m": {"rows": rows}}}))
    label, rows = color_pool.pooled_rows(f"x={tmp_path / 'p1.json'},{tmp_path / 'p2.json'}:m")
    assert label == "x" and sorted(rows) == ["a", "b", "c"]
    assert color_pool.bootstrap_interval([0.2] * 5) == (0.2, 0.2)
    low, high = color_pool.bootstrap_interval([-1.0, 0.0, 1.0, 2.0], draws=2000)
    assert -1.0 <= low < 0.5 < high <= 2.0  # brackets the mean of 0.5, within the data's range


def test_color_eval_counts_evidence_kept_per_supporting_passage():
    from types import SimpleNamespace

    color_eval = benchmark_module("color_eval")
    museum = Passage("The Museum's vault code is 4471; the Lighthouse keeper knows it.",
                     metadata={"title": "Museum", "supporting": True})
    lighthouse = Passage("The keeper rows to town.", metadata={"title": "Lighthouse", "supporting": True})
    other = Passage("Bread is baked at dawn.", metadata={"title": "Bakery", "supporting": False})
    sample = SimpleNamespace(id="s", question="What is the vault code?", answers=["4471"],
                             passages=[museum, lighthouse, other])

    def shortened(text):
        return [Passage(text, metadata=museum.metadata), lighthouse, other]

    # Only the museum passage holds evidence (the answer and the bridge title "Lighthouse").
    assert color_eval.evidence_kept(sample, sample.passages) == [True]
    assert color_eval.evidence_kept(sample, shortened("Code 4471, known to the lighthouse keeper.")) == [True]
    assert color_eval.evidence_kept(sample, shortened("The vault code is known to the keeper.")) == [False]
    assert color_eval.evidence_kept(sample, [lighthouse, other]) == [False]  # dropped


def test_passages_an_index_already_compressed_are_served_without_the_compressor(tiny_lm):
    marked = Passage("Vault code 4471.", source="a.md", metadata={"ctxopt_precompressed": {"method": "color"}})
    stage = CoLoR(compressor="no-such-model")  # loading it would fail: nothing to summarise means no load
    run = Run(lm=tiny_lm, question="q", config=GenerationConfig(), stats=Stats())
    assert stage.compress("q", [marked], run) == [marked]
    assert any("already compressed by the index" in note for note in run.stats.notes)
