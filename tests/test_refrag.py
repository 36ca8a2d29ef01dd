"""REFRAG: chunking and provenance, the inputs_embeds layout (expand=1.0 equals the plain full prefill), positions,
the chunk-embedding cache, training (loss falls), checkpoints, the expansion policy, the CLI, and (real_model)
the shipped default on SmolLM2."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from ctxopt.cli import build_parser
from ctxopt.compressors.refrag import (
    REFRAG,
    Adapter,
    AdapterConfig,
    ChunkCache,
    ChunkEncoder,
    ExpansionPolicy,
    Projector,
)
from ctxopt.compressors.refrag.layout import assemble, expansion_count, split_context, surprisal_scores
from ctxopt.compressors.refrag.model import choose_chunks
from ctxopt.decoding import GenerationConfig, decode, prefill
from ctxopt.errors import IndexLoadError, InputError
from ctxopt.methods import build_stages
from ctxopt.pipeline import Pipeline
from ctxopt.prompting import build_prompt
from ctxopt.stages import Run
from ctxopt.training.refrag import Window, compressed_inputs, prompt_start_ids
from ctxopt.types import CONTEXT, Passage, Stats

PASSAGES = [
    Passage("the river runs past the old mill and the road bends twice before the town of ashford , where the "
            "bridge was built in 1820 by a mason named cole .", source="a"),
    Passage("a small zebra stood near the fence in the morning light while the farmer counted sheep .", source="b"),
]
QUESTION = "who built the bridge?"
K = 8


def tiny_encoder(tokenizer, pooling: str = "mean", seed: int = 1) -> ChunkEncoder:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return ChunkEncoder(BertModel(config).eval(), tokenizer, pooling=pooling)


def tiny_adapter(tokenizer, lm, pooling: str = "mean", lora: bool = False) -> Adapter:
    config = AdapterConfig(encoder="tiny-bert", decoder=lm.name, chunk_tokens=K, pooling=pooling,
                           lora_rank=4 if lora else 0, decoder_hidden=lm.model.config.hidden_size, policy_width=16)
    adapter = Adapter.fresh(config, encoder=tiny_encoder(tokenizer, pooling), seed=2)
    adapter.policy = ExpansionPolicy(config.decoder_hidden, config.policy_width)
    return adapter


def make_run(lm) -> Run:
    return Run(lm=lm, question=QUESTION, config=GenerationConfig(max_new_tokens=4), stats=Stats())


@pytest.fixture(scope="module")
def adapter(tiny_tokenizer, tiny_lm):
    return tiny_adapter(tiny_tokenizer, tiny_lm)


@pytest.fixture(scope="module")
def prompt(tiny_tokenizer):
    return build_prompt(tiny_tokenizer, QUESTION, PASSAGES)


def test_chunks_cover_the_context_once_within_passages(prompt):
    chunks = split_context(prompt, K)
    rows = [r for c in chunks for r in range(c.start, c.end)]
    assert rows == (prompt.segment == CONTEXT).nonzero().flatten().tolist()
    for chunk in chunks:
        assert 1 <= chunk.end - chunk.start <= K
        assert set(prompt.passage_index[chunk.start : chunk.end].tolist()) == {chunk.passage}
        assert chunk.text == PASSAGES[chunk.passage].text[chunk.span[0] : chunk.span[1]]
        assert (chunk.span[0] == prompt.char_spans[chunk.start, 0]
                and chunk.span[1] == prompt.char_spans[chunk.end - 1, 1])
    assert {c.passage for c in chunks} == {0, 1}


def test_layout_replaces_each_compressed_chunk_by_one_embedding(prompt, tiny_lm):
    chunks = split_context(prompt, K)
    tokens = tiny_lm.model.get_input_embeddings()(prompt.input_ids)
    chunk_embeds = torch.randn(len(chunks), tokens.shape[1])
    inputs, source = assemble(tokens, chunks, chunk_embeds, expanded={1})
    compressed = [c for i, c in enumerate(chunks) if i != 1]
    assert len(inputs) == len(prompt) - sum(c.end - c.start - 1 for c in compressed)
    for i, chunk in enumerate(chunks):
        if i == 1:  # expanded: its own token embeddings, in place
            at = (source == chunk.start).nonzero().item()
            assert torch.equal(inputs[at : at + chunk.end - chunk.start], tokens[chunk.start : chunk.end])
        else:
            assert torch.equal(inputs[(source == -(i + 1)).nonzero().item()], chunk_embeds[i])
    kept_tokens = source >= 0
    assert torch.equal(inputs[kept_tokens], tokens[source[kept_tokens]])
    assert torch.equal(source[kept_tokens], source[kept_tokens].sort().values)  # prompt order kept


def test_expand_all_equals_the_plain_full_prefill(prompt, tiny_lm, adapter):
    state = REFRAG(adapter=adapter, expand=1.0).prefill(prompt, make_run(tiny_lm))
    reference = prefill(tiny_lm.model, prompt.input_ids)
    assert state.next_position == reference.next_position == len(prompt)
    torch.testing.assert_close(state.logits, reference.logits, rtol=1e-4, atol=1e-4)


def test_compressed_prefill_uses_consecutive_positions(prompt, tiny_lm, adapter):
    run = make_run(tiny_lm)
    state = REFRAG(adapter=adapter).prefill(prompt, run)
    chunks = split_context(prompt, K)
    shortened = len(prompt) - sum(c.end - c.start - 1 for c in chunks)
    assert state.next_position == shortened == state.cache.get_seq_length()
    assert run.figures["chunks"] == len(chunks) and run.figures["expanded"] == 0
    # the same inputs fed by hand at positions 0..n-1 give the same logits
    tokens = tiny_lm.model.get_input_embeddings()(prompt.input_ids)
    embeds = adapter.embed_chunks([c.text for c in chunks]).detach()
    inputs, _ = assemble(tokens, chunks, embeds, set())
    by_hand = prefill(tiny_lm.model, inputs_embeds=inputs.detach(), positions=torch.arange(shortened))
    torch.testing.assert_close(state.logits, by_hand.logits, rtol=1e-4, atol=1e-4)
    assert len(decode(tiny_lm.model, tiny_lm.tokenizer, state, GenerationConfig(max_new_tokens=3)).token_ids) == 3


def test_pipeline_records_tokens_in_and_out(tiny_lm, adapter):
    answer = Pipeline(tiny_lm, stages=[REFRAG(adapter=adapter)], max_new_tokens=3).ask(QUESTION, context=PASSAGES)
    record = answer.stats.get("refrag")
    assert record.tokens_out < record.tokens_in
    assert record.extra["decoder_positions"] == record.tokens_out
    assert [p.source for p in answer.sources] == ["a", "b"]


def test_chunk_cache_round_trip(tmp_path, prompt, tiny_lm, tiny_tokenizer, adapter):
    cache = ChunkCache.build(PASSAGES, adapter, tiny_tokenizer, chunk_tokens=K)
    loaded = ChunkCache.load(cache.save(tmp_path / "refrag-chunks.safetensors"))
    assert loaded.fingerprint == adapter.fingerprint() and len(loaded) == len(cache)
    run = make_run(tiny_lm)
    cached = REFRAG(adapter=adapter, cache=loaded).prefill(prompt, run)
    assert run.figures["cached_chunks"] == run.figures["chunks"]
    fresh = REFRAG(adapter=adapter).prefill(prompt, make_run(tiny_lm))
    torch.testing.assert_close(cached.logits, fresh.logits, rtol=1e-5, atol=1e-5)
    other = tiny_adapter(tiny_tokenizer, tiny_lm, pooling="cls")
    with pytest.raises(IndexLoadError):
        REFRAG(adapter=other, cache=loaded).prefill(prompt, make_run(tiny_lm))


def test_heuristic_expands_the_rarest_chunks(prompt, tiny_lm, adapter):
    chunks = split_context(prompt, K)
    scores = surprisal_scores([prompt.input_ids[c.start : c.end] for c in chunks])
    run = make_run(tiny_lm)
    REFRAG(adapter=adapter, expand=0.25).prefill(prompt, run)
    count = expansion_count(0.25, len(chunks))
    assert run.figures["expanded"] == count >= 1
    chosen = REFRAG(adapter=adapter, expand=0.25).choose(prompt, chunks, torch.zeros(len(chunks), 4))
    assert chosen == set(scores.topk(count).indices.tolist())


def test_policy_picks_p_times_l_distinct_chunks(prompt, tiny_lm, adapter):
    logits = torch.randn(12)
    for sample in (True, False):
        picks, log_prob = choose_chunks(logits, 5, sample=sample, generator=torch.Generator().manual_seed(0))
        assert len(picks) == len(set(picks)) == 5 and log_prob < 0
    assert choose_chunks(logits, 5, sample=False)[0] == logits.topk(5).indices.tolist()
    run = make_run(tiny_lm)
    REFRAG(adapter=adapter, expand=0.5, policy="learned").prefill(prompt, run)
    assert run.figures["expanded"] == expansion_count(0.5, run.figures["chunks"])
    without_policy = Adapter(adapter.config, adapter.encoder, adapter.projector)
    with pytest.raises(InputError):
        REFRAG(adapter=without_policy, expand=0.5, policy="learned").prefill(prompt, make_run(tiny_lm))


def write_corpus(folder: Path) -> Path:
    folder.mkdir()
    text = " ".join(f"the mill at ashford number {i % 7} grinds wheat ." for i in range(400))
    for name in ("one.txt", "two.txt", "three.txt"):
        (folder / name).write_text(text)
    return folder


def train_args(tmp_path, *extra):
    parser = build_parser()
    return parser.parse_args(["train", "refrag", "--corpus", str(write_corpus(tmp_path / "corpus")),
                              "--out", str(tmp_path / "out"), "--chunk-tokens", str(K), "--max-chunks", "4",
                              "--batch-tokens", "64", "--continuation", "8", "--lr", "3e-3", "--lora-rank", "4",
                              *extra])


@pytest.mark.parametrize("stage", ["reconstruct", "cpt"])
def test_training_lowers_the_loss(tmp_path, tiny_lm, tiny_tokenizer, stage):
    from ctxopt.training.refrag import train_stage

    args = train_args(tmp_path, "--stage", stage, "--steps", "40", "--save-steps", "20")
    record = train_stage(stage, 40, Path(args.out), args, lm=tiny_lm, encoder=tiny_encoder(tiny_tokenizer))
    assert record["final_loss"] < record["first_loss"]
    assert (Path(args.out) / "checkpoints" / "checkpoint-40" / "projector.safetensors").is_file()


def test_saved_adapter_reproduces_outputs(tmp_path, tiny_lm, tiny_tokenizer):
    from ctxopt.training.refrag import train_stage

    args = train_args(tmp_path, "--stage", "mixed", "--steps", "3")
    train_stage("mixed", 3, Path(args.out), args, lm=tiny_lm, encoder=tiny_encoder(tiny_tokenizer))
    first = Adapter.load(args.out, encoder=tiny_encoder(tiny_tokenizer))
    again = Adapter.load(args.out, encoder=tiny_encoder(tiny_tokenizer))
    assert first.fingerprint() == again.fingerprint()
    texts = [c.text for c in split_context(build_prompt(tiny_tokenizer, QUESTION, PASSAGES), K)]
    with torch.no_grad():
        torch.testing.assert_close(first.embed_chunks(texts), again.embed_chunks(texts))
    trained = Adapter.load(args.out, encoder=tiny_encoder(tiny_tokenizer), merge=False)  # LoRA live, not merged
    with torch.no_grad():
        torch.testing.assert_close(trained.embed_chunks(texts), first.embed_chunks(texts), rtol=1e-4, atol=1e-5)
    assert first.config.training["stages"][0]["stage"] == "mixed"
    assert first.config.training["stages"][0]["lead_ids"] == prompt_start_ids(tiny_lm.tokenizer)


def test_training_windows_open_with_the_prompts_first_token(tiny_lm, tiny_tokenizer, adapter):
    """At inference chunk embeddings follow the chat template's opening token; training puts it first as well."""
    lead = prompt_start_ids(tiny_tokenizer)
    assert lead == build_prompt(tiny_tokenizer, QUESTION, PASSAGES).input_ids[:1].tolist()
    window = Window(texts=["alpha beta", "gamma delta"], chunk_ids=[[5] * K, [6] * K], continuation=[7, 8, 9])
    embed = tiny_lm.model.get_input_embeddings()
    with torch.no_grad():
        embeds, targets = compressed_inputs(adapter, tiny_lm.model, [window], [{1}], lead_ids=lead)
        expected = torch.cat([embed(torch.tensor(lead)), adapter.embed_chunks(["alpha beta"]),
                              embed(torch.tensor([6] * K)), embed(torch.tensor([7, 8, 9]))])
    torch.testing.assert_close(embeds[0], expected)
    assert targets.tolist() == [[7, 8, 9]]


