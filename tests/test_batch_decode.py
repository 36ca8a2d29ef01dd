"""The batched decode loop (``BatchDecoder``, which ``decode`` runs with one request) against the eager loop it
replaced, for every method's prefilled state; a batch against each request alone; requests joining mid-run;
shared-prefix (Hydragen) attention against attention over the concatenated keys and against plain batched
decoding; ``ask_many`` through it."""
import threading

import pytest
import torch
from conftest import make_tiny_lm
from transformers import DynamicCache

from ctxopt.attention import use_grouped_sdpa
from ctxopt.attention.shared_prefix import SharedPrefix, combined_attention
from ctxopt.cache import (
    SlotCache,
    clone_cache,
    crop_cache,
    keep_per_head,
    kv_bytes,
    layer_kv,
    new_cache,
    num_layers,
)
from ctxopt.decoding import BatchDecoder, GenerationConfig, Prefill, decode, forward, prefill, slot_forward
from ctxopt.methods import build_stages
from ctxopt.pipeline import Pipeline

DOC = " ".join(f"Sentence {i} says the colour of box {i} is {'red' if i % 7 == 3 else 'blue'}." for i in range(40))
QUESTIONS = ["What colour is box 3?", "Which box is red?", "What does sentence 12 say about its box?",
             "Colour of box 39?"]


def run_joined(shared, call, n: int) -> list[threading.Thread]:
    """Run ``call(i)`` for i < n in threads that all queue their request before the shared batch's first step
    (the step lock is held until all n are queued), so they all join it; wait for them and return them."""
    with shared._step_lock:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        while len(shared._queued) < n:
            threading.Event().wait(0.001)
    for thread in threads:
        thread.join()
    return threads


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1000, 30000, (n,), generator=torch.Generator().manual_seed(seed))


def as_dynamic(model, cache) -> DynamicCache:
    """A transformers DynamicCache holding a copy of ``cache``'s entries: what the references below run on."""
    dynamic = new_cache(model)
    with torch.inference_mode():
        for layer in range(num_layers(cache)):
            keys, values = layer_kv(cache, layer)
            dynamic.update(keys.clone(), values.clone(), layer)
    return dynamic


def fresh_prefill(model, ids: torch.Tensor) -> DynamicCache:
    """A prefill of ``ids`` into a transformers DynamicCache (the reference for what a slot row must hold)."""
    return prefill(model, ids, cache=new_cache(model)).cache


def eager_greedy(model, state: Prefill, max_new_tokens: int, eos_ids=()) -> list[int]:
    """The decode loop as it was before the batched one: a transformers DynamicCache grown one token per forward."""
    cache, position, logits = as_dynamic(model, state.cache), state.next_position, state.logits
    with torch.inference_mode():
        if state.pending_ids is not None and len(state.pending_ids):
            pending = state.pending_ids
            out = forward(model, pending, positions=torch.arange(position, position + len(pending)), cache=cache)
            logits, position = out.logits[0, -1].float(), position + len(pending)
        ids: list[int] = []
        while True:
            token = int(logits.argmax(-1))
            if token in eos_ids:
                break
            ids.append(token)
            if len(ids) >= max_new_tokens:
                break
            out = forward(model, torch.tensor([token]), positions=torch.tensor([position]), cache=cache)
            logits, position = out.logits[0, -1].float(), position + 1
    return ids


@pytest.fixture(scope="module")
def grouped_lm(tiny_tokenizer):
    """The tiny model running GROUPED_SDPA, as every load_model model does (shared-prefix attention needs it)."""
    lm = make_tiny_lm(tiny_tokenizer)
    use_grouped_sdpa(lm.model)
    return lm


def _method_stages(name: str, lm):
    from test_rapid import HashEmbedder  # noqa: F401  (the embedder RAPID's retrieval uses below)
    from test_refrag import tiny_adapter

    if name == "full":
        return []
    if name == "snapkv":
        return build_stages("snapkv", 96, window=8)
    if name == "speckv":
        return build_stages("speckv", 64, window=8, lookahead=4)
    if name == "specpc":
        return build_stages("specpc", 60, window=8, first_layer=1, kernel=3)
    if name == "gemfilter":
        return build_stages("gemfilter", 60, layer=1)
    if name == "refrag":
        return build_stages("refrag", None, adapter=tiny_adapter(lm.tokenizer, lm))
    raise ValueError(name)


