"""RAPID on tiny models: lossless at eta = 0 (greedy token for token, sampling in distribution), exact
rollback of both caches, the direction of the retrieval-augmented distribution, and the pipeline wiring."""
import copy

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from ctxopt.cache import cache_length, layer_kv, num_layers
from ctxopt.decoding import GenerationConfig, decode, prefill
from ctxopt.errors import InputError
from ctxopt.methods import build_stages
from ctxopt.models import LoadedModel
from ctxopt.pipeline import Pipeline
from ctxopt.prompting import reframe_prompt
from ctxopt.speculative.rapid import RAPID, accept_or_resample, augment_logits

DOC = " ".join(f"Sentence {i} says the colour of box {i} is blue." for i in range(60))


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1000, 30000, (n,), generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def near_drafter(tiny_tokenizer):
    """The target's weights plus 2% noise: a different model that agrees with the target often, not always."""
    from conftest import make_tiny_lm

    lm = make_tiny_lm(tiny_tokenizer, seed=0, name="tiny-noisy")
    generator = torch.Generator().manual_seed(7)
    for weight in lm.model.parameters():
        weight.add_(0.02 * weight.std() * torch.randn(weight.shape, generator=generator))
    return lm


class HashEmbedder:
    """Bag-of-words hashed to 64 dims, L2-normalised: deterministic and instant."""

    def embed(self, texts):
        rows = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in zip(rows, texts):
            for word in text.lower().split():
                row[sum(map(ord, word)) % 64] += 1.0
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


# -- greedy: lossless token for token -------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1, 4, 10])
def test_greedy_eta0_equals_target_greedy_with_a_different_drafter(tiny_lm, near_drafter, gamma):
    ids = _ids(50)
    config = GenerationConfig(max_new_tokens=16)
    reference = decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, ids), config)
    result = RAPID(gamma=gamma, eta=0).speculate(
        tiny_lm, prefill(tiny_lm.model, ids), near_drafter, prefill(near_drafter.model, ids), config
    )
    assert result.token_ids == reference.token_ids and len(result.token_ids) == 16
    extra = result.extra
    assert 0 < extra["accepted_tokens"] < extra["proposed_tokens"]  # rejections really happened
    assert extra["acceptance_rate"] == extra["accepted_tokens"] / extra["proposed_tokens"]
    assert extra["target_forwards"] == result.forward_passes < 16


def test_decodes_in_the_prefills_own_slots(tiny_lm, near_drafter):
    """With room left by the prefill (as the pipeline's TokenPrefill and RAPID's drafter prefill leave it), both
    caches are extended in place: the prompt's entries are never copied, and the answer is the target's."""
    ids = _ids(50)
    config = GenerationConfig(max_new_tokens=16)
    reference = decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, ids), config)
    gamma = 4
    target_state = prefill(tiny_lm.model, ids, room=config.max_new_tokens)
    draft_state = prefill(near_drafter.model, ids, room=config.max_new_tokens)
    caches = [target_state.cache, draft_state.cache]
    buffers = [[t.data_ptr() for t in c.keys + c.values] for c in caches]
    result = RAPID(gamma=gamma, eta=0).speculate(tiny_lm, target_state, near_drafter, draft_state, config)
    assert result.token_ids == reference.token_ids
    assert [target_state.cache, draft_state.cache] == caches
    assert [[t.data_ptr() for t in c.keys + c.values] for c in caches] == buffers
    assert cache_length(target_state.cache) == len(ids) + len(result.token_ids) - 1


def test_target_prefill_with_pending_ids(tiny_lm, near_drafter):
    """A cache stage may hand over a prefill without logits and the last prompt token still to feed."""
    ids = _ids(50)
    config = GenerationConfig(max_new_tokens=12)
    reference = decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, ids), config)
    state = prefill(tiny_lm.model, ids[:-1])
    state.logits, state.pending_ids = None, ids[-1:]
    result = RAPID(gamma=4, eta=0).speculate(tiny_lm, state, near_drafter, prefill(near_drafter.model, ids), config)
    assert result.token_ids == reference.token_ids
    fresh = prefill(tiny_lm.model, torch.cat([ids, torch.tensor(result.token_ids[:-1])]))
    _assert_cache_equal(state.cache, fresh.cache)


