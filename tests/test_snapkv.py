"""SnapKV on a tiny random Llama: scores against eager attention, the pruned cache against the original keys and
values, decoding against a full forward masked per layer and per head, and the no-op budget.

The helpers here (eager scores, key matching, the per-head masked reference) are shared with test_speckv.py.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ctxopt.attention import capture_attention
from ctxopt.cache import clone_cache, kv_bytes
from ctxopt.compressors.snapkv import SnapKV
from ctxopt.decoding import GenerationConfig, decode, forward, prefill
from ctxopt.errors import InputError
from ctxopt.methods import build_stages
from ctxopt.pipeline import Pipeline
from ctxopt.stages import Run
from ctxopt.types import Prompt, Stats

DOC = " ".join(f"Sentence {i} says the colour of box {i} is blue." for i in range(30))


def random_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1000, 30000, (n,), generator=torch.Generator().manual_seed(seed))


def make_prompt(ids: torch.Tensor) -> Prompt:
    n = len(ids)
    return Prompt(
        input_ids=ids,
        passage_index=torch.full((n,), -1),
        char_spans=torch.full((n, 2), -1),
        segment=torch.zeros(n, dtype=torch.long),
        positions=torch.arange(n),
        passages=[],
        question="q",
    )


def make_run(lm, max_new_tokens: int = 8) -> Run:
    return Run(lm=lm, question="q", config=GenerationConfig(max_new_tokens=max_new_tokens), stats=Stats())


def eager_attentions(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer (heads, T, T): eager attention weights with output_attentions, the independent reference."""
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        return [a[0] for a in eager(input_ids=ids[None], output_attentions=True).attentions]


def pool_reference(x: torch.Tensor, kernel: int, pooling: str = "max") -> torch.Tensor:
    """Centred pooling by explicit windows: -inf padding for max, zero padding counted in the mean for avg."""
    half = kernel // 2
    padded = F.pad(x, (half, half), value=float("-inf") if pooling == "max" else 0.0)
    windows = padded.unfold(-1, kernel, 1)
    return windows.amax(-1) if pooling == "max" else windows.mean(-1)


def kept_positions(original, pruned) -> list[torch.Tensor]:
    """Per layer (kv_heads, k): which original position each pruned entry is, found by matching its key
    exactly; asserts that every entry is one original key AND that its value is that position's value."""
    found = []
    for before, after in zip(original.layers, pruned.layers):
        same = (after.keys[0, :, :, None, :] == before.keys[0, :, None, :, :]).all(-1)  # (kv, k, n)
        assert (same.sum(-1) == 1).all()
        index = same.float().argmax(-1)
        gathered = torch.gather(before.values[0], 1, index[..., None].expand(-1, -1, before.values.shape[-1]))
        assert torch.equal(after.values[0], gathered)
        found.append(index)
    return found


def assert_valid_top_k(selected: torch.Tensor, reference: torch.Tensor, atol: float = 1e-6) -> None:
    """Each row of ``selected`` (kv, k) is a top-k of that row of ``reference`` scores (kv, prefix), ties allowed."""
    for chosen, scores in zip(selected, reference):
        assert len(set(chosen.tolist())) == len(chosen)
        kth = scores.topk(len(chosen)).values[-1]
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[chosen] = True
        assert (scores[mask] >= kth - atol).all() and (scores[~mask] <= kth + atol).all()


_ALLOWED: dict[int, torch.Tensor] = {}


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention under the per-layer, per-head boolean mask in _ALLOWED (the given mask is ignored)."""
    groups = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ keys.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~_ALLOWED[module.layer_idx], float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2).contiguous(), None


AttentionInterface.register("ctxopt_test_masked", _masked_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("ctxopt_test_masked", sdpa_mask)


def masked_reference(model, prompt: torch.Tensor, kept: list[torch.Tensor], cut: int, steps: int):
    """Greedy tokens and per-row logits of a cache-free forward over prompt + generated tokens where, in layer
    l and KV head h, every row from ``cut`` on sees only prompt columns kept[l][h] below ``cut`` (and columns
    from ``cut`` on, causally); earlier rows keep full causal attention, as when the cache was filled."""
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "ctxopt_test_masked"
    heads = model.config.num_attention_heads
    generated: list[int] = []
    for _ in range(steps):
        seq = torch.cat([prompt, torch.tensor(generated, dtype=torch.long)])
        total = len(seq)
        for layer, index in enumerate(kept):
            allowed = torch.tril(torch.ones(total, total, dtype=torch.bool)).repeat(heads, 1, 1)
            assert index.max() < cut
            visible = torch.zeros(index.shape[0], cut, dtype=torch.bool).scatter(1, index, True)
            visible = visible.repeat_interleave(heads // index.shape[0], 0)
            allowed[:, cut:, :cut] &= visible[:, None, :]
            _ALLOWED[layer] = allowed
        with torch.no_grad():
            logits = reference(input_ids=seq[None], position_ids=torch.arange(total)[None]).logits[0]
        generated.append(int(logits[-1].argmax()))
    return generated, logits


def snapkv_state(lm, ids: torch.Tensor, stage: SnapKV):
    """Prefill ``ids`` under the stage's capture, keep a copy of the full cache, then compress."""
    prompt, run = make_prompt(ids), make_run(lm)
    request = stage.attention_request(prompt, run)
    with capture_attention(lm.model, request):
        state = prefill(lm.model, ids)
    original = clone_cache(state.cache)
    return stage.compress(state, prompt, run, request), original, request