METHODS = ["full", "snapkv", "speckv", "specpc", "gemfilter", "refrag"]


def _prefilled(pipe: Pipeline, question: str) -> Prefill:
    """What LocalGenerator.generate hands its decoder: the prompt prefilled (or input-staged) and compressed."""
    prompt = pipe.compress(question, DOC)
    run = pipe._run_for(prompt, {})
    generator = pipe.generator
    asker, request = generator.attention_request(prompt, run)
    state = generator.prefill(prompt, run, request)
    return generator.compress_cache(state, prompt, run, asker, request)


@pytest.fixture(scope="module")
def method_states(tiny_lm):
    """Per method, the decoder's starting state for two questions (pruned caches, pending ids, REFRAG's
    embeddings-prefilled cache)."""
    states = {}
    for name in METHODS:
        pipe = Pipeline(tiny_lm, stages=_method_stages(name, tiny_lm), max_new_tokens=10)
        states[name] = [_prefilled(pipe, q) for q in QUESTIONS[:2]]
    return states


@pytest.mark.parametrize("method", METHODS)
def test_decode_equals_the_eager_loop_for_every_method(tiny_lm, method_states, method):
    for state in method_states[method]:
        reference = eager_greedy(tiny_lm.model, state.copy(), 12)
        ours = decode(tiny_lm.model, tiny_lm.tokenizer, state.copy(), GenerationConfig(max_new_tokens=12))
        assert ours.token_ids == reference and len(ours.token_ids) == 12


def test_rapid_at_eta0_equals_the_eager_loop(tiny_lm):
    from test_rapid import HashEmbedder

    stage = build_stages("rapid", 60, gamma=3, eta=0.0, chunk_tokens=16, threshold=None)
    pipe = Pipeline(tiny_lm, stages=stage, max_new_tokens=12, embedder=HashEmbedder())
    answer = pipe.ask(QUESTIONS[0], context=DOC)
    state = _prefilled(Pipeline(tiny_lm, max_new_tokens=12), QUESTIONS[0])
    assert answer.token_ids == eager_greedy(tiny_lm.model, state, 12)
    assert answer.stats.get("decode:rapid").extra["accepted_tokens"] < answer.stats.get("decode:rapid").extra[
        "proposed_tokens"]  # the drafter over 60 tokens of chunks is rejected at times


def test_a_batch_of_every_method_equals_each_alone(tiny_lm, method_states):
    """Rows of different lengths, pruned or not, with pending ids or logits, different max_new_tokens: each row's
    answer is the one it gets alone; rows leave at different steps."""
    states = [s for name in METHODS for s in method_states[name]]
    configs = [GenerationConfig(max_new_tokens=4 + 3 * (i % 4)) for i in range(len(states))]
    alone = [decode(tiny_lm.model, tiny_lm.tokenizer, s.copy(), c).token_ids for s, c in zip(states, configs)]
    decoder = BatchDecoder(tiny_lm.model, tiny_lm.tokenizer)
    requests = [decoder.submit(s.copy(), c) for s, c in zip(states, configs)]
    decoder.run()
    assert [r.result.token_ids for r in requests] == alone
    assert all(r.result.extra["batch_size"] == len(states) for r in requests)
    assert decoder.steps == max(c.max_new_tokens for c in configs) - 1 + 1  # the join forward, then one per token


def test_requests_join_and_leave_between_steps(tiny_lm):
    states = [prefill(tiny_lm.model, _ids(n, seed)) for seed, n in enumerate([30, 12, 45, 21, 9])]
    configs = [GenerationConfig(max_new_tokens=m) for m in (6, 15, 3, 10, 8)]
    alone = [decode(tiny_lm.model, tiny_lm.tokenizer, s.copy(), c).token_ids for s, c in zip(states, configs)]
    decoder = BatchDecoder(tiny_lm.model, tiny_lm.tokenizer)
    requests = [decoder.submit(states[0].copy(), configs[0]), decoder.submit(states[1].copy(), configs[1])]
    for _ in range(3):
        decoder.step()
    requests.append(decoder.submit(states[2].copy(), configs[2]))
    decoder.step()
    requests += [decoder.submit(s.copy(), c) for s, c in zip(states[3:], configs[3:])]
    finished = []
    while decoder.busy:
        finished += decoder.step()
    assert [r.result.token_ids for r in requests] == alone
    assert [r.result.extra["batch_size"] for r in requests] == [5] * 5  # all five decoded together at step 5
    assert sorted(map(id, finished)) == sorted(map(id, requests))


