"""The decode loop against transformers' own generate, and decoding from a pruned cache at explicit
positions against an independent masked full-sequence forward."""
import torch

from ctxopt.cache import kv_bytes, keep_per_head
from ctxopt.decoding import GenerationConfig, StopChecker, decode, forward, prefill


def _ids(n: int, seed: int = 1, vocab: int = 30000) -> torch.Tensor:
    return torch.randint(1000, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_greedy_decode_equals_transformers_generate(tiny_lm):
    ids = _ids(40)
    state = prefill(tiny_lm.model, ids)
    ours = decode(tiny_lm.model, tiny_lm.tokenizer, state, GenerationConfig(max_new_tokens=24))
    reference = tiny_lm.model.generate(
        ids.unsqueeze(0), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(ids):].tolist()
    assert ours.token_ids == reference
    assert len(ours.token_ids) == 24


def test_chunked_prefill_matches_single_pass(tiny_lm):
    ids = _ids(50, seed=3)
    whole = prefill(tiny_lm.model, ids)
    chunked = prefill(tiny_lm.model, ids, chunk_size=16)
    assert torch.allclose(whole.logits, chunked.logits, atol=1e-4)
    assert chunked.next_position == 50


def _masked_reference(model, prompt: torch.Tensor, kept: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (and the first step's logits) when the last prompt token and the generated tokens may
    attend only to the kept prompt positions (and each other), computed by a full forward over
    prompt + generated with an explicit 4-D mask and no cache. Earlier prompt tokens keep full causal
    attention, as they had when the cache was filled."""
    generated: list[int] = []
    first_logits = None
    n = len(prompt)
    for _ in range(steps):
        seq = torch.cat([prompt, torch.tensor(generated, dtype=torch.long)])
        total = len(seq)
        allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[kept] = False
        allowed[n - 1:, :n] &= ~dropped
        mask = torch.zeros(total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)
        with torch.no_grad():
            logits = model(input_ids=seq.unsqueeze(0), attention_mask=mask[None, None], position_ids=torch.arange(total)[None]).logits
        first_logits = logits[0, n - 1] if first_logits is None else first_logits
        generated.append(int(logits[0, -1].argmax()))
    return generated, first_logits


KEPT = torch.cat([torch.arange(0, 10), torch.arange(20, 30), torch.arange(40, 48)])


def _pruned_state(model, prompt, next_position):
    """Prefill all but the last prompt token, keep KEPT positions in every head, re-feed the last token."""
    state = prefill(model, prompt[:-1])
    heads = model.config.num_key_value_heads
    keep_per_head(state.cache, [KEPT[:-1].view(1, 1, -1).expand(1, heads, -1)] * model.config.num_hidden_layers)
    state.logits, state.pending_ids, state.next_position = None, prompt[-1:], next_position
    return state


def test_decode_from_pruned_cache_at_explicit_position(tiny_lm):
    model = tiny_lm.model
    prompt = _ids(48, seed=5)
    reference, reference_logits = _masked_reference(model, prompt, KEPT, steps=12)
    full = prefill(model, prompt[:-1])
    state = _pruned_state(model, prompt, next_position=len(prompt) - 1)
    assert kv_bytes(state.cache) == kv_bytes(full.cache) * (len(KEPT) - 1) // (len(prompt) - 1)
    assert state.cache.get_seq_length() == len(KEPT) - 1
    with torch.no_grad():
        first = forward(model, prompt[-1:], positions=torch.tensor([47]), cache=_pruned_state(model, prompt, 47).cache)
    assert torch.allclose(first.logits[0, -1], reference_logits, atol=1e-4)
    ours = decode(model, tiny_lm.tokenizer, state, GenerationConfig(max_new_tokens=12))
    assert ours.token_ids == reference


def test_wrong_position_changes_the_answer(tiny_lm):
    """Guard for the test above: feeding at the cache length (what generate() assumes) gives other logits."""
    model = tiny_lm.model
    prompt = _ids(48, seed=5)
    reference, reference_logits = _masked_reference(model, prompt, KEPT, steps=12)
    wrong_position = len(KEPT) - 1
    with torch.no_grad():
        wrong = forward(model, prompt[-1:], positions=torch.tensor([wrong_position]), cache=_pruned_state(model, prompt, 0).cache)
    assert (wrong.logits[0, -1] - reference_logits).abs().max() > 1e-2
    decoded = decode(model, tiny_lm.tokenizer, _pruned_state(model, prompt, wrong_position), GenerationConfig(max_new_tokens=12))
    assert decoded.token_ids != reference


def test_sampling_is_seeded_and_respects_top_p(tiny_lm):
    ids = _ids(30, seed=7)
    config = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    first = decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, ids), config).token_ids
    second = decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, ids), config).token_ids
    assert first == second
    # top_p tiny -> only the most likely token survives -> sampling equals greedy.
    nucleus = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=1)
    greedy = decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, ids), GenerationConfig(max_new_tokens=10))
    assert decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, ids), nucleus).token_ids == greedy.token_ids


def test_stop_strings_and_streaming(tiny_tokenizer):
    streamed: list[str] = []
    checker = StopChecker(tiny_tokenizer, eos_ids=[102], stop_strings=["paris"], on_text=streamed.append)
    tokens = tiny_tokenizer("the answer is paris and more", add_special_tokens=False)["input_ids"]
    stopped_at = None
    for i, token in enumerate(tokens):
        if checker.push(token):
            stopped_at = i
            break
    checker.finish()
    assert stopped_at is not None and checker.reason == "stop_string"
    assert checker.text.strip() == "the answer is"
    assert "".join(streamed) == checker.text
    eos = StopChecker(tiny_tokenizer, eos_ids=[102], stop_strings=[], on_text=None)
    assert eos.push(102) and eos.reason == "eos" and eos.ids == []


def test_forward_uses_explicit_positions(tiny_lm):
    ids = _ids(12, seed=9)
    a = forward(tiny_lm.model, ids, positions=torch.arange(12)).logits
    b = forward(tiny_lm.model, ids, positions=torch.arange(12) * 3).logits  # RoPE: only gaps matter
    assert not torch.allclose(a, b)