def test_policy_stage_trains_only_the_policy(tmp_path, tiny_lm, tiny_tokenizer):
    from ctxopt.training.refrag import train_stage

    args = train_args(tmp_path, "--stage", "policy", "--steps", "2", "--group", "3", "--expand", "0.5")
    train_stage("policy", 2, Path(args.out), args, lm=tiny_lm, encoder=tiny_encoder(tiny_tokenizer))
    adapter = Adapter.load(args.out, encoder=tiny_encoder(tiny_tokenizer))
    torch.manual_seed(args.seed)  # the projector a fresh adapter starts from (Adapter.fresh seeds it the same way)
    untouched = Projector(32, tiny_lm.model.config.hidden_size)
    assert adapter.policy is not None
    assert torch.equal(adapter.projector.up.weight, untouched.up.weight)


def test_cli_and_registry():
    args = build_parser().parse_args(["train", "refrag", "--out", "x", "--stage", "cpt", "--steps", "5"])
    assert args.stage == "cpt" and args.handler.__name__ == "cmd_train_refrag"
    stages = build_stages("refrag", None, expand=0.1, policy="random", chunk_tokens=16)
    assert isinstance(stages[0], REFRAG) and stages[0].expand == 0.1
    with pytest.raises(InputError):
        REFRAG(expand=0.5, policy=None)
    assert build_parser().parse_args(["index", "docs", "--out", "i", "--refrag"]).refrag