def test_joining_a_running_batch_grows_it_with_room_to_spare(tiny_lm):
    decoder = BatchDecoder(tiny_lm.model, tiny_lm.tokenizer)
    config = GenerationConfig(max_new_tokens=20)
    decoder.submit(prefill(tiny_lm.model, _ids(10, 0)), config)
    decoder.step()
    sizes = []
    for seed in range(1, 5):
        decoder.submit(prefill(tiny_lm.model, _ids(10, seed)), config)
        decoder.step()
        sizes.append(decoder.cache.row_capacity)
    assert sizes == [2, 4, 4, 8]  # reallocated (each time a copy of the batch) at 2, 3 and 5 rows, not at 4
    decoder.run()
    assert decoder.cache is None


def test_sampling_in_a_batch_equals_alone_with_the_same_seed(tiny_lm):
    states = [prefill(tiny_lm.model, _ids(n, seed)) for seed, n in enumerate([25, 40, 13])]
    configs = [GenerationConfig(max_new_tokens=9, temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    configs[1] = GenerationConfig(max_new_tokens=9)  # greedy beside sampled rows
    alone = [decode(tiny_lm.model, tiny_lm.tokenizer, s.copy(), c).token_ids for s, c in zip(states, configs)]
    decoder = BatchDecoder(tiny_lm.model, tiny_lm.tokenizer)
    requests = [decoder.submit(s.copy(), c) for s, c in zip(states, configs)]
    decoder.run()
    assert [r.result.token_ids for r in requests] == alone


def test_each_request_stops_on_its_own(tiny_lm):
    ids = [_ids(n, seed) for seed, n in enumerate([30, 22, 17])]
    plain = [decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, i), GenerationConfig(max_new_tokens=16))
             for i in ids]
    eos = plain[0].token_ids[4]  # the first request ends at its 5th token (EOS is not part of the answer)
    stop = plain[1].text[len(plain[1].text) // 2:][:5]
    configs = [GenerationConfig(max_new_tokens=16), GenerationConfig(max_new_tokens=16, stop_strings=[stop]),
               GenerationConfig(max_new_tokens=16)]
    alone = [decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, i), c, [eos])
             for i, c in zip(ids, configs)]
    streamed: list[list[str]] = [[], [], []]
    decoder = BatchDecoder(tiny_lm.model, tiny_lm.tokenizer, [eos])
    requests = [decoder.submit(prefill(tiny_lm.model, i), c, streamed[k].append)
                for k, (i, c) in enumerate(zip(ids, configs))]
    decoder.run()
    assert [(r.result.token_ids, r.result.text, r.result.stopped_by) for r in requests] == \
        [(a.token_ids, a.text, a.stopped_by) for a in alone]
    assert requests[0].result.stopped_by == "eos" and requests[1].result.stopped_by == "stop_string"
    assert ["".join(s) for s in streamed] == [r.result.text for r in requests]


def test_the_slot_cache_holds_each_row_as_a_fresh_prefill_would(tiny_lm):
    """After decoding, every row's entries equal a fresh prefill of its prompt and the tokens it fed."""
    ids = [_ids(n, seed) for seed, n in enumerate([19, 33])]
    decoder = BatchDecoder(tiny_lm.model, tiny_lm.tokenizer)
    requests = [decoder.submit(prefill(tiny_lm.model, i), GenerationConfig(max_new_tokens=30)) for i in ids]
    for _ in range(6):
        decoder.step()
    for row, (request, prompt) in enumerate(zip(requests, ids)):
        fed = request.stopper.ids  # a step chooses every row's token, then feeds it
        fresh = fresh_prefill(tiny_lm.model, torch.cat([prompt, torch.tensor(fed, dtype=torch.long)]))
        assert decoder.cache.lengths[row] == len(prompt) + len(fed)
        for layer, (keys, values) in enumerate(decoder.cache.row_layers(row)):
            assert torch.allclose(keys, fresh.layers[layer].keys, atol=1e-5)
            assert torch.allclose(values, fresh.layers[layer].values, atol=1e-5)


