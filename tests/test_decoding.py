"""The decode loop against transformers' own generate, and decoding from a pruned cache at explicit
positions against an independent masked full-sequence forward."""
import random

import pytest
import torch

from ctxopt.cache import keep_per_head, kv_bytes
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
            logits = model(input_ids=seq.unsqueeze(0), attention_mask=mask[None, None],
                           position_ids=torch.arange(total)[None]).logits
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
        wrong = forward(model, prompt[-1:], positions=torch.tensor([wrong_position]),
                        cache=_pruned_state(model, prompt, 0).cache)
    assert (wrong.logits[0, -1] - reference_logits).abs().max() > 1e-2
    decoded = decode(model, tiny_lm.tokenizer, _pruned_state(model, prompt, wrong_position),
                     GenerationConfig(max_new_tokens=12))
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


# -- incremental detokenisation -----------------------------------------------------------------------------
# StopChecker decodes a short window of recent ids per token instead of all ids. Its text must equal a full
# decode after every token, on real tokenizers: WordPiece (MiniLM), byte-level BPE (GPT-2 style) and a
# SentencePiece-style BPE with byte fallback (Llama style: "▁" for spaces, a decode drops the first leading
# space, a character outside the vocabulary is spelt in byte tokens, one U+FFFD per byte until complete).

MULTILINGUAL = [
    "The café served crème brûlée; a naïve résumé.",
    "日本の首都は東京です。日本語 and English, 日本.",
    "Emoji: 🎉🚀 thumbs 👍🏽 family 👨‍👩‍👧 end 🎉.",
    "  two leading spaces,\nnewline\tand tab  then ﬁn — “quoted” … done",
]
ENGLISH = "the quick brown fox jumps over the lazy dog while the cat sleeps and the answer is paris"
STOPS = ["日本", "🚀", "brûlée", "\n", "é;", "👍🏽 family", "end 🎉"]


class FullDecodeChecker:
    """The specification: the whole answer decoded after every token, the first stop string cut, and what is
    streamed held back by any trailing U+FFFD (a character still incomplete) and any stop-string prefix."""

    def __init__(self, tokenizer, stop_strings=(), on_text=None):
        self.tokenizer, self.stops, self.on_text = tokenizer, [s for s in stop_strings if s], on_text
        self.ids, self.text, self.streamed, self.reason = [], "", 0, "max_new_tokens"

    def push(self, token: int) -> bool:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            if stop in self.text:
                self.text, self.reason = self.text[:self.text.index(stop)], "stop_string"
                self.stream(final=True)
                return True
        self.stream(final=False)
        return False

    def finish(self) -> None:
        self.stream(final=True)

    def stream(self, final: bool) -> None:
        if self.on_text is None:
            return
        safe = len(self.text) if final else len(self.text.rstrip("\ufffd"))
        if not final:
            for stop in self.stops:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        if safe > self.streamed:
            self.on_text(self.text[self.streamed:safe])
            self.streamed = safe


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(MULTILINGUAL * 10, trainer)  # merges inside multibyte characters too
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def _sentencepiece_tokenizer():
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  limit_alphabet=40)  # rarer characters (most kana, emoji, accents) left to bytes
    tokenizer.train_from_iterator(MULTILINGUAL + [ENGLISH] * 20, trainer)
    spec = json.loads(tokenizer.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["wordpiece", "byte_level", "sentencepiece"])
def any_tokenizer(request, tiny_tokenizer):
    return {"wordpiece": lambda: tiny_tokenizer, "byte_level": _byte_level_tokenizer,
            "sentencepiece": _sentencepiece_tokenizer}[request.param]()


def _id_sequences(tokenizer) -> list[list[int]]:
    """The multilingual texts, and random id sequences (special tokens, lone byte tokens and all)."""
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in MULTILINGUAL]
    rng = random.Random(0)
    return texts + [[rng.randrange(len(tokenizer)) for _ in range(80)] for _ in range(6)]


def _run(make_checker, tokenizer, ids, stops=()):
    pieces, texts = [], []
    checker = make_checker(tokenizer, stop_strings=stops, on_text=pieces.append)
    stopped = None
    for i, token in enumerate(ids):
        if checker.push(token):
            stopped = i
            break
        texts.append(checker.text)
    checker.finish()
    return {"texts": texts, "text": checker.text, "pieces": pieces, "stopped": stopped, "reason": checker.reason}