@pytest.mark.real_model
def test_shipped_default_on_smollm(smollm):
    context = ("The Harbour Museum opened in 1911. Its vault code is 4417, and the curator, Ada Lind, keeps the "
               "key. The museum holds ship models, maps and a lighthouse lens from Eldermoor.")
    answer = Pipeline(smollm, stages=[REFRAG()], max_new_tokens=8).ask("Who keeps the key?", context=context)
    record = answer.stats.get("refrag")
    assert record.extra["chunks"] >= 2 and record.tokens_out < record.tokens_in
    assert answer.text


def test_langchain_chat_model_reports_the_positions_refrag_saves(tiny_lm, adapter):
    from langchain_core.messages import HumanMessage

    from ctxopt.integrations.langchain import CtxoptChatModel

    chat = CtxoptChatModel(model=tiny_lm, method="refrag", options={"adapter": adapter}, max_new_tokens=3)
    context = " ".join(p.text for p in PASSAGES)
    reply = chat.invoke([HumanMessage(context), HumanMessage(QUESTION)])
    meta = reply.response_metadata
    chunks = split_context(Pipeline(tiny_lm).build_prompt(QUESTION, [Passage(context)]), K)
    saved = sum(chunk.end - chunk.start - 1 for chunk in chunks)  # each chunk: its tokens -> one embedding
    assert saved > 0 and meta["tokens_saved"] == saved
    assert reply.usage_metadata["input_tokens"] == meta["prompt_tokens_original"] - saved


