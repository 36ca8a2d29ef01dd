"""ctxopt.compress_prompt: a method's passage/token stages without generation, as text plus token counts, equal to
what Pipeline.compress builds (tiny random model; one end-to-end run on the packaged SmolLM2)."""
import json

import pytest

import ctxopt
from ctxopt.compress import GAP, CompressedPrompt
from ctxopt.errors import InputError
from ctxopt.methods import build_stages
from ctxopt.pipeline import Pipeline
from ctxopt.types import Passage

QUESTION = "What is the vault code of the museum?"
PASSAGES = [
    Passage("The museum opened in 1965 in the old customs house. Its collection covers boat building. "
            "The vault code is 4817. Entry is free for children under twelve.", source="museum.md"),
    Passage("Gulls nest on the pier every spring. The ferry leaves at nine. The bakery opens at six. "
            "Fishermen mend their nets on Sundays.", source="harbour.md"),
]


def test_extractive_returns_the_pipelines_compressed_context_and_counts(tiny_lm):
    result = ctxopt.compress_prompt(PASSAGES, QUESTION, method="extractive", budget=0.5, model=tiny_lm)
    assert isinstance(result, CompressedPrompt)
    prompt = Pipeline(tiny_lm, stages=build_stages("extractive", 0.5)).compress(QUESTION, PASSAGES)
    original = Pipeline(tiny_lm).build_prompt(QUESTION, PASSAGES)
    assert result.compressed_context == "\n\n".join(p.text for p in prompt.passages)
    assert result.compressed_prompt == prompt.text and QUESTION in result.compressed_prompt
    assert (result.origin_tokens, result.compressed_tokens) == (len(original), len(prompt))
    assert result.ratio == pytest.approx(len(prompt) / len(original)) and result.ratio < 1
    assert result.compressed_context_tokens < result.origin_context_tokens == int((original.passage_index >= 0).sum())
    assert result.sources == [p.source for p in prompt.passages] and result.sources[0] == "museum.md"
    assert "4817" in result.compressed_context  # extractive ranks all passages' sentences together
    for kept, given in zip(result.compressed_context.split("\n\n"), PASSAGES):
        assert len(kept) < len(given.text) and all(s.strip(".") in given.text for s in kept.split(". "))
    assert result.prompt.input_ids.tolist() == prompt.input_ids.tolist()
    assert "_ctxopt_input" not in result.prompt.passages[0].metadata
    assert json.loads(json.dumps(result.to_dict()))["sources"] == result.sources


def test_token_method_keeps_the_text_of_its_kept_tokens(tiny_lm):
    result = ctxopt.compress_prompt(PASSAGES, QUESTION, method="gemfilter", budget=40, model=tiny_lm)
    prompt = Pipeline(tiny_lm, stages=build_stages("gemfilter", 40)).compress(QUESTION, PASSAGES)
    assert result.compressed_tokens == len(prompt) == 40 < result.origin_tokens
    assert result.compressed_prompt == tiny_lm.tokenizer.decode(prompt.input_ids)
    kept = prompt.passages_kept()
    assert result.sources == [PASSAGES[i].source for i in kept]
    assert result.compressed_context == "\n\n".join(prompt.kept_text(i) for i in kept)
    for piece in result.compressed_context.replace("\n\n", GAP).split(GAP):
        assert any(piece in p.text for p in PASSAGES)


def test_full_keeps_everything_and_a_string_is_one_passage(tiny_lm):
    text = PASSAGES[0].text
    result = ctxopt.compress_prompt(text, QUESTION, method="full", budget=None, model=tiny_lm)
    assert result.compressed_context == text and result.sources == ["context[0]"]
    assert result.ratio == 1 and result.compressed_tokens == result.origin_tokens


def test_methods_that_do_not_return_text_are_refused(tiny_lm):
    with pytest.raises(InputError, match="do not act on text"):
        ctxopt.compress_prompt(PASSAGES, QUESTION, method="snapkv", budget=32, model=tiny_lm)
    with pytest.raises(InputError, match="has no option 'windw'"):
        ctxopt.compress_prompt(PASSAGES, QUESTION, method="gemfilter", budget=32, model=tiny_lm, windw=3)


@pytest.mark.real_model
def test_default_method_on_the_packaged_model_keeps_the_answer(smollm):
    from importlib import resources

    text = (resources.files("ctxopt") / "data" / "demo" / "corpus" / "harbour_museum.md").read_text()
    # extractive, smollm2-135m; the budget is of the whole prompt, whose fixed part (template, question) is ~30%
    result = ctxopt.compress_prompt(text, "What is the vault code?", budget=0.4)
    assert "4817" in result.compressed_context and result.compressed_context_tokens < result.origin_context_tokens
    assert result.compressed_prompt.startswith("<|im_start|>")