@pytest.mark.parametrize("step", ["dynamic", "fixed"])
def test_decode_leaves_the_state_holding_what_it_fed(tiny_lm, monkeypatch, step):
    """As the eager loop did to its DynamicCache: the prompt and every answer token but the last (the fixed step
    writes each entry at its row's length, as the dynamic one does)."""
    monkeypatch.setenv("CTXOPT_DECODE_STEP", step)
    ids = _ids(26, 4)
    state = prefill(tiny_lm.model, ids)
    result = decode(tiny_lm.model, tiny_lm.tokenizer, state, GenerationConfig(max_new_tokens=7))
    fresh = fresh_prefill(tiny_lm.model, torch.cat([ids, torch.tensor(result.token_ids[:-1])]))
    assert state.cache.get_seq_length() == len(ids) + 6 and result.kv_bytes == kv_bytes(state.cache)
    for layer in range(len(fresh.layers)):
        assert torch.allclose(layer_kv(state.cache, layer)[0], fresh.layers[layer].keys, atol=1e-5)


def test_cache_stages_compact_the_prefill_slots_in_place(tiny_lm):
    """A prefill fills one row of preallocated slots; ``keep_per_head`` moves each head's kept entries to the row's
    front slots (the same buffers: no new cache), equal to the old gather over a transformers cache; decoding from
    the compacted row equals the eager loop over the gathered transformers cache; ``crop_cache`` is a length
    change in the same buffers."""
    model, n, k = tiny_lm.model, 40, 12
    state = prefill(model, _ids(n, 7))
    assert isinstance(state.cache, SlotCache) and state.cache.lengths == [n]
    reference = as_dynamic(model, state.cache)
    buffers = [t.data_ptr() for t in state.cache.keys + state.cache.values]
    picks = torch.Generator().manual_seed(0)
    keep = [torch.stack([torch.randperm(n, generator=picks)[:k].sort().values for _ in range(2)])[None]
            for _ in range(num_layers(reference))]
    keep_per_head(reference, keep)
    keep_per_head(state.cache, keep)
    assert state.cache.lengths == [k] and [t.data_ptr() for t in state.cache.keys + state.cache.values] == buffers
    for layer in range(num_layers(reference)):
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(layer_kv(state.cache, layer),
                                                                     layer_kv(reference, layer)))
    config = GenerationConfig(max_new_tokens=10)
    expected = eager_greedy(model, Prefill(cache=reference, next_position=n, logits=state.logits), 10)
    assert decode(model, tiny_lm.tokenizer, state.copy(), config).token_ids == expected
    crop_cache(state.cache, 5)
    assert state.cache.lengths == [5] and [t.data_ptr() for t in state.cache.keys + state.cache.values] == buffers


def test_slot_cache_rows_move_and_lengths_roll_back():
    layers = [(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)) for n in (5,)]
    cache = SlotCache.like(layers, 1, 8)
    rows = [cache.add_row([(torch.full((1, 2, n, 4), float(n)),) * 2], 8) for n in (3, 5, 2)]
    assert rows == [0, 1, 2] and cache.lengths == [3, 5, 2] and cache.row_capacity == 3
    cache.remove_row(0)  # the last row moves into row 0
    assert cache.lengths == [2, 5] and torch.equal(cache.row_layers(0)[0][0], torch.full((1, 2, 2, 4), 2.0))
    cache.set_length(1, 1)
    assert cache.lengths == [2, 1] and cache.row_bytes(1) == 2 * 2 * 4 * 4
    with pytest.raises(ValueError):
        cache.set_length(1, 4)


# -- the fixed-shape decode step (graph capture) -------------------------------------------------------------
@pytest.mark.parametrize("step, grouped", [("fixed", False), ("fixed", True), ("compile", True)])
def test_the_fixed_step_decodes_what_the_dynamic_step_does(tiny_lm, grouped_lm, method_states, step, grouped):
    """Every method's state in one batch (rows of different lengths joining with pending ids or logits, leaving
    at different steps): the fixed-shape step, eager or compiled, gives each row the tokens of the dynamic step."""
    lm = grouped_lm if grouped else tiny_lm
    states = [s for name in METHODS for s in method_states[name]]
    configs = [GenerationConfig(max_new_tokens=4 + 3 * (i % 4)) for i in range(len(states))]
    answers = {}
    for mode in ("dynamic", step):
        decoder = BatchDecoder(lm.model, lm.tokenizer, step=mode)
        requests = [decoder.submit(s.copy(), c) for s, c in zip(states, configs)]
        decoder.run()
        answers[mode] = [r.result.token_ids for r in requests]
        assert (decoder.fixed_step is None) is (mode == "dynamic")
    assert answers[step] == answers["dynamic"]