def test_fingerprint_is_kept_until_a_weight_changes(monkeypatch, tiny_tokenizer, tiny_lm):
    """The hash of an in-memory adapter is computed once, and again only after a weight changes in place."""
    import ctxopt.compressors.refrag.model as model

    adapter = tiny_adapter(tiny_tokenizer, tiny_lm)
    hashes = []
    real_sha256 = model.hashlib.sha256
    monkeypatch.setattr(model.hashlib, "sha256", lambda data: hashes.append(data) or real_sha256(data))
    first = adapter.fingerprint()
    assert adapter.fingerprint() == first and len(hashes) == 1
    weight = adapter.projector.up.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1.0  # what an optimizer step does
    changed = adapter.fingerprint()
    assert changed != first and len(hashes) == 2
    with torch.no_grad():
        weight.copy_(original)  # what load_state_dict does
    assert adapter.fingerprint() == first and len(hashes) == 3


def _layout_one_token_at_a_time(prompt, k, token_embeds, chunk_embeds, expanded):
    """split_context, assemble and surprisal_scores written as plain loops: the reference for the vectorised ones."""
    is_context, owner = (prompt.segment == CONTEXT).tolist(), prompt.passage_index.tolist()
    spans = prompt.char_spans.tolist()
    chunks, row = [], 0
    while row < len(prompt):
        if not is_context[row]:
            row += 1
            continue
        end = row
        while end < len(prompt) and is_context[end] and owner[end] == owner[row]:
            end += 1
        for first in range(row, end, k):
            last = min(first + k, end)
            lo, hi = spans[first][0], spans[last - 1][1]
            chunks.append((owner[row], first, last, (lo, hi), prompt.passages[owner[row]].text[lo:hi]))
        row = end
    rows, source = [], []
    for i in range(len(prompt)):
        chunk = next((c for c, (_, first, last, _, _) in enumerate(chunks) if first <= i < last and c not in expanded),
                     None)
        if chunk is None:
            rows.append(token_embeds[i])
            source.append(i)
        elif i == chunks[chunk][1]:
            rows.append(chunk_embeds[chunk])
            source.append(-(chunk + 1))
    scores = [float(torch.log1p(prompt.input_ids[c[1]:c[2]].float()).mean()) for c in chunks]
    return chunks, torch.stack(rows), torch.tensor(source), torch.tensor(scores)


