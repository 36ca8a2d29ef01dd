"""Prompt assembly with provenance: every context token maps back to its passage and character span,
and the mapping survives token selection."""
import pytest
import torch

from ctxopt.errors import InputError
from ctxopt.prompting import build_prompt
from ctxopt.types import CONTEXT, QUESTION, Passage

PASSAGES = [
    Passage("The vault code is 7341. It was set in March.", source="a.txt", span=(100, 144)),
    Passage("Bananas are yellow; apples can be red or green.", source="b.md"),
    Passage("Ada Lovelace wrote the first published algorithm.", source="c.jsonl#3"),
]


def _reassemble(prompt, j):
    spans = prompt.char_spans[prompt.passage_index == j].tolist()
    return spans


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "smollm_tokenizer"])
def test_every_passage_character_is_covered_in_order(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    prompt = build_prompt(tokenizer, "What is the vault code?", PASSAGES)
    for j, passage in enumerate(PASSAGES):
        spans = _reassemble(prompt, j)
        assert spans, f"passage {j} lost"
        # Spans are contiguous and increasing, and together cover the passage text exactly.
        covered = "".join(passage.text[s:e] for s, e in spans)
        assert covered.replace(" ", "") == passage.text.replace(" ", "")
        assert spans[0][0] <= 1 and spans[-1][1] == len(passage.text)
        assert all(a[1] <= b[0] + 1 for a, b in zip(spans, spans[1:]))
    question_tokens = prompt.input_ids[prompt.segment == QUESTION]
    assert "vault code" in tokenizer.decode(question_tokens).lower()
    assert (prompt.segment == CONTEXT).sum() == (prompt.passage_index >= 0).sum()


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "smollm_tokenizer"])
def test_provenance_survives_selection(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    prompt = build_prompt(tokenizer, "Who wrote the first algorithm?", PASSAGES)
    keep = (prompt.passage_index != 1).nonzero().flatten()  # drop passage 1 entirely
    kept = prompt.select(keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))])
    assert kept.passages_kept() == [0, 2]
    assert torch.equal(kept.positions, keep)  # original positions, ascending
    assert kept.kept_text(2) == PASSAGES[2].text
    assert kept.kept_text(1) == ""
    # Each kept context token's span, read from its passage, is the text the token encodes.
    for i in (kept.passage_index >= 0).nonzero().flatten().tolist():
        passage = PASSAGES[int(kept.passage_index[i])]
        start, end = kept.char_spans[i].tolist()
        piece = tokenizer.decode([int(kept.input_ids[i])]).replace("##", "").strip().lower()
        assert piece == passage.text[start:end].strip().lower()


def test_partial_selection_marks_gaps(tiny_tokenizer):
    prompt = build_prompt(tiny_tokenizer, "Code?", PASSAGES[:1])
    rows = (prompt.passage_index == 0).nonzero().flatten()
    kept = prompt.select(torch.cat([rows[:4], rows[-3:], (prompt.passage_index < 0).nonzero().flatten()]))
    text = kept.kept_text(0)
    assert text.startswith("The vault code is") and " … " in text and text.endswith("March.")


def test_empty_question_is_rejected(tiny_tokenizer):
    with pytest.raises(InputError, match="question is empty"):
        build_prompt(tiny_tokenizer, "   ", PASSAGES)


def _provenance_one_token_at_a_time(offsets, passages, question):
    """The rule written as a plain loop, the reference for the vectorised ``_provenance``."""
    from ctxopt.types import TEMPLATE

    rows = []
    for start, end in offsets:
        row = (-1, -1, -1, TEMPLATE)
        if end > start:
            owner = next((j for j, (_, p_end) in enumerate(passages) if p_end > start), None)
            if owner is not None and start < passages[owner][1] and end > passages[owner][0]:
                p_start, p_end = passages[owner]
                row = (owner, max(start, p_start) - p_start, min(end, p_end) - p_start, CONTEXT)
            elif start < question[1] and end > question[0]:
                row = (-1, -1, -1, QUESTION)
        rows.append(row)
    return rows


def test_vectorised_provenance_equals_the_token_by_token_rule():
    """Random tokenisations over a text with passages and a question: tokens that start a character before a
    passage (a BPE space), straddle two passages, are empty (special tokens), or overlap the question."""
    from ctxopt.prompting import _provenance

    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        cuts = sorted(set(torch.randint(0, 400, (60,), generator=generator).tolist()) | {0, 400})
        offsets = [(a, b) for a, b in zip(cuts, cuts[1:])]
        for i in torch.randint(0, len(offsets), (5,), generator=generator).tolist():
            offsets.insert(i, (offsets[i][0], offsets[i][0]))  # empty tokens
        bounds = sorted(torch.randperm(380, generator=generator)[:6].tolist())
        passages = [(bounds[0], bounds[1]), (bounds[2], bounds[3]), (bounds[4], bounds[5])]
        question = (bounds[5] + 3, 399)
        index, spans, segment = _provenance(offsets, passages, question)
        ours = list(zip(index.tolist(), spans[:, 0].tolist(), spans[:, 1].tolist(), segment.tolist()))
        assert ours == _provenance_one_token_at_a_time(offsets, passages, question)
    assert [t.numel() for t in _provenance([], [], (0, 0))] == [0, 0, 0]