def _checker(tokenizer, stop_strings=(), on_text=None):
    return StopChecker(tokenizer, eos_ids=[], stop_strings=stop_strings, on_text=on_text)


def test_incremental_text_equals_a_full_decode_after_every_token(any_tokenizer):
    for ids in _id_sequences(any_tokenizer):
        checker = _checker(any_tokenizer)
        for i, token in enumerate(ids):
            assert not checker.push(token)
            assert checker.text == any_tokenizer.decode(ids[:i + 1], skip_special_tokens=True), (ids, i)


def _spanning_stop(tokenizer, ids: list[int], at: int = 5) -> str:
    """Two characters either side of where token ``at`` starts in the decoded text."""
    cut = len(tokenizer.decode(ids[:at], skip_special_tokens=True))
    return tokenizer.decode(ids, skip_special_tokens=True)[max(0, cut - 2):cut + 2]


def test_incremental_stream_and_stops_match_the_full_decode(any_tokenizer):
    sequences = _id_sequences(any_tokenizer)
    for n, ids in enumerate(sequences):
        for stops in ([], STOPS, [_spanning_stop(any_tokenizer, ids)], ["zz", _spanning_stop(any_tokenizer, ids, 30)]):
            ours = _run(_checker, any_tokenizer, ids, stops)
            reference = _run(FullDecodeChecker, any_tokenizer, ids, stops)
            assert ours == reference, (ids, stops)
            if n < len(MULTILINGUAL):  # (random bytes can turn text already streamed into U+FFFD, in a full decode too)
                assert "".join(ours["pieces"]) == ours["text"]
    for text, ids in zip(MULTILINGUAL, sequences):
        # a stop string across a token boundary stops the answer there
        run = _run(_checker, any_tokenizer, ids, [_spanning_stop(any_tokenizer, ids)])
        assert run["reason"] == "stop_string" and run["stopped"] < len(ids) - 1
        if any_tokenizer.decode(ids) == text:  # lossless (not the uncased WordPiece): multibyte stops stop too
            assert _run(_checker, any_tokenizer, ids, STOPS)["reason"] == "stop_string", text


def test_streamed_pieces_never_carry_an_incomplete_character():
    tokenizer = _sentencepiece_tokenizer()
    text = "thumbs 👍🏽 up, 日本の首都"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sum(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(ids)) >= 8  # emoji spelt in bytes
    pieces: list[str] = []
    checker = _checker(tokenizer, on_text=pieces.append)
    for token in ids:
        checker.push(token)
        assert "\ufffd" not in "".join(pieces)
    checker.finish()
    assert "".join(pieces) == checker.text == text


def test_each_token_decodes_a_bounded_window(any_tokenizer):
    class Counting:
        def __init__(self, inner):
            self.inner, self.sizes = inner, []

        def decode(self, ids, **kwargs):
            self.sizes.append(len(ids))
            return self.inner.decode(ids, **kwargs)

    for text, widest in (((ENGLISH + " ") * 40, 4), (" ".join(MULTILINGUAL) * 12, 64)):
        ids = any_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        assert len(ids) > 500
        counting = Counting(any_tokenizer)
        checker = _checker(counting, stop_strings=["never there"], on_text=lambda piece: None)
        for token in ids:
            checker.push(token)
        checker.finish()
        assert checker.text == any_tokenizer.decode(ids, skip_special_tokens=True)
        # a full decode per token would decode len(ids) / 2 ids per token on average (over 250 here)
        assert max(counting.sizes) <= widest  # the multilingual text: a run of byte tokens is re-read whole
        assert sum(counting.sizes) <= 12 * len(ids)


@pytest.mark.real_model
def test_incremental_text_on_the_packaged_tokenizer(smollm_tokenizer):
    for text in MULTILINGUAL:
        ids = smollm_tokenizer(text, add_special_tokens=False)["input_ids"]
        ours = _run(_checker, smollm_tokenizer, ids, STOPS)
        assert ours == _run(FullDecodeChecker, smollm_tokenizer, ids, STOPS)
        checker = _checker(smollm_tokenizer)
        for i, token in enumerate(ids):
            checker.push(token)
            assert checker.text == smollm_tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
