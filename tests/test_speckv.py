"""SpecKV on tiny random Llamas: the draft answer, scores and per-head selection against eager attention over
prompt + draft, decoding from the pruned cache against a per-head masked forward (and at a wrong position),
KV bytes in the stats, the no-op budget, draft reuse and the tokenizer check, and the SpecKV-PC registry entry."""
import copy

import pytest
import torch
from conftest import make_tiny_lm
from test_snapkv import (
    DOC,
    assert_valid_top_k,
    eager_attentions,
    kept_positions,
    make_prompt,
    make_run,
    masked_reference,
    pool_reference,
    random_ids,
)
from test_specpc import CONTEXT, QUESTION, make_bpe_lm

from ctxopt.attention import capture_attention
from ctxopt.cache import clone_cache
from ctxopt.compressors.speckv import SpecKV
from ctxopt.decoding import GenerationConfig, decode, forward, prefill
from ctxopt.errors import InputError
from ctxopt.methods import build_stages
from ctxopt.pipeline import Pipeline, as_passages

N, WINDOW, BUDGET, LOOKAHEAD = 48, 6, 20, 5


def speckv_state(lm, ids, stage, run=None):
    """Prefill ``ids`` under the stage's capture, keep a copy of the full cache, then compress."""
    prompt, run = make_prompt(ids), run or make_run(lm, max_new_tokens=8)
    request = stage.attention_request(prompt, run)
    with capture_attention(lm.model, request):
        state = prefill(lm.model, ids)
    original = clone_cache(state.cache)
    return stage.compress(state, prompt, run, request), original, request, run


@pytest.fixture(scope="module")
def draft_lm(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer, seed=1, layers=2, name="tiny-draft")


@pytest.mark.parametrize("kernel", [7, 1])
def test_draft_answer_scores_and_selection_match_eager_attention(tiny_lm, draft_lm, kernel):
    ids = random_ids(N, seed=21)
    stage = SpecKV(draft=draft_lm, budget=BUDGET, window=WINDOW, kernel=kernel, lookahead=LOOKAHEAD)
    state, original, request, run = speckv_state(tiny_lm, ids, stage)
    draft = run.draft_answer
    expected = draft_lm.model.generate(ids[None], max_new_tokens=LOOKAHEAD, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)
    assert draft.tolist() == expected[0, N:].tolist()  # the draft answered the same prompt, greedily
    assert run.figures["draft_tokens"] == LOOKAHEAD and not run.figures["draft_reused"]

    kv, prefix = tiny_lm.model.config.num_key_value_heads, N - WINDOW
    kept = kept_positions(original, state.cache)
    for layer, attn in enumerate(eager_attentions(tiny_lm.model, torch.cat([ids, draft]))):
        window_rows = attn[:, -(WINDOW + LOOKAHEAD):, :prefix]  # last w prompt queries + the L draft queries
        assert torch.allclose(request.records[layer],
                              attn[:, N - WINDOW : N, :prefix].reshape(kv, -1, prefix).amax(1), atol=1e-6)
        reference = pool_reference(window_rows.reshape(kv, -1, prefix).amax(1), kernel)
        assert kept[layer].shape == (kv, BUDGET - 1)
        assert (kept[layer][:, -(WINDOW - 1):] == torch.arange(prefix, N - 1)).all()
        assert_valid_top_k(kept[layer][:, : BUDGET - WINDOW], reference)
        if kernel == 1:
            assert torch.equal(kept[layer][:, : BUDGET - WINDOW],
                               reference.topk(BUDGET - WINDOW).indices.sort(-1).values)
    assert state.cache.get_seq_length() == BUDGET - 1
    assert state.next_position == N - 1 and state.logits is None and state.pending_ids.tolist() == ids[-1:].tolist()