@pytest.mark.parametrize("pooling, kernel", [("max", 5), ("avg", 5), ("max", 1)])
def test_scores_and_selection_match_eager_attention(tiny_lm, pooling, kernel):
    ids, window, budget = random_ids(48, seed=11), 8, 24
    stage = SnapKV(budget=budget, window=window, kernel=kernel, pooling=pooling)
    state, original, request = snapkv_state(tiny_lm, ids, stage)
    kv = tiny_lm.model.config.num_key_value_heads
    kept = kept_positions(original, state.cache)
    for layer, attn in enumerate(eager_attentions(tiny_lm.model, ids)):
        per_head = pool_reference(attn[:, -window:, : len(ids) - window].mean(1), kernel, pooling)
        reference = per_head.view(kv, -1, per_head.shape[-1]).mean(1)
        assert torch.allclose(request.records[layer], reference, atol=1e-6)
        assert kept[layer].shape == (kv, budget)
        assert (kept[layer][:, -window:] == torch.arange(len(ids) - window, len(ids))).all()
        assert_valid_top_k(kept[layer][:, :-window], reference)
        if kernel == 1:  # no pooling plateaus: the selection is unique
            assert torch.equal(kept[layer][:, :-window], reference.topk(budget - window).indices.sort(-1).values)
    assert state.next_position == len(ids) and state.pending_ids is None
    assert state.cache.get_seq_length() == budget
    assert kv_bytes(state.cache) == kv_bytes(original) * budget // len(ids)


def test_decoding_from_the_pruned_cache_equals_a_per_head_masked_forward(tiny_lm):
    model, ids, steps = tiny_lm.model, random_ids(48, seed=12), 8
    state, original, _ = snapkv_state(tiny_lm, ids, SnapKV(budget=24, window=8))
    kept = kept_positions(original, state.cache)
    assert any(not torch.equal(k[0], k[1]) for k in kept)  # heads really keep different positions
    reference, logits = masked_reference(model, ids, kept, cut=len(ids), steps=steps)
    first = reference[0]
    assert int(state.logits.argmax()) == first
    with torch.no_grad():
        right = forward(model, torch.tensor([first]), positions=torch.tensor([len(ids)]),
                        cache=clone_cache(state.cache))
        wrong = forward(model, torch.tensor([first]), positions=torch.tensor([24]), cache=clone_cache(state.cache))
    assert torch.allclose(right.logits[0, -1], logits[len(ids)], atol=1e-4)
    assert (wrong.logits[0, -1] - logits[len(ids)]).abs().max() > 1e-2
    assert decode(model, tiny_lm.tokenizer, state, GenerationConfig(max_new_tokens=steps)).token_ids == reference


def test_budget_covering_the_context_is_a_noop(tiny_lm):
    full = Pipeline(tiny_lm, max_new_tokens=8).ask("What colour is box 3?", context=DOC)
    kept = Pipeline(tiny_lm, stages=[SnapKV(budget=10_000)], max_new_tokens=8).ask("What colour is box 3?", context=DOC)
    assert kept.token_ids == full.token_ids
    assert kept.stats.get("snapkv").kv_bytes == full.stats.get("prefill").kv_bytes
    assert any("cache kept whole" in n for n in kept.stats.stages[-1].extra["notes"])


def test_pipeline_records_the_smaller_cache(tiny_lm):
    (stage,) = build_stages("snapkv", 96, window=16, kernel=5)
    answer = Pipeline(tiny_lm, stages=[stage], max_new_tokens=6).ask("What colour is box 3?", context=DOC)
    prefill_record, record = answer.stats.get("prefill"), answer.stats.get("snapkv")
    assert record.tokens_in == prefill_record.tokens_out > 96 and record.tokens_out == 96
    assert record.kv_bytes == prefill_record.kv_bytes * 96 // prefill_record.tokens_out
    assert len(answer.token_ids) == 6


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(kernel=4), dict(pooling="sum")])
def test_bad_knobs(kwargs):
    with pytest.raises(InputError):
        SnapKV(**kwargs)


def test_budget_not_above_the_window(tiny_lm):
    with pytest.raises(InputError, match="must exceed the window"):
        SnapKV(budget=8, window=8).attention_request(make_prompt(random_ids(48, seed=1)), make_run(tiny_lm))


def test_registry_passes_the_pooling_option():
    from ctxopt.methods import build_stages

    assert build_stages("snapkv", 256, pooling="avg")[0].pooling == "avg"
    assert build_stages("snapkv", 256)[0].pooling == "max"
