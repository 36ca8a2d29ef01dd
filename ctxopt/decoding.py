"""ctxopt's own prefill and decode loop, with explicit positions.

A compressed cache can be shorter than the prompt it stands for (SpecKV keeps 512 of 8K positions), so
the position of the next token is carried explicitly instead of being inferred from the cache length,
which is what transformers' ``generate()`` does and why ctxopt does not use it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .cache import clone_cache, new_cache
from .checks import require_int
from .errors import InputError


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    """``cache`` on transformers >= 5.2x, ``past_key_values`` before (5.17 on the GPU machine)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(
    model,
    input_ids: torch.Tensor | None = None,
    *,
    positions: torch.Tensor,
    cache=None,
    inputs_embeds: torch.Tensor | None = None,
    logits_to_keep: int = 1,
    **kwargs,
):
    """One causal-LM forward over a batch-1 sequence at explicit ``positions``, extending ``cache``."""
    if input_ids is not None and input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if inputs_embeds is not None and inputs_embeds.dim() == 2:
        inputs_embeds = inputs_embeds.unsqueeze(0)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    device = model.device
    kwargs[_cache_kwarg(type(model))] = cache
    return model(
        input_ids=None if input_ids is None else input_ids.to(device),
        inputs_embeds=inputs_embeds,
        position_ids=positions.to(device),
        use_cache=cache is not None,
        logits_to_keep=logits_to_keep,
        **kwargs,
    )


@dataclass
class Prefill:
    """A prefilled KV cache ready to decode from.

    ``next_position`` is where the next fed token sits in the ORIGINAL prompt's numbering. ``logits`` predict
    the first answer token; when ``pending_ids`` is set instead (SpecKV drops the last prompt token and feeds
    it again), those ids are fed at ``next_position...`` first and their last logits start the decode.
    """

    cache: object
    next_position: int
    logits: torch.Tensor | None = None
    pending_ids: torch.Tensor | None = None
    seconds: float = 0.0

    def copy(self) -> "Prefill":
        """The same state over a deep copy of the cache, so that decoding from it leaves this one intact."""
        return dataclasses.replace(self, cache=clone_cache(self.cache))


def prefill(
    model,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    cache=None,
    chunk_size: int | None = None,
) -> Prefill:
    """Run the prompt through the model into a (new or given) cache; return the cache and last logits.

    ``chunk_size`` bounds attention memory on long prompts by feeding the prompt in pieces.
    """
    source = input_ids if input_ids is not None else inputs_embeds
    if source is None or source.shape[0] == 0:
        raise InputError("Nothing to prefill: the prompt has no tokens.")
    n = source.shape[0]
    start = 0 if cache is None else int(cache.get_seq_length())
    positions = torch.arange(start, start + n) if positions is None else positions
    cache = new_cache(model) if cache is None else cache
    step = chunk_size or n
    began = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, n, step):
            piece = slice(lo, min(n, lo + step))
            out = forward(
                model,
                None if input_ids is None else input_ids[piece],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[piece],
                positions=positions[piece],
                cache=cache,
            )
    return Prefill(
        cache=cache,
        next_position=int(positions[-1]) + 1,
        logits=out.logits[0, -1].float(),
        seconds=time.perf_counter() - began,
    )


