"""The per-model defaults the examples rely on (ctxopt/models/registry.py, each chosen by a measurement in
benchmarks/JOURNAL.md): the draft pairing of draft-based methods, self-drafting only when asked, GemFilter's
screened layer, and the examples' model; and the comparison table the examples print."""
import warnings

import pytest

from ctxopt.bench.compare import MethodRow, method_notes, method_table
from ctxopt.compressors.gemfilter import GemFilter, registry_layer
from ctxopt.drafts import default_draft, resolve_draft
from ctxopt.errors import ModelLoadError
from ctxopt.models import LoadedModel
from ctxopt.models.registry import EXAMPLE_MODEL, REGISTRY, paired_draft


def test_pairings():
    assert paired_draft("qwen2.5-coder-1.5b") == "qwen2.5-coder-0.5b"  # one tokenizer: any draft-based stage
    assert paired_draft("qwen2.5-coder-1.5b", cross_tokenizer=True) == "smollm2-135m"  # smaller, mapped by text
    assert paired_draft("qwen-0.5b") is None  # SmolLM2 has another tokenizer ...
    assert paired_draft("qwen-0.5b", cross_tokenizer=True) == "smollm2-135m"  # ... usable across tokenizers
    assert paired_draft("smollm2-135m", cross_tokenizer=True) is None  # nothing smaller is registered
    assert paired_draft("/some/folder") is None
    assert EXAMPLE_MODEL in REGISTRY


def test_a_model_with_no_smaller_draft_drafts_for_itself_only_when_asked(tiny_lm):
    with pytest.warns(UserWarning, match=r"no smaller registered draft.*cannot save time.*draft='self'"):
        assert resolve_draft(None, tiny_lm, "specpc") is tiny_lm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_draft("self", tiny_lm, "specpc") is tiny_lm


def test_self_drafting_speckv_warns_once_per_ask(tiny_lm):
    """SpecKV checks its draft before the target's prefill and uses it after: one warning, not one per use."""
    from ctxopt.pipeline import Pipeline

    pipe = Pipeline(tiny_lm, method="speckv", budget=48, max_new_tokens=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.ask("What colour is box 3?", context=" ".join(f"Box {i} is blue." for i in range(40)))
    drafts = [w for w in caught if "no smaller registered draft" in str(w.message)]
    assert len(drafts) == 1 and "speckv" in str(drafts[0].message)
    pipe.generator.cache_stages[0].draft = "/no/such/draft"  # a changed draft is resolved again, not remembered
    with pytest.raises(ModelLoadError, match="/no/such/draft"):
        pipe.ask("What colour is box 4?", context=" ".join(f"Box {i} is blue." for i in range(40)))



def renamed(lm: LoadedModel, name: str) -> LoadedModel:
    """The same model under a registry name (the registry's defaults are looked up by name)."""
    return LoadedModel(lm.model, lm.tokenizer, name, lm.device, lm.dtype)

def test_the_default_draft_is_the_pairing_the_stage_can_use(tiny_lm):
    qwen15, qwen05 = renamed(tiny_lm, "qwen2.5-coder-1.5b"), renamed(tiny_lm, "qwen2.5-coder-0.5b")
    assert default_draft(qwen15, "rapid") == "qwen2.5-coder-0.5b"
    assert default_draft(qwen15, "specpc", cross_tokenizer=True) == "smollm2-135m"
    assert default_draft(qwen15, "specpc", cross_tokenizer=False) == "qwen2.5-coder-0.5b"
    assert default_draft(qwen05, "specpc", cross_tokenizer=True) == "smollm2-135m"
    with pytest.warns(UserWarning, match="smollm2-135m has another tokenizer, which rapid cannot use"):
        assert default_draft(qwen05, "rapid") is qwen05


def test_gemfilter_takes_the_screened_layer_of_a_registry_model(tiny_lm):
    assert registry_layer("smollm2") == REGISTRY["smollm2-135m"].gemfilter_layer == 21
    assert registry_layer("qwen2.5-coder-1.5b") == 16 and registry_layer("/some/folder") is None
    assert GemFilter(budget=64).resolve_layer(tiny_lm) == 2  # not registered: round(0.4 * 4 layers)
    assert GemFilter(budget=64, layer=1).resolve_layer(renamed(tiny_lm, "smollm2-135m")) == 1  # asked wins
    with pytest.raises(Exception, match="layer"):  # the screened layer 21 does not exist in a 4-layer model
        GemFilter(budget=64).resolve_layer(renamed(tiny_lm, "smollm2-135m"))


def row(method: str, correct: list, ttft: float, prompt: int, kv: int) -> MethodRow:
    return MethodRow(method, correct, [ttft] * len(correct), [prompt] * len(correct), [kv] * len(correct))


def test_the_table_gives_correct_answers_and_the_ratio_to_full_and_says_why_a_method_lost():
    rows = [row("full", [True, True], 2.0, 700, 700), row("rag", [True, True], 1.0, 300, 300),
            row("snapkv", [True, False], 3.0, 700, 256)]
    lines = method_table(rows).splitlines()
    assert lines[0].split("  ")[0] == "method" and "TTFT / full" in lines[0]
    assert lines[1].split() == ["full", "2/2", "700", "700", "2.00s", "1.00x"]
    assert lines[2].split() == ["rag", "2/2", "300", "300", "1.00s", "0.50x"]
    assert lines[3].split() == ["snapkv", "1/2", "700", "256", "3.00s", "1.50x"]
    notes = method_notes(rows)
    assert len(notes) == 2 and notes[0].startswith("snapkv lost 1 answer") and "never TTFT" in notes[1]
    assert method_notes(rows[1:]) == [] and method_table(rows[1:]).splitlines()[1].endswith("-")


def test_the_demo_runs_on_the_examples_model_and_ask_on_the_default_generator():
    from ctxopt.cli import build_parser
    from ctxopt.models import DEFAULT_GENERATOR

    parser = build_parser()
    assert parser.parse_args(["demo"]).model is None  # cmd_demo fills in EXAMPLE_MODEL
    assert parser.parse_args(["demo", "--model", "smollm2"]).model == "smollm2"
    assert parser.parse_args(["ask", "q", "--corpus", "."]).model == DEFAULT_GENERATOR != EXAMPLE_MODEL