def test_decoding_from_the_pruned_cache_equals_a_per_head_masked_forward(tiny_lm):
    model, ids, steps = tiny_lm.model, random_ids(N, seed=22), 8
    state, original, _, run = speckv_state(tiny_lm, ids, SpecKV(budget=BUDGET, window=WINDOW, lookahead=LOOKAHEAD))
    full = decode(model, tiny_lm.tokenizer, prefill(model, ids), GenerationConfig(max_new_tokens=LOOKAHEAD))
    assert run.draft_answer.tolist() == full.token_ids  # draft=None: the target's own greedy answer
    kept = kept_positions(original, state.cache)
    assert any(not torch.equal(k[0], k[1]) for k in kept)  # heads really keep different positions
    reference, logits = masked_reference(model, ids, kept, cut=N - 1, steps=steps)
    last = ids[-1:]
    with torch.no_grad():
        right = forward(model, last, positions=torch.tensor([N - 1]), cache=clone_cache(state.cache))
        # position BUDGET - 1 = the cache length
        wrong = forward(model, last, positions=torch.tensor([BUDGET - 1]), cache=clone_cache(state.cache))
    assert torch.allclose(right.logits[0, -1], logits[N - 1], atol=1e-4)
    assert (wrong.logits[0, -1] - logits[N - 1]).abs().max() > 1e-2
    assert decode(model, tiny_lm.tokenizer, state, GenerationConfig(max_new_tokens=steps)).token_ids == reference


def test_budget_covering_the_context_is_a_noop_and_equals_full_greedy(tiny_lm):
    full = Pipeline(tiny_lm, max_new_tokens=10).ask("What colour is box 3?", context=DOC)
    kept = Pipeline(tiny_lm, stages=[SpecKV(budget=10_000)], max_new_tokens=10).ask("What colour is box 3?",
                                                                                    context=DOC)
    assert kept.token_ids == full.token_ids and len(full.token_ids) == 10
    assert any("cache kept whole" in n for n in kept.stats.stages[-1].extra["notes"])


def test_pipeline_records_the_kv_bytes_kept(tiny_lm):
    (stage,) = build_stages("speckv", 64, window=8, lookahead=4)
    answer = Pipeline(tiny_lm, stages=[stage], max_new_tokens=6).ask("What colour is box 3?", context=DOC)
    prefill_record, record = answer.stats.get("prefill"), answer.stats.get("speckv")
    n = prefill_record.tokens_out
    config = tiny_lm.model.config
    per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4  # float32 K and V
    assert prefill_record.kv_bytes == n * per_position
    assert record.tokens_in == n > 64 and record.tokens_out == 63
    assert record.kv_bytes == 63 * per_position == prefill_record.kv_bytes * 63 // n
    assert len(answer.token_ids) == 6
    assert record.extra["draft_tokens"] == 4 and record.extra["draft_seconds"] > 0 and not record.extra["draft_reused"]


def test_a_draft_answer_in_the_memo_is_reused(tiny_lm):
    ids, given = random_ids(N, seed=23), random_ids(7, seed=24)
    run = make_run(tiny_lm)
    run.draft_answer = given
    stage = SpecKV(draft="no-such-model", budget=BUDGET, window=WINDOW, lookahead=5)  # loading it would fail
    state, *_ = speckv_state(tiny_lm, ids, stage, run)
    assert run.figures["draft_reused"] and run.figures["draft_tokens"] == 5
    assert state.cache.get_seq_length() == BUDGET - 1


def test_a_draft_with_another_vocabulary_is_refused(tiny_lm, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens(["zzqxword"])
    other = make_tiny_lm(tokenizer, layers=1, name="other-vocab")
    with pytest.raises(InputError, match="does not share the tokenizer"):
        speckv_state(tiny_lm, random_ids(N, seed=25),
                     SpecKV(draft=other, budget=BUDGET, window=WINDOW, cross_tokenizer=False))


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(kernel=6), dict(lookahead=-1)])
def test_bad_knobs(kwargs):
    with pytest.raises(InputError):
        SpecKV(**kwargs)


