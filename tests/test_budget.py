"""One meaning of a budget for every method: the prompt tokens the generator prefills (template, instruction,
question and kept context), or a ratio of the uncompressed prompt's tokens. Each budgeted method is run on the
same prompts at a ratio and at a token count, and what it prefilled is compared with counts taken from the
tokenizer directly; a budget below the prompt's fixed part, and a budget for a method that takes none, are
errors that say what to pass."""
import pytest
import torch
from test_rapid import HashEmbedder

from ctxopt.cli import main
from ctxopt.errors import InputError
from ctxopt.methods import METHODS, budget_for, build_stages
from ctxopt.pipeline import Pipeline
from ctxopt.text import sentence_spans
from ctxopt.types import Passage

QUESTION = "Which box holds the brass key?"
PASSAGES = [
    Passage(" ".join(f"Box {p * 10 + i} in room {p} holds a {colour} marble and {i + 2} old coins."
                     for i, colour in enumerate(["red", "green", "blue", "white", "black", "grey", "pink"])),
            source=f"room{p}.txt")
    for p in range(5)
] + [Passage("The brass key is kept in box 23. Nobody has opened box 23 since the war.", source="key.txt")]
CHUNK = 16  # rag's chunk size here: its slack is at most one chunk
# What each method prefills: (stage record, tokens it keeps beyond its record's count).
CACHE_METHODS = {"snapkv": 0, "speckv": 1}  # SpecKV's cache holds budget - 1, then feeds the last token again
TINY_OPTIONS = {"gemfilter": {"layer": 1}, "specpc": {"first_layer": 1}, "snapkv": {"window": 8},
                "speckv": {"window": 8, "lookahead": 3}, "speckv-pc": {"window": 8, "lookahead": 3},
                "rag": {"chunk_tokens": CHUNK}, "rapid": {"chunk_tokens": CHUNK, "threshold": None, "eta": 0.0}}


def full_tokens(lm) -> int:
    """The uncompressed prompt's tokens, counted by the tokenizer from the rendered text."""
    text = Pipeline(lm).build_prompt(QUESTION, PASSAGES).text
    return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def prefilled(lm, method: str, budget) -> int:
    """The prompt tokens the generator prefilled for ``method`` at ``budget`` (RAPID: the drafter's prompt)."""
    stages = build_stages(method, budget, **TINY_OPTIONS.get(method, {}))
    for stage in stages:
        if getattr(stage, "at_least", 0):  # speckv-pc: SpecPC keeps >= 2048, more than this prompt; here 250
            stage.at_least, stage.first_layer = 250, 1
    answer = Pipeline(lm, stages=stages, max_new_tokens=3, embedder=HashEmbedder()).ask(QUESTION, context=PASSAGES)
    if method == "rapid":
        return answer.stats.get("decode:rapid").extra["draft_prompt_tokens"]
    cache = next((name for name in CACHE_METHODS if name in method), None)
    if cache is not None:
        return answer.stats.get(cache).tokens_out + CACHE_METHODS[cache]
    # Independently of the Prompt's own length: the tokenizer's count of the kept prompt's text.
    text = answer.prompt.text if method in ("rag", "extractive", "extractive+rag") else None
    if text is not None:
        return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(answer.prompt)


def slack(lm, method: str) -> int:
    """How far under the budget a method may stop: passage stages keep whole units (a sentence or a chunk,
    plus a passage's numbering and separator); the others hit the budget exactly."""
    if method.startswith("extractive"):
        return max(len(lm.tokenizer(p.text[a:b], add_special_tokens=False)["input_ids"])
                   for p in PASSAGES for a, b in sentence_spans(p.text)) + 6
    if method in ("rag", "rapid"):
        return CHUNK + 6
    return 0


BUDGETED = ["truncate", "rag", "extractive", "gemfilter", "specpc", "snapkv", "speckv", "speckv-pc", "rapid",
            "extractive+rag", "truncate+snapkv"]


@pytest.mark.parametrize("method", BUDGETED)
@pytest.mark.parametrize("budget", [0.25, 180])
def test_every_method_prefills_what_the_budget_says(tiny_lm, method, budget):
    n = full_tokens(tiny_lm)
    target = round(budget * n) if isinstance(budget, float) else budget
    assert target < n // 2  # the budget really cuts
    got = prefilled(tiny_lm, method, budget)
    assert target - slack(tiny_lm, method) <= got <= target, f"{method} at {budget}: {got} tokens for {target}"