@pytest.mark.parametrize("k", [1, 3, 16])
def test_vectorised_layout_equals_the_token_by_token_rule(tiny_tokenizer, k):
    generator = torch.Generator().manual_seed(k)
    words = "alpha beta gamma delta vault code 7341 Lovelace algorithm river bank 12 March".split()
    passages = [Passage(" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=generator)))
                for n in torch.randint(1, 60, (5,), generator=generator)]
    prompt = build_prompt(tiny_tokenizer, QUESTION, passages)
    tokens = torch.randn(len(prompt), 4, generator=generator)
    chunks = split_context(prompt, k)
    embeds = torch.randn(len(chunks), 4, generator=generator)
    expanded = set(torch.randint(0, len(chunks), (len(chunks) // 3,), generator=generator).tolist())
    ref_chunks, ref_rows, ref_source, ref_scores = _layout_one_token_at_a_time(prompt, k, tokens, embeds, expanded)
    assert [(c.passage, c.start, c.end, c.span, c.text) for c in chunks] == ref_chunks
    rows, source = assemble(tokens, chunks, embeds, expanded)
    assert torch.equal(source, ref_source) and torch.equal(rows, ref_rows)
    scores = surprisal_scores([prompt.input_ids[c.start : c.end] for c in chunks])
    torch.testing.assert_close(scores, ref_scores)