# -- the byte-level fast path of tokenization ------------------------------------------------------------------
VARIED_TEXTS = [
    "The vault code is 7341.  Two spaces,\ttabs\n\nand blank lines \n",
    "héllo wörld 日本語 🎉🎉 naïve café — “quotes” ½ x²",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>\n😀x",
    "   leading and trailing   ",
    "e\u0301 a\u0301: combining accents (not NFC)",
    "",
]


def _byte_level_variant(tokenizer, **parts):
    """SmolLM2's tokenizer with other pipeline parts (an NFC normalizer as Qwen2.5's, another post-processor)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    for name, value in parts.items():
        setattr(backend, name, value)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _assert_encodes_like_the_tokenizer(tokenizer, texts):
    from ctxopt.prompting import _encode

    for text in texts:
        ids, offsets = _encode(tokenizer, text)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids.tolist() == encoded["input_ids"], text
        assert [tuple(pair) for pair in offsets.tolist()] == [tuple(pair) for pair in encoded["offset_mapping"]], text


@pytest.mark.real_model
def test_fast_path_ids_and_offsets_equal_the_tokenizers(smollm_tokenizer):
    """SmolLM2 (byte-level BPE) takes the fast path, and its ids and character offsets are the tokenizer's own on
    ASCII, multi-byte characters split across tokens, special tokens, whitespace runs and a ~5K-token prompt."""
    from ctxopt.prompting import _byte_table

    assert _byte_table(smollm_tokenizer) is not None
    long_prompt = build_prompt(smollm_tokenizer, "What is the vault code?",
                               [Passage(" ".join(VARIED_TEXTS) * 120, source="long")]).text
    _assert_encodes_like_the_tokenizer(smollm_tokenizer, VARIED_TEXTS + [long_prompt])


@pytest.mark.real_model
def test_fast_path_prompt_equals_the_reference_prompt(smollm_tokenizer):
    """build_prompt's tokens and provenance are those computed from the tokenizer's own offsets."""
    from ctxopt.prompting import _encode_with_offsets, _provenance

    passages = [Passage(text, source=f"p{i}") for i, text in enumerate(VARIED_TEXTS) if text.strip()] + PASSAGES
    for system, instruction in ((None, "Answer briefly."), ("Sé breve. 🎯", "")):
        prompt = build_prompt(smollm_tokenizer, "¿Cuál es el código? ✓", passages, instruction, system)
        ids, offsets = _encode_with_offsets(smollm_tokenizer, prompt.text)
        assert prompt.input_ids.tolist() == ids.tolist()
        base = prompt.text.find("Context:\n")
        ranges, cursor = [], base + len("Context:\n")
        for number, passage in enumerate(passages, start=1):
            cursor += len(f"[{number}] ")
            ranges.append((cursor, cursor + len(passage.text)))
            cursor += len(passage.text) + 2
        question_start = prompt.text.index("¿Cuál", cursor)
        reference = _provenance(offsets, ranges, (question_start, question_start + len(prompt.question)))
        for ours, theirs in zip((prompt.passage_index, prompt.char_spans, prompt.segment), reference):
            assert torch.equal(ours, theirs)
        assert (prompt.segment == QUESTION).any() and set(prompt.passage_index.tolist()) == {-1, *range(len(passages))}


@pytest.mark.real_model
def test_other_tokenizers_and_states_take_the_tokenizers_offsets(smollm_tokenizer, tiny_tokenizer):
    """An NFC normalizer (Qwen2.5's) keeps the fast path on NFC text and leaves the rest to the tokenizer; a
    post-processor that trims offsets, a WordPiece tokenizer, special tokens the tokenizer splits, and truncation
    left set on the Rust tokenizer all give the tokenizer's own answer."""
    from tokenizers import normalizers, processors

    from ctxopt.prompting import _byte_table, _encode

    nfc = _byte_level_variant(smollm_tokenizer, normalizer=normalizers.NFC())
    assert _byte_table(nfc) is not None
    _assert_encodes_like_the_tokenizer(nfc, VARIED_TEXTS)
    trimming = _byte_level_variant(smollm_tokenizer, post_processor=processors.ByteLevel(trim_offsets=True))
    assert _byte_table(trimming) is None and _byte_table(tiny_tokenizer) is None
    _assert_encodes_like_the_tokenizer(trimming, VARIED_TEXTS)
    _assert_encodes_like_the_tokenizer(tiny_tokenizer, VARIED_TEXTS)
    splitting = _byte_level_variant(smollm_tokenizer)
    splitting.split_special_tokens = True  # the Rust tokenizer learns it at the tokenizer's next call
    assert len(_encode(splitting, VARIED_TEXTS[2])[0]) == len(splitting(VARIED_TEXTS[2])["input_ids"]) > \
        len(smollm_tokenizer(VARIED_TEXTS[2])["input_ids"])
    truncating = _byte_level_variant(smollm_tokenizer)
    truncating.backend_tokenizer.enable_truncation(3)
    assert len(_encode(truncating, VARIED_TEXTS[0])[0]) == len(smollm_tokenizer(VARIED_TEXTS[0])["input_ids"]) > 3