def test_self_speculation_accepts_everything(tiny_lm):
    ids = _ids(50)
    config = GenerationConfig(max_new_tokens=23)
    reference = decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, ids), config)
    target_state, draft_state = prefill(tiny_lm.model, ids), prefill(tiny_lm.model, ids)
    result = RAPID(gamma=10, eta=0).speculate(tiny_lm, target_state, tiny_lm, draft_state, config)
    assert result.token_ids == reference.token_ids
    # 23 tokens = 11 + 11 (drafts and bonus) + 1 (max_new_tokens cuts the last round's gamma to 0).
    assert result.extra["acceptance_rate"] == 1.0 and result.extra["target_forwards"] == 3


def test_stops_where_plain_decoding_stops(tiny_tokenizer, near_drafter):
    from conftest import make_tiny_lm

    ids = _ids(40, seed=4)
    lm = make_tiny_lm(tiny_tokenizer, seed=0)
    plain = decode(lm.model, lm.tokenizer, prefill(lm.model, ids), GenerationConfig(max_new_tokens=20))
    stop = plain.text[len(plain.text) // 2:][:6]
    config = GenerationConfig(max_new_tokens=20, stop_strings=[stop])
    streamed: list[str] = []
    expected = decode(lm.model, lm.tokenizer, prefill(lm.model, ids), config)
    result = RAPID(gamma=4, eta=0).speculate(lm, prefill(lm.model, ids), near_drafter, prefill(near_drafter.model, ids),
                                             config, streamed.append)
    assert (result.text, result.stopped_by) == (expected.text, "stop_string") and "".join(streamed) == result.text
    lm.model.generation_config.eos_token_id = plain.token_ids[9]
    expected = decode(lm.model, lm.tokenizer, prefill(lm.model, ids), GenerationConfig(max_new_tokens=20),
                      lm.eos_token_ids)
    result = RAPID(gamma=4, eta=0).speculate(lm, prefill(lm.model, ids), near_drafter, prefill(near_drafter.model, ids),
                                             GenerationConfig(max_new_tokens=20))
    assert (result.token_ids, result.stopped_by) == (expected.token_ids, "eos") and len(result.token_ids) <= 9


# -- rollback ---------------------------------------------------------------------------------------------
def _assert_cache_equal(cache, reference) -> None:
    assert cache_length(cache) == cache_length(reference)
    for layer in range(num_layers(reference)):
        for ours, theirs in zip(layer_kv(cache, layer), layer_kv(reference, layer)):
            assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollback_leaves_both_caches_as_a_fresh_prefill(tiny_lm, near_drafter, temperature):
    ids = _ids(50)
    draft_ids = ids[2:]  # another prompt: other cache length, other positions
    target_state, draft_state = prefill(tiny_lm.model, ids), prefill(near_drafter.model, draft_ids)
    config = GenerationConfig(max_new_tokens=20, temperature=temperature, seed=5)
    stage = RAPID(gamma=4, eta=0 if temperature == 0 else 10.0)
    result = stage.speculate(tiny_lm, target_state, near_drafter, draft_state, config)
    out = torch.tensor(result.token_ids)
    assert len(out) == 20 and 0 < result.extra["accepted_tokens"] < result.extra["proposed_tokens"]
    # The target holds prompt + every answer token but the last (it is fed at the start of the next round).
    _assert_cache_equal(target_state.cache, prefill(tiny_lm.model, torch.cat([ids, out[:-1]])).cache)
    # The drafter holds its own prompt + the answer, less the last one or two (the last draft of an
    # all-accepted round is never fed to the drafter).
    kept = cache_length(draft_state.cache) - len(draft_ids)
    assert len(out) - 2 <= kept <= len(out) - 1
    _assert_cache_equal(draft_state.cache, prefill(near_drafter.model, torch.cat([draft_ids, out[:kept]])).cache)


def test_rollback_is_a_length_change_equal_to_a_fresh_prefill(tiny_lm):
    """The cursor decodes in the prefill's own row of slots: drafts fed, then rejected, then others fed leave the
    same entries as a fresh prefill of the prompt and the kept tokens, in the prefill's buffer (no copy of the
    prompt's entries, no crop)."""
    from ctxopt.speculative.rapid import _Cursor

    ids = _ids(30, seed=6)
    state = prefill(tiny_lm.model, ids, room=8)
    buffer = state.cache.keys[0].data_ptr()
    cursor = _Cursor(tiny_lm.model, state, room=8)
    assert cursor.cache is state.cache
    first = cursor.logits_after([], [101, 102, 103, 104])  # four drafts verified in one forward
    assert first.shape[0] == 5 and cursor.fed == 4
    cursor.rollback(2)  # drafts 103 and 104 rejected
    assert cursor.cache.lengths == [32] and cursor.logits is None
    again = cursor.logits_after([101, 102, 105], [106])  # the round's emitted token, then a new draft
    assert cursor.cache.keys[0].data_ptr() == buffer and cursor.fed == 4
    fresh = prefill(tiny_lm.model, torch.cat([ids, torch.tensor([101, 102, 105, 106])]))
    _assert_cache_equal(state.cache, fresh.cache)
    assert torch.allclose(again[-1], fresh.logits, atol=1e-4)
    assert torch.allclose(first[2], prefill(tiny_lm.model, torch.cat([ids, torch.tensor([101, 102])])).logits,
                          atol=1e-4)


def test_a_row_compacted_far_below_its_buffer_moves_to_a_right_sized_one(tiny_lm):
    """After a cache stage keeps 40 of a 200-token prompt's entries in place, the cursor copies those 40 into a
    row sized for them and the answer (the state's cache then), instead of decoding in the prompt's buffer."""
    from ctxopt.speculative.rapid import _Cursor

    ids = _ids(200, seed=8)
    state = prefill(tiny_lm.model, ids, room=8)
    state.cache.set_length(0, 40)  # as a cache stage leaves it: the kept entries at the front
    state.logits, state.pending_ids, state.next_position = None, ids[40:41], 40
    kept = [(k.clone(), v.clone()) for k, v in state.cache.row_layers(0)]
    cursor = _Cursor(tiny_lm.model, state, room=8)
    assert cursor.cache is state.cache and state.cache.capacity == 64 and state.cache.lengths == [40]
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(state.cache.row_layers(0), kept))
    logits = cursor.logits_after([int(ids[40])], [])
    assert torch.allclose(logits[-1], prefill(tiny_lm.model, ids[:41]).logits, atol=1e-4)


