"""ctxopt.text: the library's one token count, one stable hash, and the sentence splitter's new home."""
import hashlib

import pytest

from ctxopt.bench import datasets
from ctxopt.text import count_tokens, sentence_spans, stable_hash
from ctxopt.types import Passage


def test_count_tokens_takes_text_passages_and_sequences_without_special_tokens(tiny_tokenizer):
    texts = ["The café is open.", "日本 and emoji 🎉", ""]
    each = [len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert count_tokens(tiny_tokenizer, "hello world") == 2  # MiniLM would add [CLS] and [SEP]
    assert count_tokens(tiny_tokenizer, texts[0]) == each[0]
    assert count_tokens(tiny_tokenizer, Passage(text=texts[1], source="a")) == each[1]
    assert count_tokens(tiny_tokenizer, texts) == sum(each)
    assert count_tokens(tiny_tokenizer, [Passage(text=texts[0]), texts[1]]) == each[0] + each[1]
    assert count_tokens(tiny_tokenizer, (t for t in texts)) == sum(each)
    assert count_tokens(tiny_tokenizer, []) == 0 and count_tokens(tiny_tokenizer, "") == 0


def test_count_tokens_with_an_encode_only_tokenizer():
    class Words:  # tiktoken-style: not callable, encode(text) adds nothing
        def encode(self, text):
            return text.split()

    assert count_tokens(Words(), ["a b c", Passage(text="d e")]) == 5
    assert count_tokens(Words(), "one") == 1


def test_bench_sizing_counts_with_the_library_helper():
    assert datasets.count_tokens is count_tokens


def test_stable_hash_is_fixed():
    # The splits it drives (HotpotQA train/eval, held-out documents) must never move.
    assert stable_hash("") == 0xDA39A3EE5E6B  # SHA-1 of "" starts da39a3ee5e6b
    for text in ("ctxopt-split:5a8b57f25542995d1e6f1371", "ctxopt-refrag:essay.txt", "日本"):
        assert stable_hash(text) == int(hashlib.sha1(text.encode()).hexdigest()[:12], 16) < 2**48
    assert [datasets.hotpotqa_split(q) for q in "abcdefghij"] == ["train"] * 7 + ["eval"] + ["train"] * 2


def test_training_recipes_share_the_hash():
    from ctxopt.training import color, refrag

    assert [refrag.is_heldout(f"{c}.txt") for c in "abcdefgh"] == [True, False] + [True] * 6
    assert [color.is_heldout(c, 0.3) for c in "abcdefgh"] == [True, False, True, False, True, False, False, False]
    assert not hasattr(refrag, "_hash") and not hasattr(color, "_hash") and not hasattr(datasets, "_hash")


@pytest.mark.parametrize("text, sentences", [
    ("One. Two three! Four?", ["One.", "Two three!", "Four?"]),
    ("Dr. No met J. Bond at 3.15 p.m. sharp. Then left.", ["Dr. No met J. Bond at 3.15 p.m. sharp.", "Then left."]),
    ("  padded  \n\n  second  ", ["padded", "second"]),
])
def test_sentence_spans_lives_in_the_library(text, sentences):
    assert [text[a:b] for a, b in sentence_spans(text)] == sentences
