"""SpecPC: the pure selection steps on hand-made vectors, the draft's scores against eager attention, the
lookahead and its memo, budgets, the cross-tokenizer extension, and (real_model) the needle on SmolLM2."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import CHAT_TEMPLATE, make_tiny_lm

from ctxopt.compressors.selection import centred_max_pool, expand_neighbours, neighbour_offsets, unique_in_order
from ctxopt.compressors.specpc import (
    SpecPC,
    cut_to_budget,
    default_kernel,
    draft_scores,
    overlapping,
    reduce_window,
    selection_order,
    text_tiles,
    token_tiles,
)
from ctxopt.decoding import GenerationConfig, decode, prefill
from ctxopt.errors import InputError
from ctxopt.methods import build_stages
from ctxopt.models import LoadedModel
from ctxopt.pipeline import Pipeline, as_passages
from ctxopt.stages import Run
from ctxopt.types import Stats

CONTEXT = [
    "The harbour office opens at nine. Ships from the north arrive on Tuesdays, and the ferry to the island "
    "leaves twice a day. The keeper's code for the east gate is 4471; the west gate has no lock.",
    "Most visitors walk the cliff path first. It takes about two hours, passes three lighthouses, and ends "
    "at a small cafe that sells fish soup and bread. Bring water in summer.",
]
QUESTION = "What is the code for the east gate?"


def make_run(lm: LoadedModel, max_new_tokens: int = 4) -> Run:
    return Run(lm=lm, question=QUESTION, config=GenerationConfig(max_new_tokens=max_new_tokens), stats=Stats())


def eager_attentions(lm: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    eager = copy.deepcopy(lm.model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        return eager(input_ids=ids[None], output_attentions=True).attentions


def expected_scores(attentions, n: int, window: int, first_layer: int, fed: int = 0) -> torch.Tensor:
    """[C]'s reduction from full eager attention: per layer from ``first_layer``, the last ``window`` prompt
    queries weighted by linspace(0, 1, W), max over heads and queries; the ``fed`` lookahead queries unweighted;
    max over layers."""
    best = None
    for attn in attentions[first_layer:]:
        attn = attn[0]
        weighted = attn[:, n - window:n, :n] * torch.linspace(0, 1, window).view(1, -1, 1)
        scores = weighted.amax(dim=(0, 1))
        if fed:
            scores = torch.maximum(scores, attn[:, n:n + fed, :n].amax(dim=(0, 1)))
        best = scores if best is None else torch.maximum(best, scores)
    return best


# -- pure steps ----------------------------------------------------------------------------------------


def test_window_reduction_weights_probabilities_then_takes_the_max():
    probs = torch.zeros(2, 3, 5)
    probs[0, 0, 0] = 0.9  # first query: weight 0
    probs[1, 1, 1] = 0.8  # middle query: weight 0.5 -> 0.4
    probs[1, 2, 1] = 0.35  # last query: weight 1 -> 0.35 < 0.4
    probs[0, 2, 2] = 0.3
    probs[0, 2, 4] = 0.7  # a key past the prompt: dropped
    torch.testing.assert_close(reduce_window(probs, 4, weighted=True), torch.tensor([0.0, 0.4, 0.3, 0.0]))
    torch.testing.assert_close(reduce_window(probs, 4, weighted=False), torch.tensor([0.9, 0.8, 0.3, 0.0]))


def test_centred_max_pool_reaches_further_right_for_an_even_kernel():
    scores = torch.zeros(10)
    scores[5] = 1.0
    assert centred_max_pool(scores, 4).nonzero().flatten().tolist() == [3, 4, 5, 6]  # j-1 .. j+2 sees 5
    assert centred_max_pool(scores, 3).nonzero().flatten().tolist() == [4, 5, 6]
    wide = torch.zeros(40)
    wide[20] = 1.0
    assert centred_max_pool(wide, 32).nonzero().flatten().tolist() == list(range(4, 36))  # j-15 .. j+16


def test_neighbours_are_nearest_first_and_clamped():
    assert neighbour_offsets(4).tolist() == [0, -1, 1, 2]
    offsets = neighbour_offsets(32).tolist()
    assert offsets[:5] == [0, -1, 1, -2, 2] and offsets[-1] == 16 and sorted(offsets) == list(range(-15, 17))
    assert expand_neighbours(torch.tensor([5, 0, 9]), 4, 10).tolist() == [5, 4, 6, 7, 0, 1, 2, 9, 8]
    assert unique_in_order(torch.tensor([3, 1, 3, 2, 1])).tolist() == [3, 1, 2]


def test_selection_order_puts_the_window_first_then_ranked_neighbourhoods():
    scores = torch.zeros(20)
    scores[10], scores[15], scores[4] = 0.9, 0.7, 0.5
    order = selection_order(scores, kernel=3, window=3)
    assert order.tolist() == [17, 18, 19, 9, 8, 10, 11, 12, 14, 13, 15, 16, 3, 2, 4, 5, 6, 0, 1, 7]
    identity = torch.stack([torch.arange(20), torch.arange(1, 21)], dim=1)
    kept, units = cut_to_budget(order, identity, 8)
    assert kept.tolist() == [8, 9, 10, 11, 12, 17, 18, 19] and units.tolist() == order[:8].tolist()
    assert selection_order(scores, kernel=3, window=3, top=8)[:8].tolist() == order[:8].tolist()


def test_cut_counts_target_tokens_and_stops_at_the_first_unit_that_does_not_fit():
    ranges = torch.tensor([[0, 2], [2, 3], [3, 6]])
    kept, units = cut_to_budget(torch.tensor([2, 0, 1]), ranges, 4)
    assert kept.tolist() == [3, 4, 5] and units.tolist() == [2]
    kept, units = cut_to_budget(torch.tensor([2, 0, 1]), ranges, 6, forced=torch.tensor([0]))
    assert kept.tolist() == [0, 1, 2, 3, 4, 5] and units.tolist() == [2, 0, 1]


def test_tiles_cover_the_text_and_overlaps_are_found():
    assert token_tiles([(0, 5), (6, 11), (6, 11), (12, 13)], 15).tolist() == [[0, 6], [6, 12], [6, 12], [12, 15]]
    assert token_tiles([(2, 4), (5, 6)], 8).tolist() == [[0, 5], [5, 8]]
    tiles = torch.tensor([[0, 2], [2, 5], [5, 9]])
    assert overlapping(torch.tensor([[0, 3], [3, 9], [5, 6]]), tiles).tolist() == [[0, 2], [1, 3], [2, 3]]


def test_default_kernel_follows_the_family():
    assert default_kernel(SimpleNamespace(family="llama")) == 32
    assert default_kernel(SimpleNamespace(family="qwen2")) == 64


# -- on a tiny model -----------------------------------------------------------------------------------


def test_draft_scores_equal_the_reduction_of_eager_attention(tiny_lm):
    ids = torch.randint(1000, 30000, (50,), generator=torch.Generator().manual_seed(5))
    scores, answer = draft_scores(tiny_lm, ids, window=8, first_layer=1)
    assert answer is None
    torch.testing.assert_close(scores, expected_scores(eager_attentions(tiny_lm, ids), 50, 8, 1), atol=1e-5, rtol=1e-4)


def test_selection_keeps_the_window_sorted_within_budget(tiny_lm):
    pipe = Pipeline(tiny_lm, stages=[SpecPC(budget=30, window=8, first_layer=1, kernel=3)], max_new_tokens=3)
    full = pipe.build_prompt(QUESTION, as_passages(CONTEXT))
    n = len(full)
    answer = pipe.ask(QUESTION, context=CONTEXT)
    positions = answer.prompt.positions
    assert len(positions) == 30 and torch.all(positions[1:] > positions[:-1])
    assert set(range(n - 8, n)) <= set(positions.tolist())
    order = selection_order(expected_scores(eager_attentions(tiny_lm, full.input_ids), n, 8, 1), 3, 8)
    assert positions.tolist() == sorted(order[:30].tolist())
    assert torch.equal(answer.prompt.char_spans, full.char_spans[positions])
    record = answer.stats.get("specpc")
    assert record.extra["draft_tokens"] == n and record.extra["selection_seconds"] >= record.extra["draft_seconds"] > 0


def test_lookahead_stores_the_drafts_greedy_answer_and_scores_its_queries(tiny_lm):
    prompt = Pipeline(tiny_lm).build_prompt(QUESTION, as_passages(CONTEXT))
    run = make_run(tiny_lm)
    SpecPC(budget=30, window=8, first_layer=1, kernel=3, lookahead=3).select(prompt, run)
    greedy = decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, prompt.input_ids),
                    GenerationConfig(max_new_tokens=3))
    assert run.draft_answer.tolist() == greedy.token_ids and len(greedy.token_ids) == 3

    n = len(prompt)
    scores, answer = draft_scores(tiny_lm, prompt.input_ids, 8, 1, lookahead=3)
    assert answer.tolist() == greedy.token_ids
    attentions = eager_attentions(tiny_lm, torch.cat([prompt.input_ids, answer[:2]]))
    torch.testing.assert_close(scores, expected_scores(attentions, n, 8, 1, fed=2), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(scores, expected_scores(attentions, n, 8, 1))  # the lookahead counted


def test_an_existing_draft_answer_is_reused_not_decoded_again(tiny_lm):
    prompt = Pipeline(tiny_lm).build_prompt(QUESTION, as_passages(CONTEXT))
    given = torch.tensor([2000, 3000, 4000, 5000])
    run = make_run(tiny_lm)
    run.draft_answer = given
    kept = SpecPC(budget=30, window=8, first_layer=1, kernel=3, lookahead=3).select(prompt, run)
    assert run.draft_answer is given
    assert run.figures["lookahead_reused"] and run.figures["lookahead_tokens"] == 3
    n = len(prompt)
    attentions = eager_attentions(tiny_lm, torch.cat([prompt.input_ids, given[:2]]))
    order = selection_order(expected_scores(attentions, n, 8, 1, fed=2), 3, 8)
    assert kept.positions.tolist() == sorted(order[:30].tolist())


def test_budget_at_or_over_the_prompt_is_a_no_op(tiny_lm):
    full = Pipeline(tiny_lm, max_new_tokens=5).ask(QUESTION, context=CONTEXT)
    answer = Pipeline(tiny_lm, stages=[SpecPC(budget=10**6, first_layer=1)], max_new_tokens=5).ask(
        QUESTION, context=CONTEXT)
    assert torch.equal(answer.prompt.input_ids, full.prompt.input_ids) and answer.token_ids == full.token_ids
    assert any("nothing dropped" in n for n in answer.stats.stages[-1].extra["notes"])


def test_knobs_and_registry(tiny_lm, bpe_lm):
    prompt = Pipeline(tiny_lm).build_prompt(QUESTION, as_passages(CONTEXT))
    with pytest.raises(InputError, match="first_layer"):
        SpecPC(budget=30).select(prompt, make_run(tiny_lm))  # 4-layer draft, first layer 8
    with pytest.raises(InputError, match="cross_tokenizer=True"):
        SpecPC(draft=bpe_lm, budget=30, first_layer=1, cross_tokenizer=False).select(prompt, make_run(tiny_lm))
    # by default a draft of another vocabulary is mapped by text, exactly as when asked for
    mapped = SpecPC(draft=bpe_lm, budget=30, first_layer=1).select(prompt, make_run(tiny_lm))
    asked = SpecPC(draft=bpe_lm, budget=30, first_layer=1, cross_tokenizer=True).select(prompt, make_run(tiny_lm))
    assert len(mapped) < len(prompt) and torch.equal(mapped.input_ids, asked.input_ids)
    with pytest.raises(InputError, match="window"):
        SpecPC(window=0)
    assert build_stages("specpc", 0.25, window=16, lookahead=2) == [SpecPC(budget=0.25, window=16, lookahead=2)]


# -- cross-tokenizer extension -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_lm() -> LoadedModel:
    return make_bpe_lm()


def make_bpe_lm() -> LoadedModel:
    """A tiny Llama on a byte-level BPE tokenizer (GPT-2 style) trained here on the test text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CONTEXT * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return make_tiny_lm(fast, seed=1, name="tiny-bpe")