def test_the_fixed_step_is_one_graph_that_lengths_do_not_change(grouped_lm, monkeypatch):
    """What graph capture needs: the whole step traces as ONE graph (no break back to Python) and the same graph
    serves the next steps, the rows' lengths changing (no value is read on the host). Its logits are the dynamic
    step's, and every layer runs one_query_attention (passed down through the model's keyword arguments)."""
    import ctxopt.decoding
    from ctxopt.attention.kernels import one_query_attention
    from ctxopt.decoding import FixedStep

    lm = grouped_lm
    graphs, traced_layers = [], []

    def counted_attention(module, *args, **kwargs):
        traced_layers.append(module)
        return one_query_attention(module, *args, **kwargs)


    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    rows = [prefill(lm.model, _ids(n, n), room=8).cache for n in (30, 12, 45)]
    cache = SlotCache.like(rows[0].row_layers(0), 0, 0)
    dynamic = SlotCache.like(rows[0].row_layers(0), 0, 0)
    for row in rows:
        cache.add_row(row.row_layers(0), 64)
        dynamic.add_row(row.row_layers(0), 64)
    eager = FixedStep(lm.model, "fixed")
    traced = torch.compile(eager._run, backend=count_graphs, fullgraph=True)
    tokens, positions = [101, 202, 303], [30, 12, 45]
    with torch.inference_mode():
        with monkeypatch.context() as patch:  # (eagerly: a traced list append would add guards)
            patch.setattr(ctxopt.decoding, "one_query_attention", counted_attention)
            eager._run(cache, torch.tensor(tokens).view(3, 1), torch.tensor(positions).view(3, 1),
                       torch.tensor(cache.lengths))  # (writes the slots the first step below writes again)
        assert len(traced_layers) == lm.model.config.num_hidden_layers
        for _ in range(4):
            lengths = torch.tensor(cache.lengths)
            logits = traced(cache, torch.tensor(tokens).view(3, 1), torch.tensor(positions).view(3, 1), lengths)
            cache.advance([1, 1, 1])
            reference = slot_forward(lm.model, dynamic, [[t] for t in tokens], [[p] for p in positions])[:, -1]
            assert torch.allclose(logits, reference, atol=1e-4)
            tokens = logits.argmax(-1).tolist()
            positions = [p + 1 for p in positions]
    assert len(graphs) == 1
    assert cache.lengths == dynamic.lengths == [34, 16, 49]


def test_the_decode_step_is_chosen_by_the_environment(tiny_lm, monkeypatch):
    from ctxopt.decoding import FixedStep
    from ctxopt.errors import InputError

    monkeypatch.setenv("CTXOPT_DECODE_STEP", "fixed")
    assert isinstance(BatchDecoder(tiny_lm.model, tiny_lm.tokenizer).fixed_step, FixedStep)
    assert BatchDecoder(tiny_lm.model, tiny_lm.tokenizer, step="dynamic").fixed_step is None
    monkeypatch.setenv("CTXOPT_DECODE_STEP", "graph")  # graphs where they run: a CPU model decodes dynamic
    assert BatchDecoder(tiny_lm.model, tiny_lm.tokenizer).fixed_step is None
    with pytest.raises(InputError, match="CUDA"):  # asked for by name, on the CPU: an error
        BatchDecoder(tiny_lm.model, tiny_lm.tokenizer, step="graph")
    with pytest.raises(InputError, match="dynamic, fixed, graph, compile"):
        BatchDecoder(tiny_lm.model, tiny_lm.tokenizer, step="graphs")


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 3), (4, 4)])
def test_one_query_attention_equals_attention_with_the_heads_repeated(heads, kv_heads):
    from ctxopt.attention.kernels import one_query_attention

    generator = torch.Generator().manual_seed(heads)
    query = torch.randn(3, heads, 1, 8, generator=generator)
    key, value = torch.randn(3, kv_heads, 20, 8, generator=generator), torch.randn(3, kv_heads, 20, 8,
                                                                                    generator=generator)
    mask = (torch.arange(20) <= torch.tensor([4, 19, 11])[:, None])[:, None, None, :]
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    ours, _ = one_query_attention(module, query, key, value, mask, scaling=0.4)
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(heads // kv_heads, 1), value.repeat_interleave(heads // kv_heads, 1),
        attn_mask=mask, scale=0.4)
    assert ours.shape == (3, 1, heads, 8)
    assert torch.allclose(ours, reference.transpose(1, 2), atol=1e-6)


