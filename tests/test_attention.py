"""Attention capture against eager attention with output_attentions, and the early stop."""
import copy

import torch
import transformers.integrations.sdpa_attention as transformers_sdpa

from ctxopt.attention import (
    GROUPED_SDPA,
    AttentionCapture,
    capture_attention,
    is_lower_right_causal,
    lower_right_causal_attention,
    use_grouped_sdpa,
)
from ctxopt.decoding import forward, prefill


def test_capture_equals_eager_attention(tiny_lm):
    model = tiny_lm.model
    ids = torch.randint(1000, 30000, (40,), generator=torch.Generator().manual_seed(0))
    window = 8
    request = AttentionCapture(window=window)
    with capture_attention(model, request):
        forward(model, ids, positions=torch.arange(40))
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        reference = eager(input_ids=ids[None], output_attentions=True).attentions
    worst = 0.0
    for layer, attn in enumerate(reference):
        ours = request.records[layer].probs()
        worst = max(worst, (ours - attn[0, :, -window:]).abs().max().item())
    print(f"max abs diff vs eager attention: {worst:.2e}")
    assert worst < 1e-5
    assert model.config._attn_implementation == "sdpa"  # restored


def test_capture_on_the_last_chunk_of_a_cached_prefill(tiny_lm):
    """With a chunked prefill the record is the prompt's end: the last chunk's queries against all keys."""
    model = tiny_lm.model
    ids = torch.randint(1000, 30000, (48,), generator=torch.Generator().manual_seed(1))
    whole, chunked = AttentionCapture(window=6), AttentionCapture(window=6)
    with capture_attention(model, whole):
        prefill(model, ids)
    with capture_attention(model, chunked):
        prefill(model, ids, chunk_size=16)
    for layer in whole.records:
        assert torch.allclose(whole.records[layer].probs(), chunked.records[layer].probs(), atol=1e-5)


def test_stop_after_runs_only_the_first_layers(tiny_lm):
    model = tiny_lm.model
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(model.model.layers)]
    try:
        request = AttentionCapture(window=1, layers=[1], stop_after=1, reducer=lambda rec: rec.raw.sum(0)[0])
        with capture_attention(model, request):
            forward(model, torch.arange(1000, 1020), positions=torch.arange(20))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0]  # layer 0 finished; layer 1 stopped inside its attention; layers 2-3 never ran
    assert list(request.records) == [1] and request.records[1].shape == (20,)


def test_capture_on_a_model_already_running_grouped_sdpa_switches_nothing(tiny_lm):
    """A model from load_model runs GROUPED_SDPA already: the capture records the same window as on a model that is
    switched for the block, leaves the implementation alone, and ignores another model forwarded inside the block."""
    ids = torch.randint(1000, 30000, (40,), generator=torch.Generator().manual_seed(4))
    switched = AttentionCapture(window=8)
    with capture_attention(tiny_lm.model, switched):
        forward(tiny_lm.model, ids, positions=torch.arange(40))
    native = copy.deepcopy(tiny_lm.model)
    use_grouped_sdpa(native)
    other = copy.deepcopy(native)
    layers_seen = []
    direct = AttentionCapture(window=8, reducer=lambda record: layers_seen.append(record.layer) or record)
    with capture_attention(native, direct):
        assert native.config._attn_implementation == GROUPED_SDPA
        forward(native, ids, positions=torch.arange(40))
        forward(other, ids, positions=torch.arange(40))
    assert native.config._attn_implementation == GROUPED_SDPA
    assert layers_seen == list(range(native.config.num_hidden_layers))
    for layer, record in switched.records.items():
        torch.testing.assert_close(direct.records[layer].raw, record.raw)


def test_grouped_sdpa_matches_eager_on_a_masked_cached_forward_without_copying_heads(tiny_lm, monkeypatch):
    """Several tokens against a cache (RAPID's verification, a chunked prefill) carry a mask. GROUPED_SDPA must
    give eager attention's logits there and must not repeat the KV heads per query head (transformers' SDPA
    does, which is the cost it removes)."""
    ids = torch.randint(1000, 30000, (40,), generator=torch.Generator().manual_seed(2))
    repeats = []
    original_repeat = transformers_sdpa.repeat_kv
    monkeypatch.setattr(transformers_sdpa, "repeat_kv", lambda *a: repeats.append(1) or original_repeat(*a))

    def last_five_logits(implementation: str) -> torch.Tensor:
        model = copy.deepcopy(tiny_lm.model)
        model.config._attn_implementation = implementation
        state = prefill(model, ids[:35], chunk_size=16)
        return forward(model, ids[35:], positions=torch.arange(35, 40), cache=state.cache, logits_to_keep=5).logits

    reference = last_five_logits("eager")
    assert tiny_lm.model.config.num_key_value_heads < tiny_lm.model.config.num_attention_heads
    torch.testing.assert_close(last_five_logits("sdpa"), reference, rtol=1e-5, atol=1e-5)
    assert repeats  # transformers' own SDPA copies the heads on this forward
    repeats.clear()
    torch.testing.assert_close(last_five_logits(GROUPED_SDPA), reference, rtol=1e-5, atol=1e-5)
    assert not repeats


def test_the_masks_of_new_tokens_after_a_cache_are_recognised_as_lower_right_causal(tiny_lm):
    """The masks transformers builds for a chunked prefill's later chunks and for a multi-token forward on a cache
    are the ones the CUDA fast path may replace by lower-right causal attention; a mask with padding, or one that
    hides early keys (a sliding window), is not."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, key.shape[-2], query.shape[-2]))
        return transformers_sdpa.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ctxopt_test_spy", spy)
    ALL_MASK_ATTENTION_FUNCTIONS.register("ctxopt_test_spy", sdpa_mask)
    model = copy.deepcopy(tiny_lm.model)
    model.config._attn_implementation = "ctxopt_test_spy"
    ids = torch.arange(1000, 1040)
    state = prefill(model, ids[:35], chunk_size=16)
    forward(model, ids[35:], positions=torch.arange(35, 40), cache=state.cache, logits_to_keep=5)
    after_cache = [(mask, keys) for mask, keys, queries in seen if keys > queries]
    assert {(keys, mask.shape[-2]) for mask, keys in after_cache} == {(32, 16), (35, 3), (40, 5)}
    assert all(is_lower_right_causal(mask, keys) for mask, keys in after_cache)

    mask, keys = after_cache[-1]
    padded = mask.clone()
    padded[..., 0] = False
    assert not is_lower_right_causal(padded, keys)
    future = mask.clone()
    future[..., 0, -1] = True
    assert not is_lower_right_causal(future, keys)
    assert not is_lower_right_causal(mask[..., :1, :], keys)  # one query: no mask needed at all


def test_lower_right_causal_attention_equals_masked_grouped_attention():
    """5 new queries after 35 cached keys, 8 query heads sharing 2 KV heads: the same output as SDPA given the
    explicit mask and every KV head repeated per query head."""
    import warnings

    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 8, 5, 16, generator=generator)
    key, value = (torch.randn(1, 2, 40, 16, generator=generator) for _ in range(2))
    mask = torch.ones(5, 40, dtype=torch.bool).tril(35)
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(4, dim=1), value.repeat_interleave(4, dim=1), attn_mask=mask, scale=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on CPU torch says why it falls back from the fused kernels
        ours = lower_right_causal_attention(query, key, value, scaling=0.3)
    assert ours.shape == (1, 5, 8, 16)
    torch.testing.assert_close(ours, reference.transpose(1, 2), rtol=1e-5, atol=1e-5)