# -- sampling: the verification rule on fixed vectors --------------------------------------------------
P = torch.tensor([0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02], dtype=torch.float64)
Q = torch.tensor([0.05, 0.40, 0.05, 0.20, 0.02, 0.20, 0.06, 0.02], dtype=torch.float64)


def _exact_first_token(p, q, p_hat):
    """The first emitted token's distribution under the rule: accept x ~ q with min(1, p_hat/q), else draw
    from normalize(clamp(max(p - q, p - p_hat), 0))."""
    accept = q * torch.clamp(p_hat / q, max=1.0)
    residual = torch.clamp(torch.maximum(p - q, p - p_hat), min=0)
    return accept + (1 - accept.sum()) * residual / residual.sum()


def _first_tokens(p, q, p_hat, draws: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    p_rows, q_rows, hat_rows = torch.stack([p, p]), q[None], p_hat[None]
    counts = np.zeros(len(p))
    for x in torch.multinomial(q, draws, replacement=True, generator=generator).tolist():
        n, token = accept_or_resample([x], p_rows, q_rows, hat_rows, generator)
        counts[x if n == 1 else token] += 1
    return counts


def test_rule_with_eta0_samples_the_target_distribution():
    # With p_hat = p the residual max(p - q, p - p_hat) is the standard max(p - q, 0) and the output is p.
    assert torch.equal(torch.clamp(torch.maximum(P - Q, P - P), min=0), torch.clamp(P - Q, min=0))
    assert torch.allclose(_exact_first_token(P, Q, P), P, atol=1e-6)
    counts = _first_tokens(P, Q, P, draws=20_000, seed=0)
    assert chisquare(counts, 20_000 * P.numpy()).pvalue > 1e-3
    # The same draws scored against q (what skipping verification would give) are far off.
    assert chisquare(counts, 20_000 * Q.numpy()).pvalue < 1e-12


def test_rule_with_eta_samples_its_stated_distribution():
    p_hat = torch.softmax(augment_logits(P.log(), P, Q, eta=5.0), -1)
    exact = _exact_first_token(P, Q, p_hat)
    counts = _first_tokens(P, Q, p_hat, draws=10_000, seed=1)
    assert chisquare(counts, 10_000 * (exact / exact.sum()).numpy()).pvalue > 1e-3
    assert chisquare(counts, 10_000 * P.numpy()).pvalue < 1e-6  # eta > 0 is no longer lossless


def test_eta_pulls_the_target_toward_the_drafter_on_tokens_it_finds_likely():
    z = P.log()
    masked = Q >= 0.1 * Q.max()  # token 4 and 7 fall below the mask
    assert masked.tolist() == [True, True, True, True, False, True, True, False]
    distance = [float((torch.softmax(augment_logits(z, P, Q, eta), -1) - Q).abs().sum())
                for eta in (0.0, 1.0, 3.0, 6.0)]
    assert distance == sorted(distance, reverse=True) and distance[-1] < distance[0]
    z_hat = augment_logits(z, P, Q, eta=3.0)
    assert torch.equal(z_hat[~masked], z[~masked])  # below the mask the logit is untouched
    assert torch.allclose(z_hat[masked] - z[masked], 3.0 * (Q - P)[masked])  # + eta (q - p): toward q
    p_hat = torch.softmax(z_hat, -1)
    assert p_hat[1] > P[1] and p_hat[5] > P[5] and p_hat[0] < P[0]  # q > p gains, q < p loses


# -- sampling end to end: a 16-token toy vocabulary, exact joint of the first two tokens ---------------
def _toy_lm(tokenizer, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=True, initializer_range=0.3,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    return LoadedModel(model, tokenizer, f"toy-{seed}", torch.device("cpu"), torch.float32)


def test_sampled_rapid_eta0_follows_the_target_distribution(tiny_tokenizer):
    target, drafter = _toy_lm(tiny_tokenizer, 0), _toy_lm(tiny_tokenizer, 1)
    ids = torch.tensor([3, 7, 1, 12, 5])
    with torch.no_grad():
        first = torch.softmax(target.model(ids[None]).logits[0, -1], -1)
        pairs = torch.cat([ids.expand(16, -1), torch.arange(16)[:, None]], 1)
        second = torch.softmax(target.model(pairs).logits[:, -1], -1)
    exact = (first[:, None] * second).flatten().double().numpy()  # P(y1, y2)
    exact /= exact.sum()
    t_state, d_state = prefill(target.model, ids), prefill(drafter.model, ids)
    decoder = RAPID(gamma=2, eta=0)
    runs, counts, proposed, accepted = 600, np.zeros(256), 0, 0
    for seed in range(runs):
        result = decoder.speculate(
            target, t_state.copy(), drafter, d_state.copy(),
            GenerationConfig(max_new_tokens=3, temperature=1.0, seed=seed),
        )
        y1, y2 = result.token_ids[:2]
        counts[16 * y1 + y2] += 1
        proposed, accepted = proposed + result.extra["proposed_tokens"], accepted + result.extra["accepted_tokens"]
    assert 0.1 < accepted / proposed < 0.9
    common = exact * runs >= 5  # pool the rare cells so the chi-square approximation holds
    observed = np.append(counts[common], counts[~common].sum())
    expected = np.append(exact[common], exact[~common].sum()) * runs
    assert chisquare(observed, expected).pvalue > 1e-3
    # Scored against the drafter's own first-token distribution instead, the same counts are far off.
    draft_first = d_state.logits.double().softmax(-1).numpy()
    assert chisquare(counts.reshape(16, 16).sum(1), draft_first * runs / draft_first.sum()).pvalue < 1e-6


# -- pipeline wiring --------------------------------------------------------------------------------------
def test_through_the_pipeline_with_a_retrieval_prompt(tiny_lm, near_drafter):
    stage = RAPID(draft=near_drafter, gamma=4, eta=0, chunk_tokens=32, rag_tokens=120, threshold=None)
    pipe = Pipeline(tiny_lm, stages=[stage], max_new_tokens=12, embedder=HashEmbedder())
    streamed: list[str] = []
    answer = pipe.ask("What colour is box 3?", context=DOC, on_text=streamed.append)
    plain = Pipeline(tiny_lm, max_new_tokens=12).ask("What colour is box 3?", context=DOC)
    assert answer.token_ids == plain.token_ids and "".join(streamed).strip() == answer.text
    record = answer.stats.get("decode:rapid")
    assert record.tokens_out == 12
    extra = record.extra
    assert extra["draft_prompt_tokens"] <= 120 < len(answer.prompt)  # the budget counts the whole drafter prompt
    for key in ("acceptance_rate", "tokens_per_target_forward", "drafter_seconds", "target_forwards"):
        assert key in extra
    assert extra["tokens_per_target_forward"] == 12 / extra["target_forwards"]


def test_the_drafter_reads_the_targets_prompt_frame(tiny_lm):
    """Instruction, system message and answer prefix reach the drafter: with a context that fits rag_tokens
    the drafter's prompt is the target's, token for token (the bench gives RULER's instruction this way)."""
    pipe = Pipeline(tiny_lm, stages=[RAPID(gamma=3, eta=0, rag_tokens=10_000)], max_new_tokens=4,
                    embedder=HashEmbedder(), instruction="Answer with one colour.", system="Be brief.")
    answer = pipe.ask("What colour is box 3?", context=DOC, answer_prefix="Answer:")
    assert answer.stats.get("decode:rapid").extra["draft_prompt_tokens"] == len(answer.prompt)
    reframed = reframe_prompt(tiny_lm.tokenizer, answer.prompt, answer.prompt.passages)
    assert torch.equal(reframed.input_ids, answer.prompt.input_ids)
    shorter = reframe_prompt(tiny_lm.tokenizer, answer.prompt, [])
    assert (shorter.text.endswith("Answer:") and "Answer with one colour." in shorter.text
            and "Be brief." in shorter.text)


def test_registry_builds_rapid_with_the_budget_as_drafter_context(tiny_lm):
    (stage,) = build_stages("rapid", 100, gamma=3, eta=0.0, chunk_tokens=32)
    assert isinstance(stage, RAPID) and (stage.rag_tokens, stage.gamma, stage.eta, stage.draft) == (100, 3, 0.0, None)
    assert build_stages("rapid")[0].rag_tokens == 4096
    assert build_stages("rapid", 0.5)[0].rag_tokens == 0.5  # a ratio of the uncompressed prompt, as for any method
    with pytest.raises(InputError, match="ratio"):
        build_stages("rapid", 1.5)
    answer = Pipeline(tiny_lm, stages=[stage], max_new_tokens=8, embedder=HashEmbedder()).ask("Colour of box 7?",
                                                                                            context=DOC)
    plain = Pipeline(tiny_lm, max_new_tokens=8).ask("Colour of box 7?", context=DOC)
    assert answer.token_ids == plain.token_ids
    assert answer.stats.get("decode:rapid").extra["drafter"] == tiny_lm.name


def test_a_drafter_with_another_vocabulary_is_refused(tiny_lm):
    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.add_tokens(["<brand-new-token>"])
    other = LoadedModel(tiny_lm.model, tokenizer, "other-vocab", tiny_lm.device, tiny_lm.dtype)
    with pytest.raises(InputError, match="share one tokenizer"):
        RAPID(draft=other).resolve_drafter(tiny_lm)