def tiles_by_hand(offsets: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    starts = [s for s, _ in offsets]
    starts[0] = 0
    return [(s, next((t for t in starts if t > s), length)) for s in starts]


def test_cross_tokenizer_draft_maps_its_kept_tokens_onto_target_characters(tiny_lm, bpe_lm):
    budget, window = 60, 8
    prompt = Pipeline(bpe_lm).build_prompt(QUESTION, as_passages(CONTEXT))
    run = make_run(bpe_lm, max_new_tokens=2)
    stage = SpecPC(draft=tiny_lm, budget=budget, window=window, first_layer=1, kernel=3, lookahead=2,
                   cross_tokenizer=True)
    kept = stage.select(prompt, run).positions.tolist()

    text = prompt.text
    target = tiles_by_hand(bpe_lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                           ["offset_mapping"], len(text))
    encoded = tiny_lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    draft = tiles_by_hand(encoded["offset_mapping"], len(text))
    assert len(draft) != len(target)
    scores, answer = draft_scores(tiny_lm, torch.tensor(encoded["input_ids"]), window, 1, lookahead=2)
    taken, chosen = [], set()
    for unit in selection_order(scores, 3, window).tolist():
        a, b = draft[unit]
        covering = {j for j, (s, e) in enumerate(target) if s < b and e > a}
        if len(chosen | covering) > budget:
            break
        chosen |= covering
        taken.append(unit)
    assert kept == sorted(chosen) and budget - 4 <= len(kept) <= budget
    assert run.figures["draft_kept_tokens"] == len(taken)

    draft_chars = {c for u in taken for c in range(*draft[u])}
    target_chars = {c for j in kept for c in range(*target[j])}
    assert draft_chars <= target_chars  # every kept draft character is in the target prompt
    assert all(set(range(*target[j])) & draft_chars for j in kept)  # and no target token without one
    assert set(range(len(draft) - window, len(draft))) <= set(taken)  # the draft's window comes first

    words = tiny_lm.tokenizer.decode(answer, skip_special_tokens=True)
    assert run.draft_answer.tolist() == bpe_lm.tokenizer(words, add_special_tokens=False)["input_ids"]


def test_cross_tokenizer_reads_only_the_text_of_an_already_cut_prompt(bpe_lm):
    prompt = Pipeline(bpe_lm).build_prompt(QUESTION, as_passages(CONTEXT))
    whole, tiles = text_tiles(prompt, bpe_lm.tokenizer)
    assert whole == prompt.text and tiles[0, 0] == 0 and tiles[-1, 1] == len(whole)
    part = prompt.select(torch.arange(10, 40))
    text, local = text_tiles(part, bpe_lm.tokenizer)
    assert text == prompt.text[int(tiles[10, 0]):int(tiles[39, 1])]
    assert torch.equal(local, tiles[10:40] - tiles[10, 0])


# -- real model ----------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm_as_its_own_draft_keeps_the_needle_and_answers(smollm):
    from ctxopt.bench.datasets import load_needle

    (sample,) = load_needle([600], [0.5], smollm.tokenizer)
    pipe = Pipeline(smollm, stages=[SpecPC(budget=192)], system=sample.instruction, max_new_tokens=12)
    n = len(pipe.build_prompt(sample.question, as_passages(sample.context)))
    answer = pipe.ask(sample.question, context=sample.context)
    assert len(answer.prompt) == 192 and set(range(n - 64, n)) <= set(answer.prompt.positions.tolist())
    assert sample.metadata["needle"] in answer.prompt.kept_text(0)
    assert sample.answers[0] in answer.text
