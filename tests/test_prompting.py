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