# -- shared-prefix (Hydragen) attention ---------------------------------------------------------------------
@pytest.mark.parametrize("heads, kv_heads, q", [(4, 2, 1), (4, 4, 3), (6, 2, 5)])
def test_combined_attention_equals_attention_over_the_concatenated_keys(heads, kv_heads, q):
    generator = torch.Generator().manual_seed(heads * q)
    rows, dim, prefix_len, own = 3, 8, 37, 11

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    query, prefix_k, prefix_v = randn(rows, heads, q, dim), randn(1, kv_heads, prefix_len, dim), randn(1, kv_heads,
                                                                                                        prefix_len, dim)
    keys, values = randn(rows, kv_heads, own, dim), randn(rows, kv_heads, own, dim)
    lengths = torch.tensor([2, 7, own - q])  # entries each row holds before its q new ones
    mask = torch.arange(own) < (lengths[:, None] + torch.arange(1, q + 1))[:, :, None]  # (rows, q, own)
    ours = combined_attention(query, prefix_k, prefix_v, keys, values, mask[:, None], scaling=0.3)
    full_k = torch.cat([prefix_k.expand(rows, -1, -1, -1), keys], 2).repeat_interleave(heads // kv_heads, 1)
    full_v = torch.cat([prefix_v.expand(rows, -1, -1, -1), values], 2).repeat_interleave(heads // kv_heads, 1)
    full_mask = torch.cat([torch.ones(rows, q, prefix_len, dtype=torch.bool), mask], -1)[:, None]
    reference = torch.nn.functional.scaled_dot_product_attention(query, full_k, full_v, attn_mask=full_mask, scale=0.3)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_prefix_chunks_combine_to_the_same_attention(monkeypatch):
    import ctxopt.attention.shared_prefix as shared_prefix

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 1, 8, generator=generator)
    prefix_k, prefix_v = torch.randn(1, 2, 50, 8, generator=generator), torch.randn(1, 2, 50, 8, generator=generator)
    keys, values = torch.randn(2, 2, 3, 8, generator=generator), torch.randn(2, 2, 3, 8, generator=generator)
    mask = torch.ones(2, 1, 1, 3, dtype=torch.bool)
    whole = combined_attention(query, prefix_k, prefix_v, keys, values, mask)
    monkeypatch.setattr(shared_prefix, "PREFIX_CHUNK", 16)
    assert torch.allclose(combined_attention(query, prefix_k, prefix_v, keys, values, mask), whole, atol=1e-6)


def _suffix_requests(lm, prompts, shared: int, prefix_cache, use_prefix: bool):
    prefix = SharedPrefix.from_cache(prefix_cache) if use_prefix else None
    decoder = BatchDecoder(lm.model, lm.tokenizer, prefix=prefix)
    requests = [decoder.submit(Prefill(cache=None if use_prefix else prefix_cache, next_position=shared,
                                       pending_ids=p[shared:]), GenerationConfig(max_new_tokens=10)) for p in prompts]
    return decoder, requests


def test_shared_prefix_decoding_equals_plain_batched_decoding(grouped_lm):
    """Step by step, the logits with the prefix held once equal those with a copy of it in every row, and the
    greedy tokens are the same."""
    lm = grouped_lm
    pipe = Pipeline(lm, max_new_tokens=10)
    prompts = [pipe.compress(q, DOC).input_ids for q in QUESTIONS]
    shared = min(len(p) for p in prompts) - 12
    assert all(torch.equal(p[:shared], prompts[0][:shared]) for p in prompts)
    base = prefill(lm.model, prompts[0][:shared])
    hydra, hydra_requests = _suffix_requests(lm, prompts, shared, base.cache, use_prefix=True)
    plain, plain_requests = _suffix_requests(lm, prompts, shared, clone_cache(base.cache), use_prefix=False)
    hydra.admit()
    plain.admit()
    assert hydra.cache.lengths == [len(p) - shared for p in prompts]
    assert plain.cache.lengths == [len(p) for p in prompts]
    while hydra.busy:
        logits = [(r.logits, s.logits) for r, s in zip(hydra_requests, plain_requests) if not r.done]
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in logits)
        hydra.step()
        plain.step()
    assert not plain.busy
    assert [r.result.token_ids for r in hydra_requests] == [r.result.token_ids for r in plain_requests]
    alone = [decode(lm.model, lm.tokenizer, prefill(lm.model, p), GenerationConfig(max_new_tokens=10)).token_ids
             for p in prompts]
    assert [r.result.token_ids for r in hydra_requests] == alone