def test_passage_stages_rank_sentences_across_passages_with_no_floor(tiny_lm):
    """Extractive keeps the key passage's sentences and drops passages none of whose sentences rank high
    enough: at a tight budget most passages keep nothing (the old per-passage rule kept one sentence each)."""
    pipe = Pipeline(tiny_lm, stages=build_stages("extractive", 90), max_new_tokens=2, embedder=HashEmbedder())
    prompt = pipe.compress(QUESTION, PASSAGES)
    kept = [prompt.passages[i].source for i in prompt.passages_kept()]
    assert "key.txt" in kept and len(kept) < len(PASSAGES)
    assert "The brass key is kept in box 23." in prompt.text


@pytest.mark.parametrize("method", ["rag", "extractive"])
def test_a_budget_below_the_fixed_part_names_the_smallest_that_works(tiny_lm, method):
    pipe = Pipeline(tiny_lm, stages=build_stages(method, 10), embedder=HashEmbedder())
    fixed = len(pipe.build_prompt(QUESTION, []))
    with pytest.raises(InputError, match=f"pass at least {fixed + 1} tokens"):
        pipe.compress(QUESTION, PASSAGES)
    Pipeline(tiny_lm, stages=build_stages(method, fixed + 1), embedder=HashEmbedder()).compress(QUESTION, PASSAGES)


def test_a_ratio_is_of_the_uncompressed_prompt_in_a_composition(tiny_lm):
    """extractive then truncate at 0.25: truncate's ratio is of the original prompt, not of extractive's output,
    so the composition prefills what either alone would at most."""
    n = full_tokens(tiny_lm)
    stages = build_stages("extractive+truncate", 0.25)
    prompt = Pipeline(tiny_lm, stages=stages, embedder=HashEmbedder()).compress(QUESTION, PASSAGES)
    assert prompt.prompt_tokens == n and len(prompt) <= round(0.25 * n)
    assert len(prompt) > round(0.25 * round(0.25 * n))


@pytest.mark.parametrize("method", ["full", "color", "refrag"])
def test_a_budget_for_a_method_that_takes_none_is_an_error(method):
    with pytest.raises(InputError, match=f"Method '{method}' takes no budget: drop the budget"):
        build_stages(method, 100)
    assert not METHODS[method].takes_budget


def test_pipeline_takes_a_method_and_refuses_a_budget_it_ignores(tiny_lm):
    with pytest.raises(InputError, match="Method 'full' takes no budget"):
        Pipeline(tiny_lm, method="full", budget=100)
    with pytest.raises(InputError, match="go with method="):
        Pipeline(tiny_lm, budget=100)
    with pytest.raises(InputError, match="not both"):
        Pipeline(tiny_lm, stages=build_stages("truncate", 50), method="truncate", budget=50)
    pipe = Pipeline(tiny_lm, method="gemfilter", budget=0.25, options={"layer": 1})
    assert pipe.stages["token"] == build_stages("gemfilter", 0.25, layer=1)
    assert len(pipe.compress(QUESTION, PASSAGES)) == round(0.25 * full_tokens(tiny_lm))


def test_a_composition_hands_the_budget_only_to_parts_that_take_one():
    color, extractive = build_stages("color+extractive", 0.25)
    assert extractive.budget == 0.25 and not hasattr(color, "budget")
    assert [budget_for(m, 0.25) for m in ("full", "color", "rapid", "extractive")] == [None, None, 0.25, 0.25]


def test_cli_refuses_a_budget_the_method_ignores_before_loading_a_model(tmp_path, capsys):
    document = tmp_path / "doc.txt"
    document.write_text("Box 1 is blue.")
    code = main(["ask", "Colour?", "--file", str(document), "--method", "full", "--budget", "100",
                 "--model", str(tmp_path / "no-such-model")])
    assert code == 2 and "takes no budget" in capsys.readouterr().err


def test_bench_full_baseline_runs_with_a_budget_list():
    from ctxopt.bench.runner import plan

    assert plan(["truncate"], [0.25, 512]) == [("full", None), ("truncate", 0.25), ("truncate", 512)]


def test_the_ratio_resolves_against_the_prompt_the_stage_would_see_without_a_pipeline(tiny_lm):
    """A stage handed a prompt outside a Pipeline (no uncompressed length known) takes the ratio of that prompt."""
    from ctxopt.decoding import GenerationConfig
    from ctxopt.stages import Run, Truncate

    prompt = Pipeline(tiny_lm).build_prompt(QUESTION, PASSAGES)
    kept = Truncate(0.5).select(prompt, Run(tiny_lm, QUESTION, GenerationConfig()))
    assert len(kept) == round(0.5 * len(prompt)) and torch.equal(kept.input_ids[-5:], prompt.input_ids[-5:])