def test_speckv_pc_builds_two_stages_and_runs(tiny_lm):
    pytest.importorskip("ctxopt.compressors.specpc")
    stages = build_stages("speckv-pc", 64, window=8)
    assert [type(s).__name__ for s in stages] == ["SpecPC", "SpecKV"] and stages[0].at_least == 2048
    assert stages[0].lookahead is None and stages[1].lookahead is None  # SpecPC drafts the whole answer
    stages[0].at_least, stages[0].first_layer = 96, 1  # the tiny model: a short prompt and only 4 layers
    answer = Pipeline(tiny_lm, stages=stages, max_new_tokens=6).ask("What colour is box 3?", context=DOC)
    names = [s.stage for s in answer.stats.stages]
    assert names.index("specpc") < names.index("prefill") < names.index("speckv")
    record = answer.stats.get("speckv")
    assert record.tokens_in == 96 and record.tokens_out == 63 and len(answer.token_ids) == 6
    assert record.extra["draft_reused"] and record.extra["draft_tokens"] == 6  # SpecPC's draft answer


# -- cross-tokenizer drafts ----------------------------------------------------------------------------
def count_forwards(lm) -> list[int]:
    """A real forward pre-hook on the model's embeddings: one entry per forward of ``lm``."""
    calls: list[int] = []
    lm.model.get_input_embeddings().register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[-1]))
    return calls


@pytest.fixture(scope="module")
def bpe_lm():
    return make_bpe_lm()  # a tiny Llama on a byte-level BPE tokenizer: not the target's


@pytest.fixture
def counted_target(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer, seed=3, name="counted-target")


@pytest.mark.parametrize("cross_tokenizer", [True, None])  # asked for, or by default for another vocabulary
def test_a_draft_with_another_tokenizer_answers_in_its_tokens_and_hands_the_text_over(tiny_lm, bpe_lm, cross_tokenizer):
    """SpecKV across tokenizers: the draft (byte-level BPE) reads the prompt's text in its own tokens;
    its greedy answer reaches the target re-tokenized by the target's tokenizer; scoring and pruning as before."""
    lookahead, budget, window = 4, 40, 8
    prompt = Pipeline(tiny_lm).build_prompt(QUESTION, as_passages(CONTEXT))
    run = make_run(tiny_lm)
    stage = SpecKV(draft=bpe_lm, budget=budget, window=window, lookahead=lookahead, cross_tokenizer=cross_tokenizer)
    request = stage.attention_request(prompt, run)
    with capture_attention(tiny_lm.model, request):
        state = prefill(tiny_lm.model, prompt.input_ids)
    state = stage.compress(state, prompt, run, request)

    draft_ids = torch.tensor(bpe_lm.tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    assert not torch.equal(draft_ids, prompt.input_ids) or len(draft_ids) != len(prompt)
    greedy = bpe_lm.model.generate(draft_ids[None], max_new_tokens=lookahead, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(draft_ids):]
    words = bpe_lm.tokenizer.decode(greedy, skip_special_tokens=True)
    assert run.draft_answer.tolist() == tiny_lm.tokenizer(words, add_special_tokens=False)["input_ids"]
    assert state.cache.get_seq_length() == budget - 1 and state.pending_ids.tolist() == prompt.input_ids[-1:].tolist()


def test_speckv_pc_across_tokenizers_runs_end_to_end(tiny_lm, bpe_lm):
    stages = build_stages("speckv-pc", 40, draft=bpe_lm, window=8, lookahead=3, cross_tokenizer=True)
    stages[0].at_least, stages[0].first_layer = 80, 1
    answer = Pipeline(tiny_lm, stages=stages, max_new_tokens=3).ask(QUESTION, context=CONTEXT)
    assert answer.stats.get("specpc").tokens_out == 80 and answer.stats.get("speckv").tokens_out == 39
    assert answer.stats.get("speckv").extra["draft_reused"] and len(answer.token_ids) == 3


def test_a_draft_with_another_tokenizer_fails_before_the_targets_prefill(counted_target, bpe_lm):
    calls = count_forwards(counted_target)
    stage = SpecKV(draft=bpe_lm, budget=40, window=8, cross_tokenizer=False)
    pipe = Pipeline(counted_target, stages=[stage], max_new_tokens=2)
    with pytest.raises(InputError, match="cross_tokenizer=True"):
        pipe.ask(QUESTION, context=CONTEXT)
    assert calls == []  # no target forward ran before the refusal
    Pipeline(counted_target, max_new_tokens=1).ask(QUESTION, context=CONTEXT)
    assert calls  # the hook does count the target's forwards