def test_shared_prefix_needs_grouped_sdpa(tiny_lm):
    from ctxopt.errors import InputError

    state = prefill(tiny_lm.model, _ids(10, 0))
    with pytest.raises(InputError, match="GROUPED_SDPA"):
        BatchDecoder(tiny_lm.model, tiny_lm.tokenizer, prefix=SharedPrefix.from_cache(state.cache))


@pytest.mark.parametrize("grouped", [True, False])
def test_ask_many_decodes_together_and_equals_ask(tiny_lm, grouped_lm, grouped):
    lm = grouped_lm if grouped else tiny_lm
    pipe = Pipeline(lm, max_new_tokens=8)
    many = pipe.ask_many(QUESTIONS, context=DOC)
    single = [pipe.ask(q, context=DOC) for q in QUESTIONS]
    assert [a.token_ids for a in many] == [a.token_ids for a in single]
    for answer in many:
        prefill_record, decode_record = answer.stats.get("prefill"), answer.stats.get("decode")
        assert prefill_record.extra["shared_prefix_attention"] is grouped
        assert prefill_record.extra["batch_size"] == decode_record.extra["batch_size"] == len(QUESTIONS)
        assert decode_record.tokens_out == len(answer.token_ids) == 8
        # Held once, the shared prefix is not in a question's row: its KV bytes are its own tokens'.
        shared = answer.stats.get("prefill_shared").kv_bytes
        assert (decode_record.kv_bytes < shared) is grouped
    assert 0 < many[0].stats.ttft_seconds


def test_ask_many_with_a_cache_stage_decodes_the_pruned_caches_together(tiny_lm):
    pipe = Pipeline(tiny_lm, stages=build_stages("snapkv", 96, window=8), max_new_tokens=6)
    many = pipe.ask_many(QUESTIONS[:3], context=DOC)
    single = [pipe.ask(q, context=DOC) for q in QUESTIONS[:3]]
    assert [a.token_ids for a in many] == [a.token_ids for a in single]
    assert all(a.stats.get("decode").extra["batch_size"] == 3 for a in many)


# -- concurrent callers share decode steps ------------------------------------------------------------------
def test_concurrent_decodes_share_steps_and_equal_each_alone(tiny_lm):
    from ctxopt.decoding import SharedDecoder

    states = [prefill(tiny_lm.model, _ids(n, seed)) for seed, n in enumerate([30, 12, 45, 21])]
    configs = [GenerationConfig(max_new_tokens=m) for m in (6, 15, 9, 12)]
    alone = [decode(tiny_lm.model, tiny_lm.tokenizer, s.copy(), c) for s, c in zip(states, configs)]
    shared = SharedDecoder(tiny_lm.model, tiny_lm.tokenizer)
    results, streamed = [None] * 4, [[] for _ in range(4)]
    owners = [None] * 4

    def call(i):
        def on_text(text):
            owners[i] = threading.get_ident()
            streamed[i].append(text)

        results[i] = shared.decode(states[i].copy(), configs[i], on_text)

    threads = run_joined(shared, call, 4)
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]
    assert all(r.extra["batch_size"] == 4 for r in results)
    assert ["".join(s) for s in streamed] == [r.text for r in results]
    assert owners == [t.ident for t in threads]  # each caller's text reached it in its own thread