@dataclass
class GenerationConfig:
    """Decoding knobs. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_strings: Sequence[str] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        self.max_new_tokens = require_int(self.max_new_tokens, "max_new_tokens", minimum=1)
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_token_distribution(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Probabilities after temperature and nucleus (top-p) filtering, for sampling."""
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs[before >= config.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs /= probs.sum(-1, keepdim=True)
    return probs


def choose_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    if config.greedy:
        return int(logits.argmax(-1))
    probs = next_token_distribution(logits, config)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def make_generator(config: GenerationConfig) -> torch.Generator | None:
    if config.greedy:
        return None
    generator = torch.Generator()
    generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    return generator


@dataclass
class DecodeResult:
    token_ids: list[int]
    text: str
    seconds: float
    first_token_seconds: float
    forward_passes: int
    stopped_by: str
    extra: dict = field(default_factory=dict)


class StopChecker:
    """Tracks decoded text, streams new text to a callback, and reports EOS / stop strings.

    ``text`` is always ``tokenizer.decode(ids, skip_special_tokens=True)`` (cut before a stop string), but it
    is built incrementally, so an answer costs time linear in its length: each token decodes only a short
    window of recent ids, ``ids[window:]``, and the text it adds is what that decode has beyond the decode of
    ``ids[window:read]``, the ids already read. Decoding from a few ids back, not from the new token alone,
    keeps what a token's text depends on its left neighbour for (SentencePiece's leading space, which a
    decode drops at the start of the ids it is given; byte-level tokens that only together make a UTF-8
    character). Text is settled, and the window moves up to the ids read, only when the new decode is longer
    and does not end in an incomplete character (U+FFFD). When a new id changes text already settled (a
    byte-fallback decoder turns a whole run of byte tokens into U+FFFD once one of them is invalid), the
    window decode no longer starts with the decode of its first ids: the last settled pieces are taken back,
    the window reaching back twice as far each time, until it does.
    """

    def __init__(
        self, tokenizer, eos_ids: Sequence[int], stop_strings: Sequence[str], on_text: Callable[[str], None] | None
    ):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.on_text = on_text
        self.ids: list[int] = []
        self.streamed = 0
        self.reason = "max_new_tokens"
        self._settled: list[str] = []  # text no later id has changed so far, one piece per settling
        self._reads: list[int] = []  # after each piece, how many ids made the text up to it
        self._settled_length = 0
        self._tail = ""  # the text after the settled pieces
        self._window = self._read = 0  # ids[window:] are decoded for each new id; ids[:read] make the settled text
        self._window_text = ""  # decode(ids[window:read])
        self._joined: str | None = ""
        self._hold = sum(len(stop) - 1 for stop in self.stop_strings)  # the most stop-string prefixes hold back

    @property
    def text(self) -> str:
        """The answer's text so far: the decode of ``ids``, cut before the first stop string found (joined from
        its pieces when read, so read it once at the end rather than after every token)."""
        if self._joined is None:
            self._joined = "".join(self._settled) + self._tail
        return self._joined

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _suffix(self, start: int) -> str:
        """``text[start:]``, reading only the settled pieces it needs."""
        if start >= self._settled_length:
            return self._tail[start - self._settled_length:]
        pieces, length = [self._tail], self._settled_length
        for piece in reversed(self._settled):
            pieces.append(piece)
            length -= len(piece)
            if length <= start:
                break
        return "".join(reversed(pieces))[start - length:]

    def _rewindow(self) -> None:
        """Point the window at the settling before the last one, or further back while the ids between it and
        the last settling decode to nothing on their own (a decoder that strips the leading space of what it
        is given turns a lone space into ""): the window decode can only show a change in text it holds."""
        reads = self._reads
        self._read = reads[-1] if reads else 0
        before = len(reads) - 2
        while True:
            self._window = reads[before] if before >= 0 else 0
            self._window_text = self._decode(self.ids[self._window:self._read])
            if self._window_text or before < 0:
                return
            before -= 1

    def _read_token(self) -> int:
        """Update the text for the newest id; return the index from which the text may have changed."""
        self._joined = None
        back = 1
        while True:
            decoded = self._decode(self.ids[self._window:])
            if decoded.startswith(self._window_text):
                break
            for _ in range(min(back, len(self._reads))):  # never reached with no settled piece: "" starts all
                self._settled_length -= len(self._settled.pop())
                self._reads.pop()
            back *= 2
            self._rewindow()
        self._tail = decoded[len(self._window_text):]
        changed_from = self._settled_length
        if self._tail and not decoded.endswith("\ufffd"):
            self._settled.append(self._tail)
            self._settled_length += len(self._tail)
            self._reads.append(len(self.ids))
            self._tail = ""
            self._rewindow()
        return changed_from

    def push(self, token: int) -> bool:
        """Record one token; True when decoding must stop."""
        if token in self.eos_ids:
            self.reason = "eos"
            return True
        self.ids.append(token)
        changed_from = self._read_token()
        for stop in self.stop_strings:
            # The text before ``changed_from`` was searched already: only a match reaching past it is new.
            start = max(0, changed_from - len(stop) + 1)
            found = self._suffix(start).find(stop)
            if found >= 0:
                self._cut(start + found)
                self.reason = "stop_string"
                self._stream(final=True)
                return True
        self._stream(final=False)
        return False

    def _cut(self, length: int) -> None:
        """Keep only ``text[:length]`` (the answer ends here: no more ids are read)."""
        head = self.text[:length]
        self._settled, self._reads, self._settled_length = [head], [len(self.ids)], length
        self._tail, self._joined = "", head

    def _stream(self, final: bool) -> None:
        if self.on_text is None:
            return
        length = self._settled_length + len(self._tail)
        safe = length
        if not final:
            # Hold back a possibly incomplete character: every U+FFFD at the end (a byte-fallback tokenizer
            # gives one per byte of it). Settled text never ends in one, so they are all in the tail.
            safe -= len(self._tail) - len(self._tail.rstrip("\ufffd"))
        base = max(0, min(self.streamed, safe - self._hold))
        recent = self._suffix(base)  # text[base:]: what is not streamed yet and all that may be held back
        if not final:
            # Hold back any prefix of a stop string.
            for stop in self.stop_strings:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if recent[:safe - base].endswith(stop[:k]):
                        safe -= k
                        break
        if safe > self.streamed:
            self.on_text(recent[self.streamed - base:safe - base])
            self.streamed = safe

    def finish(self) -> None:
        self._stream(final=True)


def decode(
    model,
    tokenizer,
    state: Prefill,
    config: GenerationConfig,
    eos_ids: Sequence[int] = (),
    on_text: Callable[[str], None] | None = None,
) -> DecodeResult:
    """Greedy or sampled decoding from a prefilled cache, one token per forward, at explicit positions."""
    began = time.perf_counter()
    generator = make_generator(config)
    cache, position, logits = state.cache, state.next_position, state.logits
    passes = 0
    with torch.inference_mode():
        if state.pending_ids is not None and len(state.pending_ids):
            pending = state.pending_ids
            out = forward(model, pending, positions=torch.arange(position, position + len(pending)), cache=cache)
            logits, position, passes = out.logits[0, -1].float(), position + len(pending), 1
        if logits is None:
            raise InputError("The prefill carries neither logits nor pending ids to start decoding from.")
        stopper = StopChecker(tokenizer, eos_ids, config.stop_strings, on_text)
        first_token_seconds = None
        for _ in range(config.max_new_tokens):
            token = choose_token(logits, config, generator)
            if first_token_seconds is None:
                first_token_seconds = time.perf_counter() - began
            if stopper.push(token) or len(stopper.ids) >= config.max_new_tokens:
                break
            out = forward(model, torch.tensor([token]), positions=torch.tensor([position]), cache=cache)
            logits, position, passes = out.logits[0, -1].float(), position + 1, passes + 1
        stopper.finish()
    return DecodeResult(
        token_ids=stopper.ids,
        text=stopper.text,
        seconds=time.perf_counter() - began,
        first_token_seconds=first_token_seconds or 0.0,
        forward_passes=passes,
        stopped_by=stopper.reason,
    )