def test_a_failed_step_fails_every_request_of_the_batch(tiny_lm, monkeypatch):
    from ctxopt.decoding import BatchDecoder as Decoder
    from ctxopt.decoding import SharedDecoder

    shared = SharedDecoder(tiny_lm.model, tiny_lm.tokenizer)

    def broken(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Decoder, "step", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        shared.decode(prefill(tiny_lm.model, _ids(10, 1)), GenerationConfig(max_new_tokens=3))
    monkeypatch.undo()
    result = shared.decode(prefill(tiny_lm.model, _ids(10, 1)), GenerationConfig(max_new_tokens=3))
    assert len(result.token_ids) == 3  # the next call starts a fresh batch


def test_a_caller_that_gives_up_leaves_the_batch(tiny_lm):
    """An on_text that raises (a server's cancelled request) ends that caller's decode and frees its row; the
    others in the batch go on to the answers they get alone."""
    from ctxopt.decoding import SharedDecoder

    states = [prefill(tiny_lm.model, _ids(n, seed)) for seed, n in enumerate([20, 31, 14])]
    config = GenerationConfig(max_new_tokens=25)
    alone = [decode(tiny_lm.model, tiny_lm.tokenizer, s.copy(), config).token_ids for s in states]
    shared = SharedDecoder(tiny_lm.model, tiny_lm.tokenizer)
    outcome: list = [None] * 3

    def cancel(text):
        raise ConnectionAbortedError("client went away")

    def call(i):
        try:
            outcome[i] = shared.decode(states[i].copy(), config, cancel if i == 1 else None).token_ids
        except ConnectionAbortedError as error:
            outcome[i] = error

    run_joined(shared, call, 3)
    assert isinstance(outcome[1], ConnectionAbortedError)
    assert [outcome[0], outcome[2]] == [alone[0], alone[2]]
    assert shared._decoder is None  # an empty batch is dropped, its slots with it


def test_a_released_cache_is_freed_once_copied_into_the_batch(tiny_lm):
    """With release=True (how the local generator decodes) the prefill's buffer is dropped from the state when
    the request joins the batch, so it is freed while the answer decodes, not when the caller returns; the answer
    is unchanged. Without it the state keeps its cache."""
    import gc
    import weakref

    from ctxopt.decoding import SharedDecoder

    config = GenerationConfig(max_new_tokens=12)
    expected = decode(tiny_lm.model, tiny_lm.tokenizer, prefill(tiny_lm.model, _ids(30, 3)), config).token_ids
    shared = SharedDecoder(tiny_lm.model, tiny_lm.tokenizer)
    for release in (True, False):
        state = prefill(tiny_lm.model, _ids(30, 3))
        buffer = weakref.ref(state.cache)
        alive_while_decoding = []

        def on_text(text, buffer=buffer, seen=alive_while_decoding):
            gc.collect()
            seen.append(buffer() is not None)

        result = shared.decode(state, config, on_text, release=release)
        assert result.token_ids == expected and alive_while_decoding
        assert (state.cache is None, any(alive_while_decoding)) == (release, not release)


def test_pipeline_calls_from_threads_share_the_generators_decode_batch(tiny_lm):
    from concurrent.futures import ThreadPoolExecutor

    pipe = Pipeline(tiny_lm, max_new_tokens=20)
    alone = [pipe.ask(q, context=DOC).token_ids for q in QUESTIONS]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: pipe.ask(q, context=DOC), QUESTIONS))
    assert [a.token_ids for a in answers] == alone
    assert all(a.stats.get("decode").extra["batch_size"] >= 1 for a in answers)


def test_pipeline_calls_from_threads_prefill_one_at_a_time_and_count_their_wait(tiny_lm):
    """Concurrent calls on one model take the model's prepare lock: never two prefills at once (peak memory of
    one prefill, not one per call), a call that waited has a ``wait`` record counted in its TTFT, and a call
    alone has none."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ctxopt.stages import TokenPrefill

    inside, most = [0], [0]
    guard = threading.Lock()

    class CountingPrefill(TokenPrefill):
        def prefill(self, prompt, run):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)  # long enough for the other threads to arrive
            try:
                return super().prefill(prompt, run)
            finally:
                with guard:
                    inside[0] -= 1

    pipe = Pipeline(tiny_lm, max_new_tokens=8)
    alone = pipe.ask(QUESTIONS[0], context=DOC)
    assert [r.stage for r in alone.stats.stages] == ["prompt", "prefill", "decode"]
    pipe.generator.input_stage = CountingPrefill()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: pipe.ask(q, context=DOC), QUESTIONS))
    assert most[0] == 1
    waits = [a.stats.get("wait") for a in answers]
    assert any(w is not None and w.seconds > 0 for w in waits)
    waited = next(a for a, w in zip(answers, waits) if w is not None)
    before_decode = waited.stats.stages.index(waited.stats.get("decode"))
    assert waited.stats.ttft_seconds >= sum(r.seconds for r in waited.stats.stages[:before_decode])


def test_a_model_with_sliding_window_layers_is_refused_with_a_reason(tiny_tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from ctxopt.errors import InputError

    config = Gemma3TextConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config).eval()
    state = prefill(model, _ids(12, 0) % len(tiny_tokenizer))
    with pytest.raises(InputError, match="sliding_attention"):
        decode(model, tiny_tokenizer, state, GenerationConfig(max_new_tokens=3))
